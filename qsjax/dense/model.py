"""Dense forward passes, compiled as pure functions over the model's split state.

    x^0   = embed(tokens, positions)
    x^l   = block_l(x^(l-1))          l = 1..L
    logits = lm_head(norm(x^L))

Layers are numbered 1..L, as in the papers ("after layer l" = once block l has run); block l is
`model.blocks[l - 1]`. Full windows run the blocks unrolled when short and as a `lax.scan` over
stacked weights when long (`scan_blocks`); decode steps are unrolled.

`Model` holds the NNX graph definition and state (`nnx.split` once) and the jitted functions:
`prefill` (prompt -> last logits and a filled KV cache), `decode_step` (one token per row, the
cache donated) and `logits` (a whole causal window, e.g. for perplexity).

The seams for extensions: `decode_step` takes an optional per-layer key mask and
score bias (absent, they compile to nothing), every block takes the `linear` map to apply its
weights with, and attention is the one function `qsjax.dense.attention.attention`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qsjax.dense import blocks
from qsjax.dense.config import ModelConfig
from qsjax.dense.kvcache import KVCache
from qsjax.dense.modules import Transformer
from qsjax.dense.rope import rope_angles

# Up to this many tokens (batch x length) a full-window pass runs its layers unrolled, each reading
# its weights in place: on a 2-core CPU 12-25% faster than a scan for 512-1,024 tokens and 6x faster
# for a 16-token prompt (a scan must first stack every layer's weights, ~0.25 s for 135 M parameters),
# at 3-4x the compile time. Longer inputs scan over the weights stacked inside jit.
UNROLL_TOKENS = 1024


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each token of a batch of causal windows sits, [B, T] each (cos, sin [B, T, Dh/2]):
    what every layer needs besides the states.

    slots: the order of each token in its row (0..T-1; attention's causal rule); valid: real tokens
    (not padding); positions: what RoPE and the position embedding see."""

    positions: jax.Array
    cos: jax.Array
    sin: jax.Array
    slots: jax.Array
    valid: jax.Array

    @classmethod
    def left_padded(cls, cfg: ModelConfig, start, T: int) -> Layout:
        """Rows padded on the left: row b's real tokens in slots start[b]..T-1, slot s at position s - start[b]."""
        slots = jnp.arange(T, dtype=jnp.int32)[None, :]
        return cls.of(cfg, jnp.maximum(slots - start[:, None], 0), slots >= start[:, None])

    @classmethod
    def of(cls, cfg: ModelConfig, positions, valid) -> Layout:
        """Rows with the given positions and real tokens [B, T] (e.g. right padding)."""
        B, T = positions.shape
        cos, sin = rope_angles(cfg, positions)
        return cls(positions, cos, sin, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), valid)


def block(blk, x, w: Layout, linear=blocks.call, window=None):
    """One transformer block over full causal windows.  x [B, T, D] -> x [B, T, D], (k, v [B, T, K, Dh])
    window: a local attention rule (`attention`'s), None for full causal attention."""
    q, k, v = blocks.qkv(blk, x, w.cos, w.sin, linear)  # [B, T, H, Dh], [B, T, K, Dh] x 2
    o = blocks.attend(blk, q, k, v, w.slots, w.slots, w.valid, window=window)
    return blocks.tail(blk, x, o, linear), (k, v)


def layer_period(blks) -> int:
    """The smallest P such that block i and block i + P have one structure (the same static options:
    e.g. 2 for Gemma 2's alternating local and global layers; 1 when all are alike)."""
    defs = [nnx.graphdef(b) for b in blks]
    return next(p for p in range(1, len(defs) + 1) if all(defs[i] == defs[i + p] for i in range(len(defs) - p)))


def scan_layers(model: Transformer, first: int, last: int, step, carry):
    """`lax.scan` of step(carry, block, layer) -> (carry, out) over layers first+1..last (1-based
    `layer`, traced), their weights stacked inside jit. Blocks whose static options alternate with a
    period P (`layer_period`) are scanned P at a time (each step runs P blocks, one of each kind), the
    last (last - first) mod P unrolled after.  -> carry, outs stacked [last - first, ...]"""
    blks = [model.blocks[i] for i in range(first, last)]
    P = layer_period(blks)
    if P == 1:
        graphdef = nnx.graphdef(blks[0])
        stacked = jax.tree.map(lambda *w: jnp.stack(w), *[nnx.state(b) for b in blks])
        return jax.lax.scan(lambda c, xs: step(c, nnx.merge(graphdef, xs[0]), xs[1]), carry,
                            (stacked, jnp.arange(first + 1, last + 1)))
    n = len(blks) // P
    graphdefs = [nnx.graphdef(b) for b in blks[:P]]
    stacked = [jax.tree.map(lambda *w: jnp.stack(w), *[nnx.state(b) for b in blks[j:n * P:P]]) for j in range(P)]

    def period(c, xs):
        states, base = xs
        outs = []
        for j in range(P):
            c, out = step(c, nnx.merge(graphdefs[j], states[j]), base + j)
            outs.append(out)
        return c, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    carry, outs = jax.lax.scan(period, carry, (stacked, jnp.arange(n, dtype=jnp.int32) * P + first + 1))
    outs = [jax.tree.map(lambda a: a.reshape(n * P, *a.shape[2:]), outs)]
    for i in range(n * P, len(blks)):
        carry, out = step(carry, blks[i], jnp.int32(first + i + 1))
        outs.append(jax.tree.map(lambda a: a[None], out))
    return carry, jax.tree.map(lambda *a: jnp.concatenate(a), *outs)


def scan_blocks(model: Transformer, x, w: Layout):
    """All L blocks over full windows, unrolled up to UNROLL_TOKENS tokens, else scanned.
    x [B, T, D] -> x [B, T, D], k and v [L, B, T, K, Dh]"""
    if x.shape[0] * x.shape[1] <= UNROLL_TOKENS:
        outs = []
        for blk in model.blocks:
            x, kv = block(blk, x, w)
            outs.append(kv)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return scan_layers(model, 0, len(model.blocks), lambda x, blk, _: block(blk, x, w), x)


def hidden_states(model: Transformer, tokens, start):
    """The last block's output (before the final norm) for every slot of left-padded causal
    windows.  tokens [B, T], start [B] -> x^L [B, T, D]"""
    w = Layout.left_padded(model.cfg, start, tokens.shape[1])
    x, _ = scan_blocks(model, blocks.embed(model, tokens, w.positions), w)
    return x


def window_logits(model: Transformer, tokens, start):
    """Logits for every slot of left-padded causal windows.  tokens [B, T], start [B] -> [B, T, V]"""
    return blocks.lm_logits(model, hidden_states(model, tokens, start))


def prefill(model: Transformer, tokens, start, cache_length: int):
    """Run a left-padded prompt batch and fill a fresh cache.

    tokens [B, T] (row b's real tokens in slots start[b]..T-1) -> last logits [B, V], KVCache
    with index = T."""
    w = Layout.left_padded(model.cfg, start, tokens.shape[1])
    x, (k, v) = scan_blocks(model, blocks.embed(model, tokens, w.positions), w)
    return blocks.lm_logits(model, x[:, -1]), KVCache.from_window(k, v, start, cache_length)


def decode_step(model: Transformer, cache: KVCache, tokens, key_mask=None, key_bias=None):
    """One new token per row, slot cache.index.  tokens [B] -> logits [B, V], new cache.

    key_mask[l] [B, S_l] bool: which cached entries layer l may attend to besides the new token's own
    (None: every one); key_bias[l] [B, S_l]: added to their scores (None: nothing); an [L, B, S] array
    or a tuple per layer. The cache writes each layer's entry and attends (`cache.attend`): a plain
    KVCache, or one that evicts (`qsjax.kvpolicy.eviction`).
    Layers are unrolled: decoding is dominated by reading weights and the cache, and a scan would
    add a dynamic slice (a copy) of every weight and cache layer per step."""
    positions = cache.positions()[:, None]  # [B, 1]
    cos, sin = rope_angles(model.cfg, positions)
    x = blocks.embed(model, tokens[:, None], positions)  # [B, 1, D]
    for l, blk in enumerate(model.blocks):
        q, k, v = blocks.qkv(blk, x, cos, sin)
        mask = None if key_mask is None else key_mask[l]
        cache, o = cache.attend(l, q, k, v, mask, None if key_bias is None else key_bias[l], rule=blocks.rule(blk))
        x = blocks.tail(blk, x, o)
    return blocks.lm_logits(model, x[:, 0]), cache.advance()


@dataclasses.dataclass(frozen=True)
class Sublayers:
    """Which sublayers a pass runs (static): layers (1-based) whose attention, or whose MLP, is
    skipped; a skipped sublayer leaves the residual stream unchanged (and a skipped attention
    writes no cache entry). Empty: the whole model."""

    attention: frozenset = frozenset()
    mlp: frozenset = frozenset()


def run_step(model: Transformer, cache: KVCache, tokens, lead, key_mask=None, key_bias=None,
             skip: Sublayers = Sublayers()):
    """A run of T tokens per row through the cache, row b's at slots index + lead[b] + j (speculative
    decoding: the last token and the drafts after it, verified in one pass; T = 1 with lead = 0 is
    `decode_step`).  tokens [B, T], lead [B] -> logits [B, T, V], the cache with the run written
    (not advanced: the caller moves each row's lead by what it accepts).
    key_mask, key_bias: as `decode_step`'s, and they must show every place of the run."""
    positions = cache.positions()[:, None] + lead[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    cos, sin = rope_angles(model.cfg, positions)
    x = blocks.embed(model, tokens, positions)  # [B, T, D]
    for l, blk in enumerate(model.blocks):
        if l + 1 not in skip.attention:
            q, k, v = blocks.qkv(blk, x, cos, sin)
            cache, o = cache.run_attend(l, q, k, v, lead, None if key_mask is None else key_mask[l],
                                        None if key_bias is None else key_bias[l], rule=blocks.rule(blk))
            x = blocks.attn_residual(blk, x, o)
        if l + 1 not in skip.mlp:
            x = blocks.mlp_residual(blk, x)
    return blocks.lm_logits(model, x), cache


@dataclasses.dataclass
class Model:
    """A loaded model: config, NNX graph definition and state, its compiled functions, and (when
    sharded, see `qsjax.runtime.sharding.shard_model`) the mesh its inputs are placed on."""

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    mesh: jax.sharding.Mesh | None = None

    @classmethod
    def from_module(cls, module: Transformer) -> Model:
        graphdef, state = nnx.split(module)
        return cls(module.cfg, graphdef, state)

    @property
    def dtype(self):
        return jax.tree.leaves(self.state)[0].dtype

    def module(self, state=None) -> Transformer:
        return nnx.merge(self.graphdef, self.state if state is None else state)

    def place(self, batch):
        """An input batch [B, ...] on the model's devices: rows over the mesh's "data" axis when sharded."""
        from qsjax.runtime.sharding import shard_batch

        return jnp.asarray(batch) if self.mesh is None else shard_batch(batch, self.mesh)

    def spec(self, shape: tuple, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        """The abstract input `place` gives for an array of this shape (to compile ahead of time)."""
        from qsjax.runtime.sharding import batch_sharding

        sharding = None if self.mesh is None else batch_sharding(shape[0], self.mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    @functools.cached_property
    def _logits(self):
        return jax.jit(lambda state, tokens, start: window_logits(self.module(state), tokens, start))

    @functools.cached_property
    def _prefill(self):
        f = lambda state, tokens, start, n: prefill(self.module(state), tokens, start, n)
        return jax.jit(f, static_argnums=3)

    @functools.cached_property
    def _decode(self):
        f = lambda state, cache, tokens: decode_step(self.module(state), cache, tokens)
        return jax.jit(f, donate_argnums=1)

    def _inputs(self, tokens, start):
        tokens = self.place(jnp.asarray(tokens, jnp.int32))
        start = jnp.zeros(tokens.shape[0], jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        return tokens, self.place(start)

    def logits(self, tokens, start=None):
        """tokens [B, T] -> logits [B, T, V] of causal windows, left-padded up to slot start[b]."""
        return self._logits(self.state, *self._inputs(tokens, start))

    def prefill(self, tokens, start, cache_length: int):
        return self._prefill(self.state, *self._inputs(tokens, start), cache_length)

    def decode_step(self, cache: KVCache, tokens):
        return self._decode(self.state, cache, self.place(jnp.asarray(tokens, jnp.int32)))
