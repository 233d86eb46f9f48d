"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom on the default
model in small mode (QSJAX_NOTEBOOK_SMALL=1: few evaluation tokens, short generations, a tiny sweep, a
2,048-token long prompt)."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_reading_quicksilver.ipynb", "02_frontier.ipynb", "03_colab_tpu.ipynb", "04_long_prompts.ipynb"]
CELL_TIMEOUT = 600  # seconds, for any one cell


def test_notebooks_are_committed_without_outputs():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS  # a new notebook is run below too
    for name in NOTEBOOKS:
        notebook = json.loads((NOTEBOOK_DIR / name).read_text(encoding="utf-8"))
        for i, cell in enumerate(notebook["cells"]):
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [], f"{name}, cell {i} has outputs: clear them before committing"
                assert cell["execution_count"] is None, f"{name}, cell {i} has an execution count: clear it"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A Jupyter data directory whose kernel `qsjax-test` runs this interpreter (the one with qsjax's
    dependencies), whatever `python3` kernel the machine has or lacks."""
    path = tmp_path_factory.mktemp("jupyter")
    spec = path / "kernels" / "qsjax-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "qsjax test", "language": "python"}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, default_model_dir, jupyter_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("QSJAX_NOTEBOOK_SMALL", "1")
    # the kernel imports qsjax from this checkout, installed or not
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="qsjax-test",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})  # run from notebooks/
    client.execute()
