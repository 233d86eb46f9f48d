"""Fused projections in a Llama block: separate Q/K/V and gate/up matrices against fused layouts,
whole blocks under jit, at SmolLM2-135M's shapes, in one run.

    python scripts/bench_projections.py --json bench_projections.json

D=576, H=9 query heads, K=3 key/value heads (G=3 per group), Dh=64, F=1536, float32, random weights.
Decode: one token per row through --decode-layers blocks (each its own weights, unrolled, like
`model.decode_step`) after a 16-token prompt in a 128-slot cache (donated); prefill: one block over
one --prefill-length window. Every variant computes the same numbers (checked); variants:

    separate          q, k, v: three matmuls; gate, up: two
    qkv               one [D, K (G+2) Dh] matmul, columns grouped by key/value head: [q_k1..q_kG, k_k, v_k]
    qkv_concat        one [D, (H+2K) Dh] matmul, columns [q | k | v]
    qkv_gate_up       qkv, and one [D, 2F] gate/up matmul, columns interleaved (gate_f, up_f)
    qkv_gate_up_cat   qkv, and one [D, 2F] gate/up matmul, columns [gate | up]

Variants are interleaved within each repeat (rotated); medians and minima of wall-clock seconds (the
minimum: the least disturbed run on a shared machine) and medians of the process's CPU seconds (all
threads; less sensitive to other jobs than wall-clock), compile seconds apart.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchlib import check_json_path, check_positive, log, machine, median, ratio, rotated, write_report
from qsjax.runtime.cli import ArgumentParser, UsageError, run_cli

D, H, K, DH, F = 576, 9, 3, 64, 1536
PROMPT, CACHE = 16, 128
VARIANTS = {"separate": ("separate", "separate"), "qkv": ("grouped", "separate"), "qkv_concat": ("concat", "separate"),
            "qkv_gate_up": ("grouped", "interleaved"), "qkv_gate_up_cat": ("grouped", "concat")}


def parse_args(argv=None):
    p = ArgumentParser(prog="scripts/bench_projections.py", description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    p.add_argument("--decode-layers", type=int, default=30, help="blocks per decode step (default 30)")
    p.add_argument("--prefill-length", type=int, default=2048, help="prefill window (default 2048; 0: none)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats; medians are reported (default 20)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout)")
    args = p.parse_args(argv)
    check_positive(args, "repeats", "decode_layers")
    check_positive(args, "prefill_length", minimum=0)
    if min(args.batches) < 1:
        raise UsageError("--batches takes positive numbers")
    check_json_path(args.json)
    return args


def layer_weights(rng) -> dict:
    from qsjax.dense import layers

    """One block's weights, separate and in every fused layout (the same numbers)."""
    n = lambda *s: (rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32)
    w = {"q": n(D, H * DH), "k": n(D, K * DH), "v": n(D, K * DH), "o": n(H * DH, D),
         "gate": n(D, F), "up": n(D, F), "down": n(F, D), "norm1": np.ones(D, np.float32), "norm2": np.ones(D, np.float32)}
    w["qkv_grouped"] = np.asarray(layers.fuse_qkv(w["q"], w["k"], w["v"], K))  # qsjax's layout
    w["qkv_concat"] = np.concatenate([w["q"], w["k"], w["v"]], 1)
    w["gate_up_interleaved"] = np.asarray(layers.fuse_gate_up(w["gate"], w["up"]))  # qsjax's layout
    w["gate_up_concat"] = np.concatenate([w["gate"], w["up"]], 1)
    return w


def qkv(layout: str, w, h):
    """h [B, T, D] -> q [B, T, H, Dh], k, v [B, T, K, Dh]"""
    import jax.numpy as jnp

    from qsjax.dense import layers

    B, T, _ = h.shape
    if layout == "separate":
        return (h @ w["q"]).reshape(B, T, H, DH), (h @ w["k"]).reshape(B, T, K, DH), (h @ w["v"]).reshape(B, T, K, DH)
    if layout == "grouped":
        return layers.split_qkv(h @ w["qkv_grouped"], K, DH)
    q, k, v = jnp.split(h @ w["qkv_concat"], [H * DH, (H + K) * DH], axis=-1)
    return q.reshape(B, T, H, DH), k.reshape(B, T, K, DH), v.reshape(B, T, K, DH)


def gated(layout: str, w, h):
    """silu(h gate) * (h up).  [B, T, D] -> [B, T, F]"""
    import jax.numpy as jnp

    from qsjax.dense import layers

    if layout == "separate":
        return layers.silu(h @ w["gate"]) * (h @ w["up"])
    if layout == "interleaved":
        return layers.swiglu(h @ w["gate_up_interleaved"])
    g, u = jnp.split(h @ w["gate_up_concat"], 2, axis=-1)
    return layers.silu(g) * u


def block(variant: str, w, x, cos, sin, attend):
    from qsjax.dense import layers
    from qsjax.dense.rope import apply_rope

    qkv_layout, mlp_layout = VARIANTS[variant]
    q, k, v = qkv(qkv_layout, w, layers.rms_norm(x, w["norm1"], 1e-5))
    o, extra = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    x = x + o.reshape(*x.shape[:2], -1) @ w["o"]
    return x + gated(mlp_layout, w, layers.rms_norm(x, w["norm2"], 1e-5)) @ w["down"], extra


def decode_fn(variant: str):
    import jax
    import jax.numpy as jnp

    from qsjax.dense.attention import attention_heads_major

    def step(ws, x, ks, vs, cos, sin):
        B = x.shape[0]
        slots = jnp.broadcast_to(jnp.arange(CACHE, dtype=jnp.int32), (B, CACHE))
        ok, q_slot = slots < PROMPT, jnp.full((B, 1), PROMPT, jnp.int32)
        new_k, new_v = [], []
        for w, kc, vc in zip(ws, ks, vs):
            def attend(q, k, v, kc=kc, vc=vc):
                kc = jax.lax.dynamic_update_slice(kc, k.transpose(0, 2, 1, 3), (0, 0, PROMPT, 0))
                vc = jax.lax.dynamic_update_slice(vc, v.transpose(0, 2, 1, 3), (0, 0, PROMPT, 0))
                return attention_heads_major(q, kc, vc, q_slot, slots, ok, self_visible=True), (kc, vc)
            x, (kc, vc) = block(variant, w, x, cos, sin, attend)
            new_k.append(kc)
            new_v.append(vc)
        return x, new_k, new_v

    return jax.jit(step, donate_argnums=(2, 3))


def prefill_fn(variant: str):
    import jax
    import jax.numpy as jnp

    from qsjax.dense.attention import attention

    def window(w, x, cos, sin):
        B, T, _ = x.shape
        slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return block(variant, w, x, cos, sin, lambda q, k, v: (attention(q, k, v, slots, slots, jnp.ones((B, T), bool)), (k, v)))

    return jax.jit(window)


def cases(args, weights, rng) -> tuple[dict, dict, dict]:
    """(case, variant) -> run() and its compile seconds; case -> each variant's output (to compare)."""
    import jax
    import jax.numpy as jnp

    runs, compile_s, outputs = {}, {}, {}
    angles = lambda T: np.arange(T)[:, None] / 10000.0 ** (np.arange(0, DH, 2) / DH)
    for B in args.batches:
        x = jnp.asarray(rng.normal(size=(B, 1, D)).astype(np.float32))
        a = jnp.broadcast_to(jnp.asarray(angles(PROMPT + 1)[-1:], jnp.float32), (B, 1, DH // 2))
        caches = [jnp.asarray(rng.normal(size=(B, K, CACHE, DH)).astype(np.float32)) for _ in range(2 * args.decode_layers)]
        for variant in VARIANTS:
            f, state = decode_fn(variant), {}
            new = lambda: ([c.copy() for c in caches[::2]], [c.copy() for c in caches[1::2]])
            t0 = time.perf_counter()
            out = jax.block_until_ready(f(weights, x, *new(), jnp.cos(a), jnp.sin(a)))
            compile_s[(f"decode_b{B}", variant)] = time.perf_counter() - t0
            outputs.setdefault(f"decode_b{B}", {})[variant] = np.asarray(out[0])
            state["k"], state["v"] = out[1], out[2]

            def run(f=f, x=x, a=a, state=state):
                y, state["k"], state["v"] = f(weights, x, state["k"], state["v"], jnp.cos(a), jnp.sin(a))
                jax.block_until_ready(y)
            runs[(f"decode_b{B}", variant)] = run
    if args.prefill_length:
        T = args.prefill_length
        x = jnp.asarray(rng.normal(size=(1, T, D)).astype(np.float32))
        a = jnp.asarray(angles(T)[None], jnp.float32)
        for variant in VARIANTS:
            f = prefill_fn(variant)
            t0 = time.perf_counter()
            outputs.setdefault(f"prefill_{T}", {})[variant] = np.asarray(f(weights[0], x, jnp.cos(a), jnp.sin(a))[0])
            compile_s[(f"prefill_{T}", variant)] = time.perf_counter() - t0
            runs[(f"prefill_{T}", variant)] = lambda f=f: jax.block_until_ready(f(weights[0], x, jnp.cos(a), jnp.sin(a)))
    return runs, compile_s, outputs


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax.numpy as jnp

    at_start = machine()
    rng = np.random.default_rng(0)
    weights = [{k: jnp.asarray(v) for k, v in layer_weights(rng).items()} for _ in range(args.decode_layers)]
    runs, compile_s, outputs = cases(args, weights, rng)
    agree = {case: max(float(np.max(np.abs(y - outs["separate"]))) for y in outs.values()) for case, outs in outputs.items()}
    log(f"max |difference| from separate: {agree}")
    times, cpu = {key: [] for key in runs}, {key: [] for key in runs}
    case_names = list(dict.fromkeys(c for c, _ in runs))
    for r in range(args.repeats):
        for case in case_names:
            for key in rotated([k for k in runs if k[0] == case], r):
                t0, c0 = time.perf_counter(), time.process_time()
                runs[key]()
                times[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
    report = {"command": " ".join(["python", "scripts/bench_projections.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine_at_start": at_start, "repeats": args.repeats, "decode_layers": args.decode_layers,
              "max_abs_difference_from_separate": agree, "cases": {}}
    lines = [f"{'case':>14} {'variant':16} {'median ms':>10} {'speedup':>8} {'min ms':>8} {'speedup':>8} "
             f"{'cpu ms':>8} {'speedup':>8}"]
    for case in case_names:
        base, base_min = median(times[(case, "separate")]), min(times[(case, "separate")])
        base_cpu = median(cpu[(case, "separate")])
        entry = report["cases"][case] = {}
        for variant in VARIANTS:
            m, m_min, m_cpu = median(times[(case, variant)]), min(times[(case, variant)]), median(cpu[(case, variant)])
            entry[variant] = {"seconds": m, "seconds_min": m_min, "seconds_all": times[(case, variant)],
                              "seconds_compile": compile_s[(case, variant)], "speedup_vs_separate": ratio(base, m),
                              "min_speedup_vs_separate": ratio(base_min, m_min), "cpu_seconds": m_cpu,
                              "cpu_speedup_vs_separate": ratio(base_cpu, m_cpu)}
            lines.append(f"{case:>14} {variant:16} {m * 1e3:10.2f} {ratio(base, m):8.3f} {m_min * 1e3:8.2f} "
                         f"{ratio(base_min, m_min):8.3f} {m_cpu * 1e3:8.2f} {ratio(base_cpu, m_cpu):8.3f}")
    report["load_average_at_end"] = machine()["load_average"]
    return write_report(args.json, report, "\n".join(lines))


if __name__ == "__main__":
    run_cli(main)
