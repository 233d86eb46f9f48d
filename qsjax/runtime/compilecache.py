"""JAX's persistent compilation cache, on by default in a user cache directory.

A second run of the same command then loads its compiled programs from disk instead of
compiling them again. Set QSJAX_COMPILATION_CACHE=off to disable, or to a directory to move it.
The cache is optional: when its directory cannot be created or written, one warning line goes to
stderr and the command runs without it. A damaged entry (e.g. truncated) gives one `warning:` line
and is removed, so that the program is compiled and stored afresh; JAX's own Python warnings reach
stderr as `warning:` lines, each once.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import jax


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qsjax" / "jax-compilation"


def writable_dir(path: Path) -> str | None:
    """None if `path` is (or can be made) a directory we can write into, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def enable_compilation_cache() -> Path | None:
    setting = os.environ.get("QSJAX_COMPILATION_CACHE", "")
    if setting.lower() == "off":
        return None
    path = Path(setting) if setting else cache_dir()
    problem = writable_dir(path)
    if problem is not None:
        print(f"warning: compilation cache {path} is not writable ({problem}); running without it "
              "(set QSJAX_COMPILATION_CACHE to another directory, or to off)", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    show_jax_warnings(path)
    return path


def damaged_entries(path: Path) -> list[Path]:
    """The entries of the cache directory whose compressed content does not decompress."""
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:  # JAX moved it: nothing is removed
        return []
    damaged = []
    for entry in path.glob("*-cache"):
        try:
            decompress_executable(entry.read_bytes())
        except Exception:  # zlib.error, zstd's error: the entry cannot be read back
            damaged.append(entry)
    return damaged


def show_jax_warnings(path: Path) -> None:
    """Route Python warnings from JAX to one `warning:` line each (once per message); a cache entry
    JAX could not read is removed."""
    shown, original = set(), warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if f"{os.sep}jax{os.sep}" not in filename and f"{os.sep}jaxlib{os.sep}" not in filename:
            return original(message, category, filename, lineno, file, line)
        text = " ".join(str(message).split())
        if "persistent compilation cache" in text:
            removed = []
            for entry in damaged_entries(path):
                try:
                    entry.unlink()
                    removed.append(entry.name)
                except OSError:
                    pass
            text = (f"a damaged compilation cache entry in {path} was removed ({', '.join(removed)}); compiling afresh"
                    if removed else f"compilation cache {path}: {text}")
        if text not in shown:
            shown.add(text)
            print(f"warning: {text}", file=sys.stderr)

    warnings.showwarning = show
