"""JAX's persistent compilation cache, on by default in a user cache directory.

A second run of the same command then loads its compiled programs from disk instead of
compiling them again. Set QSJAX_COMPILATION_CACHE=off to disable, or to a directory to move it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qsjax" / "jax-compilation"


def enable_compilation_cache() -> Path | None:
    setting = os.environ.get("QSJAX_COMPILATION_CACHE", "")
    if setting.lower() == "off":
        return None
    path = Path(setting) if setting else cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
