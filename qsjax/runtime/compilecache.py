"""JAX's persistent compilation cache, on by default in a user cache directory.

A second run of the same command then loads its compiled programs from disk instead of
compiling them again. Set QSJAX_COMPILATION_CACHE=off to disable, or to a directory to move it.
The cache is optional: when its directory cannot be created or written, one warning line goes to
stderr and the command runs without it.
"""

from __future__ import annotations

import os
import sys
import tempfile
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
    return path
