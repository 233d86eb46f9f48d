"""Compiled programs: one jitted function, compiled ahead of time once per key, compile time recorded.

The key names what the compiled program depends on (shapes, static arguments); `compile` lowers
with abstract inputs, so that compilation is timed apart from the work, and a second call with the
same key reuses the program."""

from __future__ import annotations

import time

import jax


class Programs:
    def __init__(self, fn, static_argnums: tuple[int, ...] = (), donate_argnums: tuple[int, ...] = ()):
        self._jit = jax.jit(fn, static_argnums=static_argnums, donate_argnums=donate_argnums)
        self._compiled: dict = {}
        self._out_info: dict = {}

    def compile(self, key, *args) -> float:
        """Compile for `args` (arrays, abstract `jax.ShapeDtypeStruct`s, static values) under `key`,
        unless already compiled.  -> the seconds it took (0 when reused)"""
        if key in self._compiled:
            return 0.0
        t0 = time.perf_counter()
        lowered = self._jit.lower(*args)
        self._compiled[key] = compiled = lowered.compile()
        seconds = time.perf_counter() - t0
        # (the compiled program's own out_info fails on programs with host callbacks)
        self._out_info[key] = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           lowered.out_info, compiled.output_shardings)
        return seconds

    def __call__(self, key, *args):
        """Run the program compiled under `key` (the static arguments are baked in: leave them out)."""
        return self._compiled[key](*args)

    def out_info(self, key):
        """The abstract outputs (shapes, dtypes, shardings) of the program compiled under `key`."""
        return self._out_info[key]

    def keys(self) -> list:
        return list(self._compiled)

    def __contains__(self, key) -> bool:
        return key in self._compiled

    def __len__(self) -> int:
        return len(self._compiled)
