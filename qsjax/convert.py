"""Convert a llama.cpp GGUF file (Llama, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3) into a Hugging Face model directory.

    python -m qsjax.convert MODEL.gguf OUT_DIR [--force]

The directory holds what `transformers.AutoModelForCausalLM.from_pretrained` reads (the tensors,
config and tokenizer come from qsjax.checkpoints.gguf_file):

    config.json             the model's config (LlamaConfig, Qwen2Config, ...), rebuilt from the GGUF metadata
    generation_config.json  the bos / eos / pad token ids
    model.safetensors       every tensor dequantized to float32, under Hugging Face names
    tokenizer.json          the tokenizer described by the metadata (byte-level BPE, or SentencePiece with byte fallback)
    tokenizer_config.json   special tokens, add_bos_token and the chat template
    qsjax-manifest.json     the size and SHA-256 of each file above, to verify the directory later

The output is written into a hidden temporary directory next to OUT_DIR and renamed into place at
the end, so a failed or interrupted conversion (Ctrl-C, SIGTERM) leaves nothing behind; a later run
removes what a killed one left; of two conversions into the same new OUT_DIR only the first to
finish succeeds. Nothing of the user's is deleted: OUT_DIR may not contain the GGUF file or the
current directory, and --force replaces only a model directory: one qsjax wrote (its manifest lists
every file) or a complete Hugging Face model (config.json with model_type, weights, tokenizer) with
nothing else in it.
"""

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import save_file

from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli
from qsjax.checkpoints.gguf_file import (
    GGUFError,
    build_tokenizer,
    convert_tensors,
    generation_config,
    model_config,
    open_gguf,
    read_metadata,
    tokenizer_config,
)

MANIFEST = "qsjax-manifest.json"


class OutputError(OSError):
    """The output directory cannot be written (read-only, full disk, not a directory)."""
CHUNK = 1 << 20


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model_dir(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Write the converted files of `gguf_path` into the existing directory `out_dir`."""
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    config = model_config(reader, meta)
    tokenizer = build_tokenizer(meta)  # before the slow part, so that an unsupported tokenizer fails fast
    tensors = convert_tensors(reader, config, progress=progress)
    write_json(out_dir / "config.json", config)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copymode(out_dir / "config.json", out_dir / "model.safetensors")  # safetensors writes mode 0600
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "generation_config.json", generation_config(config))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta, config["max_position_embeddings"]))
    write_manifest(out_dir)


# ---------------------------------------------------------------------------------------------
# The manifest: what a complete directory holds


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(model_dir: Path) -> None:
    """Record the size and SHA-256 of every file in `model_dir` (but the manifest itself)."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    entries = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    write_json(model_dir / MANIFEST, {"files": entries})


def manifest_problems(model_dir: Path, *, checksums: bool = False) -> list[str] | None:
    """What is wrong with `model_dir` by its manifest ([] if nothing; None without a manifest):
    missing files and files of the wrong size (or, with `checksums`, the wrong SHA-256)."""
    try:
        entries = json.loads((model_dir / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{MANIFEST} unreadable"]
    problems = []
    for name, entry in entries.items():
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, not {entry['size']}")
        elif checksums and file_sha256(path) != entry["sha256"]:
            problems.append(f"{name} is corrupt (SHA-256 mismatch)")
    return problems


# ---------------------------------------------------------------------------------------------
# Replacing the output directory safely


def temp_sibling(path: Path, kind: str) -> Path:
    """A hidden sibling of `path` named after this process, so that later runs can tell a stale one."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: Path, kinds=("partial", "old", "fetch")) -> None:
    """Remove hidden temporary siblings of `path` left by a killed run (whose process is gone)."""
    if not path.parent.is_dir():
        return
    for kind in kinds:
        for stale in path.parent.glob(f".{path.name}.{kind}-*"):
            pid = stale.name.rsplit(f".{kind}-", 1)[1].split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)


# What a model directory may hold: a complete one (config.json with model_type, weights, tokenizer)
# made of these files and nothing else may be replaced by --force, as may one with a manifest,
# which only qsjax writes.
HF_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def listed_in_manifest(model_dir: Path) -> set[str]:
    try:
        return set(json.loads((model_dir / MANIFEST).read_text(encoding="utf-8"))["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def not_replaceable(out_dir: Path) -> str | None:
    """Why --force may not replace the directory `out_dir` (None if it may): it must be a model
    directory qsjax wrote (a manifest listing every file) or a complete Hugging Face model
    (config.json with model_type, *.safetensors weights, tokenizer files) with nothing else in it."""
    known = listed_in_manifest(out_dir)
    if not known:
        try:
            config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "it holds no model: no readable config.json"
        if not isinstance(config, dict) or "model_type" not in config:
            return "its config.json has no model_type"
        if not any(out_dir.glob("*.safetensors")):
            return "it holds no model weights (*.safetensors)"
        if not ((out_dir / "tokenizer.json").is_file() or (out_dir / "tokenizer.model").is_file()):
            return "it holds no tokenizer"
    for entry in sorted(out_dir.iterdir()):
        name = entry.name
        ours = name in known or name in HF_MODEL_FILES or (name.startswith("model-") and name.endswith(".safetensors"))
        if not ours or entry.is_symlink() or not entry.is_file():
            return f"{name} is not a model file"
    return None


def check_destination(gguf_path: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse a destination that is a file, that holds the input or the current directory, or that
    is not empty (unless `overwrite`, and then only a model directory: not_replaceable)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir == gguf_path.parent or out_dir in gguf_path.parents:
        raise FileExistsError(f"output directory {out_dir} contains the input {gguf_path}; choose another directory")
    cwd = Path.cwd().resolve()
    if out_dir == cwd or out_dir in cwd.parents:
        raise FileExistsError(f"output directory {out_dir} contains the current directory; choose another directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass --force to replace it (only a model directory)")
        why = not_replaceable(out_dir)
        if why is not None:
            raise FileExistsError(f"{out_dir} is not a model directory ({why}); --force replaces only a model "
                                  "directory, so choose another directory")


def replace_dir(src: Path, dst: Path, overwrite: bool) -> None:
    """Rename directory `src` to `dst`.  Without `overwrite` this succeeds only while `dst` is
    missing or empty (the rename fails if another process filled it meanwhile); with it, `dst` is
    moved aside first and removed after."""
    if dst.exists() and overwrite:
        old = temp_sibling(dst, "old")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
        return
    try:
        os.rename(src, dst)  # onto an empty directory or none: atomic, and refused if dst is not empty
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(f"{dst} was filled while converting (another conversion?); nothing replaced, "
                                  "pass --force to replace it") from None
        raise


def write_dir_atomically(out_dir: Path, write, *, overwrite: bool = True, check=None) -> Path:
    """`write(tmp)` fills a fresh hidden sibling directory, which then takes `out_dir`'s place
    (replace_dir; `check()` runs just before, to refuse what appeared meanwhile); on any error or
    interrupt the temporary directory is removed and `out_dir` is left as it was."""
    partial = temp_sibling(out_dir, "partial")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out_dir)
        partial.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write {out_dir}: {e.strerror or e}") from None
    try:
        write(partial)
        if check is not None:
            check()
        replace_dir(partial, out_dir, overwrite)
    except FileExistsError:  # check() or replace_dir: what appeared meanwhile is kept
        raise
    except (OSError, SafetensorError) as e:  # a full disk, a file system gone read-only
        raise OutputError(f"cannot write {out_dir}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after a successful rename
    return out_dir


def convert_gguf(gguf_path, out_dir, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a GGUF file into a Hugging Face model directory `out_dir`; returns its path.

    Raises FileNotFoundError (no such file), FileExistsError (`out_dir` not empty and not
    `overwrite`, or not a safe place), GGUFError (unreadable, truncated or unsupported file) or
    OutputError (cannot write). On error or interrupt nothing is left behind.
    """
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir).resolve()
    if gguf_path.is_dir():
        raise FileNotFoundError(f"{gguf_path} is a directory; give the .gguf file")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_path}")
    check = lambda: check_destination(gguf_path, out_dir, overwrite)  # noqa: E731
    check()
    return write_dir_atomically(out_dir, lambda tmp: write_model_dir(gguf_path, tmp, progress=progress),
                                overwrite=overwrite, check=check)


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m qsjax.convert", description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="a llama.cpp GGUF file (llama, qwen2, qwen3, phi3, gemma2, gemma3)")
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it is a model directory (one qsjax wrote, or a complete model and nothing else)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = convert_gguf(args.gguf, args.out_dir, overwrite=args.force, progress=not args.quiet)
    except (GGUFError, FileNotFoundError, FileExistsError, OutputError) as error:
        raise UsageError(str(error)) from None
    print(out)
    return 0


if __name__ == "__main__":
    run_cli(main)
