"""Where a dense decode step's time goes over a long KV cache: the whole step, one layer's attention
alone, and the bytes the step must read at the machine's read bandwidth.

    python scripts/profile_decode_step.py --json profile_decode_step.json

The real default model, batch 1, float32, a cache of each of --places places (default 128, 4,224 and
8,320: the Generator's caches for a 16-, a 4,096- and an 8,128-token prompt with 64 new tokens) filled
with random keys and values up to 64 places before its end. Timed, interleaved, medians of
--repeats: a compiled loop of --steps decode steps (the cache donated, as in the Generator's loop)
per step, in two orders: `attend` (the model's: attend over the cache and the step's own entry,
then write it) and `write_first` (write the entry, then attend over the buffer just written: the
order before); one layer's decode attention (`attention.attention_step`) alone; the read bandwidth
(benchlib.read_bandwidth). The report also counts, in each loop's optimised program, the copies of
cache-sized buffers (each a read and a write of a whole layer's keys, values or slots per step).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time

from benchlib import check_json_path, check_positive, log, machine, median, read_bandwidth, rotated, write_report
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli

ORDERS = ("attend", "write_first")


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/profile_decode_step.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    p.add_argument("--places", type=int, nargs="+", default=[128, 4224, 8320],
                   help="cache places (default 128 4224 8320)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timed loop (default 8)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats; medians are reported (default 7)")
    return p.parse_args(argv)


def check_args(args) -> None:
    check_positive(args, "steps", "repeats")
    if min(args.places) < 65:
        raise UsageError(f"--places must be above 64 (the last 64 are left empty), got {min(args.places)}")
    check_json_path(args.json)


def write_first_cache():
    """A KVCache wrapper whose `attend` writes the step's entry first and then attends over the
    written buffers (the order `KVCache.attend` used before), for `decode_step` (duck-typed)."""
    import jax

    from qsjax.dense.attention import PLAIN
    from qsjax.dense.kvcache import KVCache

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class WriteFirst:
        kv: KVCache

        def positions(self):
            return self.kv.positions()

        def attend(self, layer, q, k, v, key_mask=None, key_bias=None, rule=PLAIN):
            kv = self.kv.write(layer, k, v)
            return WriteFirst(kv), kv.attention(layer, q, key_mask, key_bias, rule)

        def advance(self):
            return WriteFirst(self.kv.advance())

    return WriteFirst


def random_cache(cfg, places: int, seed: int = 0):
    """A batch-1 KVCache of `places` places, random keys and values in all but the last 64."""
    import jax
    import jax.numpy as jnp

    from qsjax.dense.kvcache import EMPTY, KVCache

    filled = places - 64
    shape = (1, cfg.n_kv_heads, places, cfg.head_dim)
    keys = jax.random.split(jax.random.key(seed), 2 * cfg.n_layers)
    bufs = [jax.random.normal(k, shape, jnp.float32) for k in keys]
    slot = jnp.arange(places, dtype=jnp.int32)[None]
    slots = tuple(jnp.where(slot < filled, slot, EMPTY) for _ in range(cfg.n_layers))
    return KVCache(tuple(bufs[:cfg.n_layers]), tuple(bufs[cfg.n_layers:]), slots, jnp.zeros(1, jnp.int32),
                   jnp.int32(filled), jnp.full(cfg.n_layers, filled, jnp.int32))


def cache_copies(hlo: str, cfg, places: int) -> int:
    """Copies of cache-sized buffers (a layer's keys or values [1, K, S, Dh], or slots [1, S]) in an optimised program."""
    shapes = (rf"f32\[1,{cfg.n_kv_heads},{places},{cfg.head_dim}\]", rf"s32\[1,{places}\]")
    return sum(1 for line in hlo.splitlines() for s in shapes if re.search(rf"= {s}\{{[^}}]*\}} copy\(", line))


def profile(model, args) -> dict:
    import jax
    import jax.numpy as jnp

    from qsjax.dense.attention import Own, attention_step
    from qsjax.dense.kvcache import cache_bytes
    from qsjax.dense.model import decode_step

    cfg, WriteFirst = model.cfg, write_first_cache()
    token = jnp.ones(1, jnp.int32)

    def loop(state, cache):
        step = lambda i, c: decode_step(model.module(state), c, token)[1]
        return jax.lax.fori_loop(0, args.steps, step, cache)

    def layer_attention(q, k, v, cache):  # layer 1's decode attention, as `KVCache.attend` calls it
        q_slot = jnp.broadcast_to(cache.index, (1, 1))
        ok = jnp.arange(cache.length())[None] != cache.fill[0]
        return attention_step(q, cache.k[0], cache.v[0], Own(k[:, 0], v[:, 0]), q_slot, cache.slot[0], ok)

    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(model.state))
    out = {}
    for S in args.places:
        programs, copies, caches = {}, {}, {}
        for order in ORDERS:
            wrap = (lambda c: c) if order == "attend" else WriteFirst
            caches[order] = wrap(random_cache(cfg, S))
            compiled = jax.jit(loop, donate_argnums=1).lower(model.state, caches[order]).compile()
            programs[order], copies[order] = compiled, cache_copies(compiled.as_text(), cfg, S)
        qkv = [jax.random.normal(jax.random.key(i), (1, 1, n, cfg.head_dim))
               for i, n in enumerate((cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads))]
        attn, attn_cache = jax.jit(layer_attention), random_cache(cfg, S, seed=1)
        times = {name: [] for name in (*ORDERS, "attention_one_layer")}
        for r in range(args.repeats + 1):  # the first round warms up
            for name in rotated(times, r):
                t0 = time.perf_counter()
                if name == "attention_one_layer":
                    attn(*qkv, attn_cache).block_until_ready()
                else:
                    caches[name] = jax.block_until_ready(programs[name](model.state, caches[name]))
                if r:
                    times[name].append(time.perf_counter() - t0)
        step = {o: median(times[o]) / args.steps for o in ORDERS}
        cache = cache_bytes(random_cache(cfg, S))
        out[f"places_{S}"] = {
            "places": S, "bytes_per_step": {"weights": weights, "cache": cache, "total": weights + cache},
            "step_seconds": step, "copies_of_cache_buffers": copies,
            "attention_one_layer_seconds": median(times["attention_one_layer"]),
            "attention_all_layers_seconds": median(times["attention_one_layer"]) * cfg.n_layers,
            "attention_one_layer_bytes_per_second": 2 * cache_bytes(attn_cache.k[0]) / median(times["attention_one_layer"])}
        log(f"[profile_decode_step] {S} places: " + ", ".join(f"{o} {step[o] * 1e3:.1f} ms" for o in ORDERS)
            + f", attention x{cfg.n_layers} {out[f'places_{S}']['attention_all_layers_seconds'] * 1e3:.1f} ms")
    return out


def format_table(p: dict) -> str:
    bw = p["read_bandwidth"]["bytes_per_second"]
    lines = [f"decode step, batch 1; read bandwidth {bw / 1e9:.1f} GB/s (jax sum)",
             f"  {'places':>7} {'MB/step':>8} {'bytes ms':>9} {'step ms':>8} {'copies':>7} {'write-first ms':>15} "
             f"{'copies':>7} {'attn x L ms':>12} {'attn GB/s':>10}"]
    for e in p["steps"].values():
        total = e["bytes_per_step"]["total"]
        lines.append(f"  {e['places']:7d} {total / 1e6:8.0f} {total / bw * 1e3:9.1f} {e['step_seconds']['attend'] * 1e3:8.1f} "
                     f"{e['copies_of_cache_buffers']['attend']:7d} {e['step_seconds']['write_first'] * 1e3:15.1f} "
                     f"{e['copies_of_cache_buffers']['write_first']:7d} {e['attention_all_layers_seconds'] * 1e3:12.1f} "
                     f"{e['attention_one_layer_bytes_per_second'] / 1e9:10.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    from qsjax.checkpoints.hf_params import load_model
    from qsjax.weights import resolve_model

    model_dir = resolve_model(None)
    model = load_model(model_dir)
    bandwidth = [read_bandwidth()]
    report = {"command": " ".join(["python", "scripts/profile_decode_step.py", *(sys.argv[1:] if argv is None else argv)]),
              "model": model_dir.name, "dtype": "float32", "machine_at_start": machine(), "repeats": args.repeats,
              "steps_per_loop": args.steps, "steps": profile(model, args)}
    bandwidth.append(read_bandwidth())
    report["read_bandwidth"] = {"bytes_per_second": median([b["jax"] for b in bandwidth]),
                                "numpy_bytes_per_second": median([b["numpy"] for b in bandwidth]),
                                "measured": bandwidth}
    report["load_average_at_end"] = machine()["load_average"]
    return write_report(args.json, report, format_table(report))


if __name__ == "__main__":
    run_cli(main)
