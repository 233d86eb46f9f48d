"""Block-wise refinement of the nested grids (OmniQuant's block objective, MatQuant's sum over widths).

`calibration` fits each linear layer alone, on the dense model's inputs to it. Here the grids of one
block's linear layers are refined together so that each width's quantized block reproduces the dense
block's output, on the inputs the quantized model itself feeds it (the output of the blocks before
it, quantized at the same width):

    min  sum_r  lambda_r  ||B_l^(r)(X~_l^(r)) - B_l(X_l)||^2 / ||B_l^(r, minmax)(X~_l^(r)) - B_l(X_l)||^2

with X_l the dense model's input to block l, X~_l^(r) = B_(l-1)^(r)(X~_(l-1)^(r)) the r-bit model's
(X~_1 = X_1, the embeddings), B^(r) the block with every linear layer's r-bit view (`nested.views`),
rounding through the straight-through estimator, Adam (optax), full-batch, started from the
per-linear fit: a function of the weights and the calibration text alone. Blocks run first to last,
each refined once (OmniQuant's order); the weights themselves stay frozen.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qsjax.dense import blocks, layers
from qsjax.dense.attention import DIRECT_MAX
from qsjax.dense.model import Layout, block
from qsjax.quicksilver.calibration import clip_of, raw_of
from qsjax.quicksilver.mechanisms import nested
from qsjax.quicksilver.mechanisms.matryoshka import WIDTHS


def quantized_block(graphdef, state, x, layout, clips: dict | None, bits: int, group: int, train: bool):
    """The block with each linear layer's r-bit view under clips {name: clip} (None: min-max).
    x [B, T, D] -> [B, T, D]"""
    blk = nnx.merge(graphdef, state)
    names = {id(v): k for k, v in vars(blk).items()}

    def linear(m, h):
        clip = None if clips is None else clips[names[id(m)]]
        w = nested.views(m.w[...], clip, group, (bits,), train)[bits]
        return layers.linear(h, w, None if m.b is None else m.b[...])

    return block(blk, x, layout, linear)[0]


def output_errors(graphdef, state, xs, y, layout, clips, group: int, train: bool):
    """Each width's mean squared block-output error on its own input.  xs [3, B, T, D], y [B, T, D] -> [3]"""
    return jnp.stack([jnp.mean((quantized_block(graphdef, state, xs[i], layout, clips, r, group, train) - y) ** 2)
                      for i, r in enumerate(WIDTHS)])


def clips_of(raw: dict | None) -> dict | None:
    return None if raw is None else {name: clip_of(r) for name, r in raw.items()}


@functools.partial(jax.jit, static_argnames=("graphdef", "group"))
def errors(graphdef, state, xs, y, layout, raw: dict | None, group: int):
    """`output_errors` under raw parameters {name: raw} (None: min-max).  -> [3]"""
    return output_errors(graphdef, state, xs, y, layout, clips_of(raw), group, False)


@functools.partial(jax.jit, static_argnames=("graphdef", "group", "lr"))
def adam_step(graphdef, state, xs, y, layout, base, lam, raw: dict, opt_state, group: int, lr: float):
    """One Adam step on the block's raw parameters, on the sum over widths of each width's error
    relative to min-max's (base [3]).  -> raw, opt_state"""

    def loss(p):
        return jnp.sum(lam * output_errors(graphdef, state, xs, y, layout, clips_of(p), group, True) / base)

    updates, opt_state = optax.adam(lr).update(jax.grad(loss)(raw), opt_state, raw)
    return optax.apply_updates(raw, updates), opt_state


@functools.partial(jax.jit, static_argnames=("graphdef", "group"))
def next_inputs(graphdef, state, xs, layout, raw: dict, group: int):
    """X~_(l+1)^(r) = B_l^(r)(X~_l^(r)) for every width.  -> [3, B, T, D]"""
    return jnp.stack([quantized_block(graphdef, state, xs[i], layout, clips_of(raw), r, group, False)
                      for i, r in enumerate(WIDTHS)])


def refine(graphdef, state, xs, y, layout, init: dict, lam, group: int, steps: int, lr: float, tick=None):
    """Adam on one block's raw parameters {name: raw}, from `init`, one compiled step at a time (so
    that Ctrl-C stops within a step; `tick` after each).  -> (raw, errors per width [3] at min-max,
    at the start and after), and the next block's inputs per width [3, B, T, D]"""
    base = errors(graphdef, state, xs, y, layout, None, group)
    start = errors(graphdef, state, xs, y, layout, init, group)
    raw, opt_state = init, optax.adam(lr).init(init)
    for _ in range(steps):
        raw, opt_state = adam_step(graphdef, state, xs, y, layout, jnp.maximum(base, 1e-30), lam, raw, opt_state,
                                   group, lr)
        if tick is not None:
            tick()
    after = errors(graphdef, state, xs, y, layout, raw, group)
    return raw, (base, start, after), next_inputs(graphdef, state, xs, layout, raw, group)


def differentiable_rows(tokens):
    """Rows halved until attention takes its loop-free path (T^2 <= `attention.DIRECT_MAX`), whose
    gradient exists (the blockwise path's key loop has a dynamic end).  [B, T] -> [B 2^n, T / 2^n]"""
    while tokens.shape[1] ** 2 > DIRECT_MAX and tokens.shape[1] % 2 == 0:
        tokens = tokens.reshape(2 * tokens.shape[0], tokens.shape[1] // 2)
    return tokens


def refine_blocks(module, tokens, clips: dict, settings, progress=None) -> tuple[dict, dict]:
    """Refine every block's grids in order, from the per-linear clips {(layer, name): clip}, on
    tokens [B, T] (all real; cut into `differentiable_rows`).  -> (the refined clips, and per block
    each width's output error [3] at min-max, after the per-linear fit and after refinement)"""
    tokens = differentiable_rows(np.asarray(tokens))
    B, T = tokens.shape
    layout = Layout.left_padded(module.cfg, jnp.zeros(B, jnp.int32), T)
    x = blocks.embed(module, jnp.asarray(tokens), layout.positions)
    xs = jnp.stack([x] * len(WIDTHS))
    lam = jnp.asarray(settings.widths_weight, jnp.float32)
    out, report = {}, {}
    for layer, blk in enumerate(module.blocks):
        graphdef, state = nnx.split(blk)
        names = sorted(n for (lay, n) in clips if lay == layer)
        init = {name: raw_of(clips[layer, name]) for name in names}
        y, _ = block(blk, x, layout)
        tick = None if progress is None else (lambda: progress.update(1))
        raw, (base, start, after), xs = refine(graphdef, state, xs, y, layout, init, lam, settings.group_size,
                                               settings.block_steps, settings.block_learning_rate, tick)
        for name in names:
            out[layer, name] = {k: np.asarray(v) for k, v in clip_of(raw[name]).items()}
        report[layer] = {"minmax": np.asarray(base).tolist(), "per_linear": np.asarray(start).tolist(),
                         "block": np.asarray(after).tolist()}
        x = y
    return out, report
