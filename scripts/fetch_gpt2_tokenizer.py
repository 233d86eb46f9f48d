"""Export GPT-2's tokenizer, and llama.cpp's test cases for it, from the llama-cpp-python sdist.

    python scripts/fetch_gpt2_tokenizer.py [--out DIR] [--sdist llama_cpp_python-0.3.36.tar.gz] [--force]

llama.cpp ships GPT-2's vocabulary as a vocabulary-only GGUF, `models/ggml-vocab-gpt-2.gguf`, next
to tokenizer test cases. This script `pip download`s the llama-cpp-python sdist (nothing is built
or installed), reads just those three files out of the tarball and writes into DIR (default
`weights/gpt2-tokenizer/`):

    vocab.json              token -> id, the same mapping as OpenAI's encoder.json
    merges.txt              the 50,000 merges, after the `#version: 0.2` header line of OpenAI's vocab.bpe
    tokenizer.json          the same tokenizer in the `tokenizers` format
    tokenizer_config.json   <|endoftext|> as BOS and EOS; no BOS is added
    ggml-vocab-gpt-2.gguf.inp
    ggml-vocab-gpt-2.gguf.out

The test files were made by llama.cpp's `convert_hf_to_gguf_update.py` with the Hugging Face GPT-2
tokenizer. `.inp` holds the test strings, each followed by the line `__ggml_vocab_test__` (split the
file on "\\n__ggml_vocab_test__\\n"; strings may be empty or contain newlines). `.out` has one line
per string: its token ids (`encode(text, add_special_tokens=False)`), each preceded by a space; an
empty line for the empty string. `read_test_cases` parses the pair.

Running it again does nothing once DIR is complete; the files appear all at once (atomic rename).
"""

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# Run from a source checkout without installing qsjax.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf

from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli
from qsjax.convert import build_tokenizer, read_metadata, tokenizer_config, write_dir_atomically
from qsjax.weights import weights_dir

SDIST_SPEC = "llama-cpp-python==0.3.36"
MODELS_DIR = "vendor/llama.cpp/models/"  # inside the sdist, after its top-level directory
VOCAB_GGUF = "ggml-vocab-gpt-2.gguf"
TEST_FILES = (f"{VOCAB_GGUF}.inp", f"{VOCAB_GGUF}.out")
OUTPUT_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", *TEST_FILES)
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"


def read_test_cases(inp_path: Path, out_path: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer tests as `(text, expected_ids)` pairs (format in the module docstring)."""
    texts = inp_path.read_text(encoding="utf-8").split(TEST_SEPARATOR)[:-1]  # the file ends with a separator
    id_lines = out_path.read_text(encoding="utf-8").split("\n")[:-1]
    if len(texts) != len(id_lines):
        raise ValueError(f"{inp_path} has {len(texts)} tests but {out_path} has {len(id_lines)}")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, id_lines)]


def pip_download_sdist(dest: Path) -> Path:
    """Download the llama-cpp-python sdist into `dest` (no dependencies, nothing built); returns its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--no-binary", ":all:"]
    command += [SDIST_SPEC, "-d", str(dest)]
    if subprocess.run(command, stdout=sys.stderr, check=False).returncode != 0:
        raise UsageError(f"`pip download {SDIST_SPEC}` failed; pass --sdist PATH to use a local copy")
    return next(dest.glob("llama_cpp_python-*.tar.gz"))


def read_members(sdist: Path, names: list[str]) -> dict[str, bytes]:
    """The files `MODELS_DIR/<name>` of the tarball, read in one streaming pass (no full extraction)."""
    found = {}
    with tarfile.open(sdist, "r|gz") as tar:
        for member in tar:
            name = member.name.split("/", 1)[-1]  # drop the top-level `llama_cpp_python-X.Y.Z/`
            if name.startswith(MODELS_DIR) and name[len(MODELS_DIR) :] in names:
                found[name[len(MODELS_DIR) :]] = tar.extractfile(member).read()
                if len(found) == len(names):
                    return found
    missing = sorted(set(names) - found.keys())
    raise UsageError(f"{sdist} has no {', '.join(MODELS_DIR + name for name in missing)}")


def export(files: dict[str, bytes], out_dir: Path) -> None:
    """Write the tokenizer files and the test cases into the existing directory `out_dir`."""
    gguf_path = out_dir / VOCAB_GGUF
    gguf_path.write_bytes(files[VOCAB_GGUF])
    meta = read_metadata(gguf.GGUFReader(gguf_path))
    gguf_path.unlink()

    vocab = {token: i for i, token in enumerate(meta["tokenizer.ggml.tokens"])}
    (out_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")  # like encoder.json: \u escapes
    merges = "".join(f"{merge}\n" for merge in meta["tokenizer.ggml.merges"])
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(meta, max_length=meta["gpt2.context_length"])
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in TEST_FILES:
        (out_dir / name).write_bytes(files[name])
    read_test_cases(out_dir / TEST_FILES[0], out_dir / TEST_FILES[1])  # they parse


def fetch_gpt2_tokenizer(out_dir: Path, *, sdist: Path | None = None, force: bool = False) -> Path:
    """Make `out_dir` hold the files listed in the module docstring; returns it."""
    if not force and all((out_dir / name).is_file() for name in OUTPUT_FILES):
        return out_dir
    if sdist is not None and not sdist.is_file():
        raise UsageError(f"--sdist {sdist}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        files = read_members(sdist or pip_download_sdist(Path(tmp)), [VOCAB_GGUF, *TEST_FILES])
    return write_dir_atomically(out_dir, lambda tmp: export(files, tmp))


def parse_args(argv=None):
    parser = ArgumentParser(prog="scripts/fetch_gpt2_tokenizer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: weights/gpt2-tokenizer)")
    parser.add_argument("--sdist", type=Path, default=None, help="a local llama_cpp_python-0.3.36.tar.gz")
    parser.add_argument("--force", action="store_true", help="export again even if OUT is complete")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(fetch_gpt2_tokenizer(args.out or weights_dir() / "gpt2-tokenizer", sdist=args.sdist, force=args.force))
    return 0


if __name__ == "__main__":
    run_cli(main)
