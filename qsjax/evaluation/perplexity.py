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
- tail (long context): windows of max_length tokens ending every stride tokens, each scoring its
  last stride tokens: every scored token sees max_length - stride tokens of context.

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

from qsjax.dense.blocks import lm_logits
from qsjax.evaluation.flops import Flops, needed_flops
from qsjax.dense.model import Model, hidden_states
from qsjax.dense.modules import Transformer
from qsjax.runtime.programs import Programs
from qsjax.runtime.sharding import to_host

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


def tail_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Long-context windows: W = max_length tokens ending every `stride` tokens, each scoring only its
    last `stride` tokens, so that every scored token sees W - stride tokens of context (the first
    W - stride tokens of the stream are context only; tokens after the last full window are not scored)."""
    if not 0 < stride < max_length <= n_tokens:
        raise ValueError(f"need 0 < stride < max_length <= n_tokens (got {stride=}, {max_length=}, {n_tokens=})")
    return [Window(end - max_length, end, end - stride) for end in range(max_length, n_tokens + 1, stride)]


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


def nll_of(z, target):
    """nll_t = logsumexp(z_t) - z_t[target_t].  z [..., V] float32, target [...] int -> [...]"""
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, target[..., None], axis=-1)[..., 0]


def token_nll(model: Transformer, tokens, lengths, offset: int):
    """Negative log-likelihood of tokens offset+1..T-1 of each row, each from the logits one
    position before it, with the LM head run on those positions only (float32).

    tokens [B, T], lengths [B] (unused: right padding never changes a real token's logits)
    -> nll [B, T - 1 - offset], no by-products (None)"""
    start = jnp.zeros(tokens.shape[0], jnp.int32)  # no left padding
    x = hidden_states(model, tokens, start)[:, offset:-1]  # [B, n, D]
    return nll_of(lm_logits(model, x), tokens[:, offset + 1 :]), None


class Scorer:
    """An NLL function of (module, tokens [B, T], lengths [B], offset) -> (nll [B, n], by-products)
    for one model, compiled once per (batch, length, offset). Dense `token_nll` by default;
    QuickSilver passes its own (`quicksilver.evaluate`)."""

    def __init__(self, model: Model, nll_fn=token_nll):
        self.model = model
        self._programs = Programs(lambda state, tokens, lengths, offset: nll_fn(model.module(state), tokens, lengths, offset),
                                  static_argnums=3)

    def arguments(self):
        """The program's first argument: the model's state (a subclass may add values the program
        takes as arguments rather than baking them in)."""
        return self.model.state

    def compile(self, batch: int, length: int, offset: int) -> float:
        """Compile one shape unless already compiled; return the seconds it took."""
        spec = self.model.spec
        return self._programs.compile((batch, length, offset), self.arguments(), spec((batch, length)),
                                      spec((batch,)), offset)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """The (batch, length, offset) shapes compiled so far."""
        return self._programs.keys()

    def score(self, tokens: np.ndarray, lengths: np.ndarray, offset: int):
        """tokens [B, T], lengths [B] real tokens per row -> nll [B, T - 1 - offset] float32, by-products
        (NumPy, whole in every process: see `sharding.to_host`)"""
        self.compile(*tokens.shape, offset)
        out = self._programs((*tokens.shape, offset), self.arguments(), self.model.place(tokens),
                             self.model.place(lengths))
        return to_host(out)

    def __call__(self, tokens: np.ndarray, offset: int, lengths: np.ndarray | None = None) -> np.ndarray:
        """tokens [B, T] (rows of `lengths` real tokens; default: all real) -> nll [B, T - 1 - offset]"""
        lengths = np.full(tokens.shape[0], tokens.shape[1], np.int32) if lengths is None else lengths
        return self.score(np.asarray(tokens, np.int32), np.asarray(lengths, np.int32), offset)[0]


@dataclasses.dataclass
class PerplexityResult:
    nll_sum: float  # sum over scored tokens, accumulated in float64
    tokens_scored: int
    windows: int
    forwards: int  # batches run
    seconds: float  # scoring, compilation excluded
    seconds_compile: float
    flops: Flops  # the work the windows need (see qsjax.evaluation.flops): real tokens, causal pairs, scored positions
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


def evaluate(scorer, stream: np.ndarray, windows: list[Window], batch_size: int = 1, progress: bool = True,
             on_batch=None, desc: str = "perplexity") -> PerplexityResult:
    """Score `windows` of the token stream [N]: compile every shape first (timed apart), then run.

    `scorer` is a `Scorer` or anything with its interface (`model.cfg`, `compile`, `score`).
    `on_batch(batch, lengths, by_products) -> Flops` is told of every batch scored and returns the work
    it took (default: a dense forward's, `flops.needed_flops`)."""
    cfg = scorer.model.cfg
    if on_batch is None:
        on_batch = lambda batch, lengths, _: needed_flops(cfg, lengths.tolist(), int(batch.scored().sum()))
    batches = make_batches(windows, batch_size)
    shapes = list(dict.fromkeys(b.key for b in batches))
    seconds_compile = sum(scorer.compile(*key) for key in shapes)
    token_nll_out = np.full(len(stream), np.nan, np.float32)
    nll_sum, tokens_scored, flops = 0.0, 0, Flops()
    bar = tqdm(total=len(windows), unit="window", file=sys.stderr, disable=not progress, desc=desc)
    t0 = time.perf_counter()
    for batch in batches:
        lengths = np.array([w.length for w in batch.windows], np.int32)
        nll, extra = scorer.score(batch.tokens(stream), lengths, batch.offset)  # [B, n]
        scored = batch.scored()
        token_nll_out[batch.targets()[scored]] = nll[scored]
        nll_sum += float(nll[scored].astype(np.float64).sum())
        tokens_scored += int(scored.sum())
        flops += on_batch(batch, lengths, extra)
        bar.update(len(batch.windows))
        bar.set_postfix(ppl=f"{math.exp(nll_sum / tokens_scored):.3f}")
    seconds = time.perf_counter() - t0
    bar.close()
    return PerplexityResult(
        nll_sum, tokens_scored, len(windows), len(batches), seconds, seconds_compile, flops, token_nll_out, len(shapes)
    )
