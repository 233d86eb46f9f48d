"""Calibrating the nested Matryoshka grids (MatQuant's objective, OmniQuant's learnable clipping).

Every linear layer's weights W stay frozen; only its grids are learned (per group and output column,
`nested`): the clipping gamma, beta of the int8 grid, and the 4- and 2-bit views' own step and
offset factors m_r, o_r, so that the int8, int4 and int2 views together reproduce the layer's
outputs on calibration activations X (the dense model's inputs to that layer):

    min  sum_r  lambda_r  ||X (W - W^(r))||^2 / ||X (W - W^(r)_minmax)||^2,    r in {8, 4, 2}

each width's error relative to plain min-max quantization (so that no width's scale drowns the
others), rounding through the straight-through estimator, Adam (optax). ||X E||^2 = tr(E^T H E)
with H = X^T X / N; H is kept as its top-k eigenvectors plus the rest of its diagonal,
H ~ U_k diag(l_k) U_k^T + diag(d), which makes one step cost k D_in D_out per width. Full-batch and
started from min-max: the result is a function of the weights and the calibration text alone.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qsjax.quicksilver.mechanisms import nested
from qsjax.quicksilver.mechanisms.matryoshka import WIDTHS, QuantizedWeight


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a calibration is (recorded in the store)."""

    group_size: int = 64
    steps: int = 50
    learning_rate: float = 0.05
    rank: int = 64  # eigenvectors of H kept (the rest as its diagonal)
    widths_weight: tuple = (1.0, 1.0, 1.0)  # lambda_r for r = 8, 4, 2
    init_logit: float = 8.0  # gamma = beta = sigmoid(8) = 0.9997 at the start (min-max, nearly)
    block_steps: int = 50  # Adam steps per block of the block-wise refinement that follows (`blockfit`; 0: none)
    block_learning_rate: float = 0.01


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Curvature:
    """H = X^T X / N as factor [k, D_in] (sqrt(l_k) U_k^T) and residual diagonal [D_in]."""

    factor: jax.Array
    diag: jax.Array

    @classmethod
    def of(cls, gram, rank: int) -> Curvature:
        gram = np.asarray(gram, np.float64)
        vals, vecs = np.linalg.eigh(gram)
        vals, vecs = np.clip(vals[::-1][:rank], 0, None), vecs[:, ::-1][:, :rank]
        factor = np.sqrt(vals)[:, None] * vecs.T
        diag = np.clip(np.diag(gram) - (factor ** 2).sum(0), 0, None)
        return cls(jnp.asarray(factor, jnp.float32), jnp.asarray(diag, jnp.float32))

    def energy(self, e):
        """tr(E^T H E) ~ ||X E||^2 / N.  e [D_in, D_out] -> scalar"""
        return jnp.sum((self.factor @ e) ** 2) + jnp.sum(self.diag[:, None] * e ** 2)


def clip_of(raw: dict) -> dict:
    """The learned raw parameters -> the clip `nested` reads: gamma, beta = sigmoid(a, b); m_r = exp(l_r)."""
    clip = {"gamma": jax.nn.sigmoid(raw["a"]), "beta": jax.nn.sigmoid(raw["b"])}
    for r in WIDTHS[1:]:
        clip[f"step{r}"], clip[f"offset{r}"] = jnp.exp(raw[f"l{r}"]), raw[f"o{r}"]
    return clip


def raw_of(clip: dict) -> dict:
    """The inverse of `clip_of`: a clip {gamma, beta, step_r, offset_r} -> the raw parameters Adam moves."""
    logit = lambda p: jnp.log(p) - jnp.log1p(-p)  # noqa: E731
    raw = {"a": logit(jnp.clip(jnp.asarray(clip["gamma"]), 1e-6, 1 - 1e-6)),
           "b": logit(jnp.clip(jnp.asarray(clip["beta"]), 1e-6, 1 - 1e-6))}
    for r in WIDTHS[1:]:
        raw[f"l{r}"], raw[f"o{r}"] = jnp.log(jnp.asarray(clip[f"step{r}"])), jnp.asarray(clip[f"offset{r}"])
    return raw


def initial(shape, init_logit: float) -> dict:
    raw = {"a": jnp.full(shape, init_logit), "b": jnp.full(shape, init_logit)}
    for r in WIDTHS[1:]:
        raw[f"l{r}"], raw[f"o{r}"] = jnp.zeros(shape), jnp.zeros(shape)
    return raw


def view_energies(w, curv: Curvature, clip: dict | None, group: int, train: bool):
    """Each width's output error energy under `clip` (None: min-max).  -> [3]"""
    v = nested.views(w, clip, group, WIDTHS, train)
    return jnp.stack([curv.energy(w - v[r]) for r in WIDTHS])


@functools.partial(jax.jit, static_argnames=("group", "steps", "lr"))
def fit(w, curv: Curvature, init: dict, lam, group: int, steps: int, lr: float):
    """Adam on the raw parameters; -> (learned raw parameters, energies before [3], after [3])."""
    base = view_energies(w, curv, None, group, False)
    opt = optax.adam(lr)

    def loss(p):
        return jnp.sum(lam * view_energies(w, curv, clip_of(p), group, True) / jnp.maximum(base, 1e-30))

    def step(_, carry):
        p, state = carry
        g = jax.grad(loss)(p)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state

    p, _ = jax.lax.fori_loop(0, steps, step, (init, opt.init(init)))
    return p, base, view_energies(w, curv, clip_of(p), group, False)


@dataclasses.dataclass(frozen=True)
class LayerFit:
    clip: dict  # name -> [G, D_out] numpy (gamma, beta, step4, offset4, step2, offset2)
    before: list  # output error energy per width, min-max
    after: list  # and calibrated


def calibrate_weight(w, gram, s: Settings) -> LayerFit:
    """Learn one weight's grids (w [D_in, D_out], gram [D_in, D_in])."""
    w = jnp.asarray(w, jnp.float32)
    lo, _ = nested.group_range(w, s.group_size)
    curv = Curvature.of(gram, min(s.rank, w.shape[0]))
    raw, before, after = fit(w, curv, initial(lo.shape, s.init_logit), jnp.asarray(s.widths_weight), s.group_size,
                             s.steps, s.learning_rate)
    return LayerFit({k: np.asarray(v) for k, v in clip_of(raw).items()},
                    np.asarray(before).tolist(), np.asarray(after).tolist())


def nested_quantizer(clip: dict | None, group: int):
    """w -> its nested QuantizedWeight under a learned clip ({name: [G, D_out]}); None: min-max."""

    def quantize(w) -> QuantizedWeight:
        arrays = None if clip is None else {k: jnp.asarray(v) for k, v in clip.items()}
        codes, steps, offsets = nested.quantize_nested(w, group, arrays)
        return QuantizedWeight(codes, steps, offsets, group)

    return quantize


def input_grams(module, tokens, progress=None) -> list[dict]:
    """Each block's linear layers' input second moments X^T X / N over the dense model's activations on
    tokens [B, T] (all real).  -> per block {name: [D_in, D_in] numpy}"""
    from qsjax.dense import blocks
    from qsjax.dense.model import Layout, block

    B, T = tokens.shape
    w = Layout.left_padded(module.cfg, jnp.zeros(B, jnp.int32), T)
    x = blocks.embed(module, jnp.asarray(tokens), w.positions)
    out = []
    for blk in module.blocks:
        names = {id(v): k for k, v in vars(blk).items()}
        grams = {}

        def record(m, h):
            flat = h.reshape(-1, h.shape[-1]).astype(jnp.float32)
            grams[names[id(m)]] = np.asarray(flat.T @ flat / flat.shape[0])
            return m(h)

        x, _ = block(blk, x, w, record)
        out.append(grams)
        if progress is not None:
            progress.update(1)
    return out
