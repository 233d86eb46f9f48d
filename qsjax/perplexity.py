"""Perplexity of a token stream: windowing protocols and the compiled scoring function.

A window holds tokens begin..end-1 of the stream and scores tokens first_scored..end-1, token t
predicted from the logits at t-1 (so the first token of the stream is never scored):

    nll_t = logsumexp(z_{t-1}) - z_{t-1}[token_t],    z = lm_head(norm(x^L))    (float32)
    perplexity = exp(sum of nll_t / number of tokens scored)

Protocols:
- strided (Hugging Face, "Perplexity of fixed-length models"): windows begin at 0, stride,
  2 stride, ... and end at min(begin + max_length, N); each scores the tokens no earlier window
  scored, stopping at the window that reaches the end of the stream.
- disjoint (GPTQ): floor(N / seqlen) windows side by side; each scores all its tokens but the
  first; the tail shorter than seqlen is dropped.

Every window is padded on the right to the longest window (the model is causal, so padding never
changes the logits of real tokens; padded positions are not scored). Windows run in batches that
share an `offset`: the LM head runs only on positions offset..T-2 of each row (a static slice),
so the [B, T, V] logits of unscored positions are never computed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qsjax.flops import Flops, dense_forward_flops
from qsjax.model import Model, hidden_states
from qsjax.modules import Transformer

PAD_ID = 0  # fills the right end of a short window; any valid id would do, it is never scored


@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens begin..end-1 of the stream; tokens first_scored..end-1 are scored (first_scored > begin)."""

    begin: int
    end: int
    first_scored: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def n_scored(self) -> int:
        return self.end - self.first_scored

    @property
    def offset(self) -> int:
        """The window position whose logits predict the first scored token."""
        return self.first_scored - self.begin - 1


def strided_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Hugging Face's sliding window.  Their loop, with labels -100 outside the last trg_len tokens:

        prev_end = 0
        for begin in range(0, N, stride):
            end = min(begin + max_length, N)
            trg_len = end - prev_end            # the last trg_len tokens are labelled
            ...                                  # the loss shifts labels by one: token `begin` is never scored
            prev_end = end
            if end == N: break

    Every token after the first is scored exactly once when stride < max_length (with
    stride == max_length the first token of every window goes unscored, as in Hugging Face's loop).
    """
    if not 0 < stride <= max_length or n_tokens < 2:
        raise ValueError(
            f"need 0 < stride <= max_length and at least 2 tokens (got {stride=}, {max_length=}, {n_tokens=})"
        )
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def disjoint_windows(n_tokens: int, seqlen: int) -> list[Window]:
    """GPTQ's windows: tokens i seqlen .. (i+1) seqlen - 1 for i < floor(N / seqlen), all scored but the first."""
    if not 2 <= seqlen <= n_tokens:
        raise ValueError(f"need 2 <= seqlen <= n_tokens (got {seqlen=}, {n_tokens=})")
    return [Window(b, b + seqlen, b + 1) for b in range(0, n_tokens - seqlen + 1, seqlen)]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Windows run together, each padded on the right to `length`; the LM head runs on positions
    offset..length-2 of every row."""

    windows: tuple[Window, ...]
    length: int
    offset: int

    @property
    def key(self) -> tuple[int, int, int]:
        """(batch, length, offset): what the compiled scoring function depends on."""
        return len(self.windows), self.length, self.offset

    @property
    def n_predicted(self) -> int:
        """Positions per row whose logits are computed."""
        return self.length - 1 - self.offset

    def tokens(self, stream: np.ndarray) -> np.ndarray:
        """-> [B, T] int32, short windows padded with PAD_ID"""
        out = np.full((len(self.windows), self.length), PAD_ID, np.int32)
        for row, w in zip(out, self.windows):
            row[: w.length] = stream[w.begin : w.end]
        return out

    def targets(self) -> np.ndarray:
        """Stream index of the token each computed prediction is for.  -> [B, n_predicted] int"""
        begins = np.array([w.begin for w in self.windows])
        return begins[:, None] + self.offset + 1 + np.arange(self.n_predicted)

    def scored(self) -> np.ndarray:
        """Which computed predictions are scored (not padding, not scored by an earlier window).
        -> [B, n_predicted] bool"""
        first = np.array([w.first_scored for w in self.windows])[:, None]
        end = np.array([w.end for w in self.windows])[:, None]
        t = self.targets()
        return (t >= first) & (t < end)


def make_batches(windows: list[Window], batch_size: int) -> list[Batch]:
    """Consecutive windows with the same offset, up to `batch_size` at a time, all padded to the
    longest window.  Shapes: one per offset (strided: the first window, then the rest), plus the
    last, smaller batch of each."""
    length = max(w.length for w in windows)
    batches, run = [], []
    for w in windows:
        if run and (len(run) == batch_size or w.offset != run[0].offset):
            batches.append(Batch(tuple(run), length, run[0].offset))
            run = []
        run.append(w)
    batches.append(Batch(tuple(run), length, run[0].offset))
    return batches


def token_nll(model: Transformer, tokens, offset: int):
    """Negative log-likelihood of tokens offset+1..T-1 of each row, each from the logits one
    position before it, with the LM head run on those positions only (float32).

    tokens [B, T] -> nll [B, T - 1 - offset]"""
    start = jnp.zeros(tokens.shape[0], jnp.int32)  # no left padding
    x = hidden_states(model, tokens, start)[:, offset:-1]  # [B, n, D]
    z = model.logits(x)  # [B, n, V] float32
    target = tokens[:, offset + 1 :]  # [B, n]
    z_target = jnp.take_along_axis(z, target[..., None], axis=-1)[..., 0]  # [B, n]
    return jax.nn.logsumexp(z, axis=-1) - z_target


class Scorer:
    """`token_nll` for one model, jitted once and compiled once per (batch, length, offset)."""

    def __init__(self, model: Model):
        self.model = model
        f = lambda state, tokens, offset: token_nll(model.module(state), tokens, offset)
        self._jit = jax.jit(f, static_argnums=2)
        self._compiled: dict[tuple[int, int, int], jax.stages.Compiled] = {}

    def compile(self, batch: int, length: int, offset: int) -> float:
        """Compile one shape unless already compiled; return the seconds it took."""
        key = (batch, length, offset)
        if key in self._compiled:
            return 0.0
        t0 = time.perf_counter()
        spec = jax.ShapeDtypeStruct((batch, length), jnp.int32)
        self._compiled[key] = self._jit.lower(self.model.state, spec, offset).compile()
        return time.perf_counter() - t0

    def __call__(self, tokens: np.ndarray, offset: int) -> np.ndarray:
        """tokens [B, T] -> nll [B, T - 1 - offset] float32"""
        self.compile(*tokens.shape, offset)
        return np.asarray(self._compiled[(*tokens.shape, offset)](self.model.state, tokens))


@dataclasses.dataclass
class PerplexityResult:
    nll_sum: float  # sum over scored tokens, accumulated in float64
    tokens_scored: int
    windows: int
    forwards: int  # batches run
    seconds: float  # scoring, compilation excluded
    seconds_compile: float
    flops: Flops  # executed work: padding and every computed LM head position included
    token_nll: np.ndarray  # [N] float32: each stream token's NLL, NaN where not scored
    programs: int = 1  # distinct compiled programs (one per window shape)

    @property
    def nll_mean(self) -> float:
        return self.nll_sum / self.tokens_scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_mean)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds > 0 else float("nan")

    def to_json(self) -> dict:
        return {
            "tokens_scored": self.tokens_scored,
            "windows": self.windows,
            "forwards": self.forwards,
            "nll_mean": self.nll_mean,
            "perplexity": self.perplexity,
            "seconds": self.seconds,
            "seconds_compile": self.seconds_compile,
            "programs_compiled": self.programs,
            "seconds_total": self.seconds + self.seconds_compile,
            "tokens_per_second": self.tokens_per_second,
            "flops": self.flops.to_json(self.tokens_scored),
        }


def evaluate(
    scorer: Scorer, stream: np.ndarray, windows: list[Window], batch_size: int = 1, progress: bool = True
) -> PerplexityResult:
    """Score `windows` of the token stream [N]: compile every shape first (timed apart), then run."""
    cfg = scorer.model.cfg
    batches = make_batches(windows, batch_size)
    shapes = list(dict.fromkeys(b.key for b in batches))
    seconds_compile = sum(scorer.compile(*key) for key in shapes)
    token_nll_out = np.full(len(stream), np.nan, np.float32)
    nll_sum, tokens_scored, flops = 0.0, 0, Flops()
    bar = tqdm(total=len(windows), unit="window", file=sys.stderr, disable=not progress, desc="perplexity")
    t0 = time.perf_counter()
    for batch in batches:
        nll = scorer(batch.tokens(stream), batch.offset)  # [B, n]
        scored = batch.scored()
        token_nll_out[batch.targets()[scored]] = nll[scored]
        nll_sum += float(nll[scored].astype(np.float64).sum())
        tokens_scored += int(scored.sum())
        flops += dense_forward_flops(cfg, len(batch.windows), batch.length, len(batch.windows) * batch.n_predicted)
        bar.update(len(batch.windows))
        bar.set_postfix(ppl=f"{math.exp(nll_sum / tokens_scored):.3f}")
    seconds = time.perf_counter() - t0
    bar.close()
    return PerplexityResult(
        nll_sum, tokens_scored, len(windows), len(batches), seconds, seconds_compile, flops, token_nll_out, len(shapes)
    )
