"""The Generator: a model and its tokenizer with compiled generation programs (`python -m qsjax.generate`
is its command line). Prompts are left padded to a bucket; the prefill with the first new token and
the decode loop are compiled apart and timed apart (time to first token, decode speed)."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from qsjax.dense.kvcache import cache_bytes, dense_cache_bytes
from qsjax.dense.model import Model
from qsjax.dense.sampler import Decoding, LoopState, Sampling, decode_loop, dense_decode, dense_prefill, first_token
from qsjax.kvpolicy.eviction import Eviction, evicting_prefill
from qsjax.quicksilver.decoding.compacted import compact, kept_places, visible_counts
from qsjax.quicksilver.decoding.steps import generated_to_json, prepare, quicksilver_decode, quicksilver_prefill
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.runtime.buckets import cache_slots, prompt_bucket
from qsjax.runtime.cli import UsageError
from qsjax.runtime.generation_report import GenerationResult
from qsjax.runtime.programs import Programs
from qsjax.runtime.sharding import to_host
from qsjax.speculative.loop import speculative_loop
from qsjax.speculative.settings import Speculation


@dataclasses.dataclass(frozen=True)
class Static:
    """What the prefill and decode programs are compiled for (jit's static argument: hashable,
    compared by value): the new tokens, the cache's slots, the sampling mode (temperature and top_p
    fixed at 1: they are traced knobs, not part of the program), the end and pad tokens, and the
    stream callback (one program per distinct callback)."""

    max_new_tokens: int
    cache_length: int
    sampling: Sampling
    eos_ids: tuple[int, ...]
    pad_id: int
    stream: object = None


@dataclasses.dataclass(frozen=True)
class ProgramKey:
    """What a call's prefill and decode programs are keyed by: the batch's rows, its prompt bucket
    and the static argument."""

    batch: int
    bucket: int
    static: Static


@dataclasses.dataclass(frozen=True)
class DecodeKey:
    """The compaction and decode programs' key: the call's ProgramKey and the places each layer of the
    compacted cache keeps (None: the cache is not compacted)."""

    program: ProgramKey
    kept: tuple[int, ...] | None = None


@dataclasses.dataclass
class Seconds:
    """One call's timings: compilation, the prefill with the first token (and the cache's
    compaction), and the decode loop with the transfer of its tokens to the host."""

    compile: float = 0.0
    first: float = 0.0
    decode: float = 0.0


class Generator:
    """A model and its tokenizer, with two compiled programs per (batch, prompt bucket, new-token
    count, sampling mode, stream callback): the prefill with the first new token, and the decode
    loop for the rest (timed apart: time to first token, decode speed)."""

    def __init__(self, model: Model, tokenizer, quicksilver: QuickSilverConfig | None = None, mesh=None,
                 eviction: Eviction | None = None, speculation: Speculation | None = None):
        """`mesh`: a qsjax.runtime.sharding mesh to shard the model over (after AMQ quantization, so that the
        int8 weights are placed by the same rules); `eviction`: hold the dense cache to a budget;
        `speculation`: decode speculatively (`qsjax.speculative`), on the dense cache, an evicting one or
        a QuickSilver prompt's (scope context)."""
        self.quicksilver = quicksilver if quicksilver is not None and quicksilver.enabled else None
        self.kv_dtype = model.dtype  # the float model's: its keys and values (AMQ may store int8 weights)
        if eviction is not None and self.quicksilver is not None:
            raise ValueError("eviction applies to the dense model's cache, not with QuickSilver")
        self.eviction = eviction
        self.speculation = speculation
        if speculation is not None:
            check_speculation(speculation, self.quicksilver, model.cfg.n_layers)
        self.model = model if self.quicksilver is None else prepare(model, self.quicksilver)
        if mesh is not None:
            from qsjax.runtime.sharding import shard_model

            self.model = shard_model(self.model, mesh)
        self.tokenizer = tokenizer
        self.eos_ids = tuple(sorted(set(model.cfg.eos_ids) | set(tokenizer.eos_ids)))
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (self.eos_ids or (0,))[0]
        self._first = Programs(self._first_token, static_argnums=(5,))  # static: Static
        self._compact = Programs(self._compact_cache, static_argnums=(1,))  # static: DecodeKey
        self._decode = Programs(self._decode_loop, static_argnums=(5,), donate_argnums=(1,))  # static: Static

    @property
    def compacts(self) -> bool:
        """Whether decoding runs on a compacted cache (QuickSilver, scope=context, not the masked reference)."""
        qs = self.quicksilver
        return qs is not None and qs.scope == "context" and qs.compact

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return self.tokenizer.encode_prompt(prompt, chat)

    def _steps(self, static: Static):
        """-> (Decoding, prefill_fn, decode_fn) for sampler.first_token / decode_loop."""
        max_new, stream = static.max_new_tokens, static.stream
        on_token = None if stream is None else (lambda step, toks: stream(int(toks[0])))
        d = Decoding(max_new, static.sampling, static.eos_ids, static.pad_id, on_token)
        if self.eviction is not None:
            rule = self.eviction

            def evicting(module, tokens, start, cache_length):
                return *evicting_prefill(module, tokens, start, rule, max_new), None

            return d, evicting, dense_decode
        if self.quicksilver is None:
            return d, dense_prefill, dense_decode
        qs = self.quicksilver

        def prefill_fn(module, tokens, start, cache_length):
            p = quicksilver_prefill(qs, module, tokens, start, cache_length)
            return p.logits, p.state, p.summary()

        return d, prefill_fn, functools.partial(quicksilver_decode, qs)

    def _first_token(self, state, tokens, start, rng, knobs, static: Static):
        """Prefill and the first new token (compiled per `static`)."""
        d, prefill_fn, decode_fn = self._steps(static)
        return first_token(self.model.module(state), tokens, start, rng, knobs, d, cache_length=static.cache_length,
                           prefill_fn=prefill_fn, decode_fn=decode_fn)

    def _decode_loop(self, state, loop: LoopState, prompt, start, knobs, static: Static):
        """The rest of the new tokens (compiled per `static`; the loop state's buffers are donated), plainly
        or speculatively (which reads the padded prompt [B, T] and each row's start [B]).
        -> LoopState, the speculative Tally (None when plain)"""
        d, _, decode_fn = self._steps(static)
        module = self.model.module(state)
        if self.speculation is None:
            return decode_loop(module, loop, knobs, d, decode_fn=decode_fn), None
        stream = static.stream
        on_tokens = None if stream is None else (lambda toks, n: [stream(int(t)) for t in toks[0, : int(n[0])]])
        return speculative_loop(module, loop, prompt, start, knobs, d, self.speculation, on_tokens)

    def _compact_cache(self, loop: LoopState, key: DecodeKey) -> LoopState:
        """The prompt's cache, each layer gathered to the entries it shows (`key.kept` places each)."""
        room = key.program.static.max_new_tokens + self.draft_room
        return dataclasses.replace(loop, cache=compact(loop.cache, key.kept, room))

    @property
    def draft_room(self) -> int:
        """Cache places beyond the new tokens: a verify pass writes K drafts past a row's last token."""
        return 0 if self.speculation is None else self.speculation.num_tokens

    @property
    def programs(self) -> int:
        """Distinct compiled programs so far: per batch, prompt bucket, new-token count, sampling mode and
        stream callback, a prefill with the first new token and a decode loop (on a compacted cache,
        a compaction program and a decode loop per tuple of per-layer sizes); under QuickSilver each
        switches between its layers' compaction buckets inside."""
        return len(self._first) + len(self._compact) + len(self._decode)

    def check(self, prompts: list[list[int]], max_new_tokens: int):
        """Raise UsageError for an empty prompt or one that does not fit the context with the new tokens."""
        if min(len(p) for p in prompts) == 0:
            raise UsageError("empty prompt: give at least one character of text")
        longest, context = max(len(p) for p in prompts), self.model.cfg.max_positions
        if longest + max_new_tokens > context:
            raise UsageError(
                f"prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's context of "
                f"{context} tokens; shorten the prompt or lower --max-new-tokens"
            )

    def __call__(self, prompts: list[list[int]], *, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 seed: int = 0, stream=None) -> GenerationResult:
        """Generate for token-id prompts.  `stream(token_id)` is called as each token of a single
        prompt is produced (programs are compiled for each distinct callback)."""
        self.check(prompts, max_new_tokens)
        batch, start = self._pad(prompts)
        key = self._program_key(batch.shape, max_new_tokens, sampling, stream)
        knobs = (jnp.float32(sampling.temperature), jnp.float32(sampling.top_p))
        seconds = Seconds()
        loop, prompt_summary = self._prefill(key, batch, start, jax.random.key(seed), knobs, seconds)
        loop, decode_key = self._compact_if_needed(key, loop, seconds)
        kv_bytes = self._kv_bytes(key, loop)  # before decoding: the loop state is donated to it
        out, record, tally = self._decode_rest(decode_key, loop, self.model.place(batch), self.model.place(start), knobs,
                                               seconds)
        ids = self._trim(out)
        decoded = sum(max(0, len(r) - 1) for r in ids)  # tokens the decode loop delivered
        speculation = None if tally is None else tally.to_json(self.speculation, self.model.cfg, decoded)
        return GenerationResult([self.tokenizer.decode(r) for r in ids], ids, [len(p) for p in prompts], seconds.first,
                                seconds.decode, seconds.compile, kv_bytes, self._report(prompt_summary, start, record),
                                speculation)

    def _pad(self, prompts: list[list[int]]):
        """The prompts left padded to their bucket (every row's next token goes to slot T).
        -> tokens [B, T] int32, start [B] int32 (each row's first real slot)"""
        lengths = [len(p) for p in prompts]
        T = prompt_bucket(max(lengths), self.model.cfg.max_positions)
        batch = np.full((len(prompts), T), self.pad_id, np.int32)
        for row, p in zip(batch, prompts):
            row[T - len(p):] = p
        return batch, np.array([T - n for n in lengths], np.int32)

    def _program_key(self, shape, max_new_tokens: int, sampling: Sampling, stream) -> ProgramKey:
        """The programs' key for a padded batch of `shape` (B, T)."""
        B, T = shape
        fixed = dataclasses.replace(sampling, temperature=1.0, top_p=1.0)  # traced values, not part of the program
        return ProgramKey(B, T, Static(max_new_tokens, cache_slots(T, max_new_tokens + self.draft_room), fixed,
                                       self.eos_ids, self.pad_id, stream))

    def _kv_bytes(self, key: ProgramKey, loop: LoopState) -> dict:
        """The dense KVCache's bytes for this batch and length, and what decoding carries."""
        dense = dense_cache_bytes(self.model.cfg, key.batch, key.static.cache_length, self.kv_dtype)
        return {"dense": dense, "this_setting": cache_bytes(loop.cache)}

    def _prefill(self, key: ProgramKey, batch, start, rng, knobs, seconds: Seconds):
        """The prefill program with the first new token, compiled for `key` (timed apart).
        -> LoopState, the prompt's QuickSilver summary (None without QuickSilver)"""
        spec, state = self.model.spec, self.model.state
        seconds.compile += self._first.compile(key, state, spec(batch.shape), spec(start.shape), rng, knobs, key.static)
        t0 = time.perf_counter()
        loop, prompt_summary = self._first(key, state, self.model.place(batch), self.model.place(start), rng, knobs)
        jax.block_until_ready(loop)
        seconds.first += time.perf_counter() - t0
        return loop, prompt_summary

    def _compact_if_needed(self, key: ProgramKey, loop: LoopState, seconds: Seconds):
        """On a compacted cache (`compacts`), each layer keeps the entries it shows: sizes read on the
        host, then gathered (timed with the first token).  -> LoopState, the decode program's key"""
        if not self.compacts:
            return loop, DecodeKey(key)
        decode_key = DecodeKey(key, kept_places(to_host(visible_counts(loop.cache)), key.bucket))
        seconds.compile += self._compact.compile(decode_key, self._first.out_info(key)[0], decode_key)
        t0 = time.perf_counter()
        loop = jax.block_until_ready(self._compact(decode_key, loop))
        seconds.first += time.perf_counter() - t0
        return loop, decode_key

    def _loop_info(self, decode_key: DecodeKey):
        """The abstract loop state the decode program for `decode_key` starts from."""
        if decode_key.kept is None:
            return self._first.out_info(decode_key.program)[0]
        return self._compact.out_info(decode_key)

    def _decode_rest(self, decode_key: DecodeKey, loop: LoopState, prompt, start, knobs, seconds: Seconds):
        """The decode loop for the new tokens after the first, and their transfer to the host.
        `loop` is donated: its cache is updated in place.
        -> tokens [B, N], the loop's record, the speculative Tally or None (host)"""
        state, static = self.model.state, decode_key.program.static
        seconds.compile += self._decode.compile(decode_key, state, self._loop_info(decode_key), prompt, start, knobs,
                                                static)
        t0 = time.perf_counter()
        loop, tally = self._decode(decode_key, state, loop, prompt, start, knobs)
        out, record, tally = to_host((loop.out, loop.record, tally))  # rows may live on several processes
        seconds.decode += time.perf_counter() - t0
        return out, record, tally

    def _trim(self, out) -> list[list[int]]:
        """Each row's new tokens up to (not including) its first end token."""
        ids = []
        for row in out:
            row = row.tolist()
            ends = [i for i, t in enumerate(row) if t in self.eos_ids]
            ids.append(row[: ends[0]] if ends else row)
        return ids

    def _report(self, prompt_summary, start, record) -> dict | None:
        """What QuickSilver's mechanisms did to the prompt and to the generated tokens (None without)."""
        if self.quicksilver is None:
            return None
        return {"prompt": to_host(prompt_summary).to_json(self.quicksilver, start),
                "generated": generated_to_json(self.quicksilver, self.model.cfg.n_layers, record.decoded, record.info)}


def check_speculation(spec: Speculation, quicksilver: QuickSilverConfig | None, n_layers: int) -> None:
    """ValueError where speculative decoding cannot run: every generated token must go through the
    whole model on a cache it can verify on (dense, evicting, or a QuickSilver prompt's under scope
    context)."""
    if quicksilver is not None and quicksilver.scope == "all":
        raise ValueError("speculative decoding needs every generated token through the whole model: QuickSilver "
                         "scope context (e.g. --quicksilver long), not scope all")
    if spec.method == "exit" and spec.exit_layer >= n_layers:
        raise ValueError(f"the early exit must be below the model's {n_layers} layers, got {spec.exit_layer}")
    layers = spec.skip.attention | spec.skip.mlp
    if layers and not all(1 <= l <= n_layers for l in layers):
        raise ValueError(f"skipped sublayers must name layers 1..{n_layers}, got {sorted(layers)}")
