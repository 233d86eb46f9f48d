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


class Generator:
    """A model and its tokenizer, with two compiled programs per (batch, prompt bucket, new-token
    count, sampling mode, stream callback): the prefill with the first new token, and the decode
    loop for the rest (timed apart: time to first token, decode speed)."""

    def __init__(self, model: Model, tokenizer, quicksilver: QuickSilverConfig | None = None, mesh=None,
                 eviction: Eviction | None = None):
        """`mesh`: a qsjax.runtime.sharding mesh to shard the model over (after AMQ quantization, so that the
        int8 weights are placed by the same rules); `eviction`: hold the dense cache to a budget."""
        self.quicksilver = quicksilver if quicksilver is not None and quicksilver.enabled else None
        if self.quicksilver is not None and model.cfg.layer_rules:
            raise UsageError(f"QuickSilver does not support {model.cfg.family}'s attention (soft-capped scores or "
                             "sliding-window layers) yet; run this model without QuickSilver")
        self.kv_dtype = model.dtype  # the float model's: its keys and values (AMQ may store int8 weights)
        if eviction is not None and self.quicksilver is not None:
            raise ValueError("eviction applies to the dense model's cache, not with QuickSilver")
        self.eviction = eviction
        self.model = model if self.quicksilver is None else prepare(model, self.quicksilver)
        if mesh is not None:
            from qsjax.runtime.sharding import shard_model

            self.model = shard_model(self.model, mesh)
        self.tokenizer = tokenizer
        self.eos_ids = tuple(sorted(set(model.cfg.eos_ids) | set(tokenizer.eos_ids)))
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (self.eos_ids or (0,))[0]
        self._first = Programs(self._first_token, static_argnums=(5,))
        self._compact = Programs(self._compact_cache, static_argnums=(1,))
        self._decode = Programs(self._decode_loop, static_argnums=(3,), donate_argnums=(1,))

    @property
    def compacts(self) -> bool:
        """Whether decoding runs on a compacted cache (QuickSilver, scope=context, not the masked reference)."""
        qs = self.quicksilver
        return qs is not None and qs.scope == "context" and qs.compact

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt, add_special_tokens=not chat)

    def _steps(self, static):
        """-> (Decoding, prefill_fn, decode_fn) for sampler.first_token / decode_loop."""
        max_new, _, sampling, eos_ids, pad_id, stream = static
        on_token = None if stream is None else (lambda step, toks: stream(int(toks[0])))
        d = Decoding(max_new, sampling, eos_ids, pad_id, on_token)
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

    def _first_token(self, state, tokens, start, rng, knobs, static):
        """Prefill and the first new token (compiled per `static`)."""
        d, prefill_fn, decode_fn = self._steps(static)
        return first_token(self.model.module(state), tokens, start, rng, knobs, d, cache_length=static[1],
                           prefill_fn=prefill_fn, decode_fn=decode_fn)

    def _decode_loop(self, state, loop: LoopState, knobs, static) -> LoopState:
        """The rest of the new tokens (compiled per `static`; the loop state's buffers are donated)."""
        d, _, decode_fn = self._steps(static)
        return decode_loop(self.model.module(state), loop, knobs, d, decode_fn=decode_fn)

    def _compact_cache(self, loop: LoopState, static) -> LoopState:
        """The prompt's cache, each layer gathered to the entries it shows (`kept` places each)."""
        max_new, kept = static
        return dataclasses.replace(loop, cache=compact(loop.cache, kept, max_new))

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
        cfg = self.model.cfg
        lengths = [len(p) for p in prompts]
        T = prompt_bucket(max(lengths), cfg.max_positions)
        batch = np.full((len(prompts), T), self.pad_id, np.int32)
        for row, p in zip(batch, prompts):
            row[T - len(p):] = p  # left padding: every row's next token goes to slot T
        start = np.array([T - n for n in lengths], np.int32)
        fixed = dataclasses.replace(sampling, temperature=1.0, top_p=1.0)  # traced values, not part of the program
        cache_length = cache_slots(T, max_new_tokens)
        static = (max_new_tokens, cache_length, fixed, self.eos_ids, self.pad_id, stream)
        key = (len(prompts), T, static)
        knobs = (jnp.float32(sampling.temperature), jnp.float32(sampling.top_p))
        rng = jax.random.key(seed)
        spec, state = self.model.spec, self.model.state
        compile_s = self._first.compile(key, state, spec(batch.shape), spec(start.shape), rng, knobs, static)
        t0 = time.perf_counter()
        loop, prompt_summary = self._first(key, state, self.model.place(batch), self.model.place(start), rng, knobs)
        jax.block_until_ready(loop)
        first_s, loop_info, kept = time.perf_counter() - t0, self._first.out_info(key)[0], None
        if self.compacts:  # each layer keeps the entries it shows: sizes read on the host, then gathered
            kept = kept_places(to_host(visible_counts(loop.cache)), T)
            compile_s += self._compact.compile((key, kept), loop_info, (max_new_tokens, kept))
            t0 = time.perf_counter()
            loop = jax.block_until_ready(self._compact((key, kept), loop))
            first_s, loop_info = first_s + time.perf_counter() - t0, self._compact.out_info((key, kept))
        kv_bytes = {"dense": dense_cache_bytes(cfg, len(prompts), cache_length, self.kv_dtype),
                    "this_setting": cache_bytes(loop.cache)}
        compile_s += self._decode.compile((key, kept), state, loop_info, knobs, static)
        t0 = time.perf_counter()
        loop = self._decode((key, kept), state, loop, knobs)  # `loop` is donated: its cache is updated in place
        out, record = to_host((loop.out, loop.record))  # rows may live on several processes
        decode_s = time.perf_counter() - t0
        ids = []
        for row in out:
            row = row.tolist()
            ends = [i for i, t in enumerate(row) if t in self.eos_ids]
            ids.append(row[: ends[0]] if ends else row)
        texts = [self.tokenizer.decode(r) for r in ids]
        qs = None
        if self.quicksilver is not None:
            qs = {"prompt": to_host(prompt_summary).to_json(self.quicksilver, start),
                  "generated": generated_to_json(self.quicksilver, cfg.n_layers, record.decoded, record.info)}
        return GenerationResult(texts, ids, lengths, first_s, decode_s, compile_s, kv_bytes, qs)
