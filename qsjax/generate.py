"""Text generation: `python -m qsjax.generate "PROMPT"`.

stdout carries the continuation (streamed token by token for a single prompt); stderr carries
progress and one closing line with token counts, compile seconds, time to first token and decode
speed; `--json FILE` writes them all, per prompt, with the KV cache's bytes and QuickSilver's
statistics (`qsjax.generate_report`). Bad input is one
`error:` line (status 2), checked before the model loads where the arguments suffice. Ctrl-C stops
within moments, even inside the compiled decode loop: the text so far stays, the closing line
counts it, status 130 (see qsjax.cli).

`--mesh data=2,model=4` shards the model over devices (see qsjax.sharding); prompts split over
"data" when their number is a multiple of it, otherwise every data group runs all of them.

Several processes (hosts): `--coordinator HOST:PORT --num-processes N --process-id I` in every
process, with a --mesh over all their devices (see qsjax.distributed); process 0 writes the text and
the closing line, and an error in any process stops them all with status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qsjax.buckets import cache_slots, prompt_bucket
from qsjax.cli import (
    ArgumentParser,
    UsageError,
    check_output_file,
    exit_on_interrupt,
    quiet_broken_pipe,
    run_cli,
    write_file_atomic,
)
from qsjax.distributed import add_distributed_args, check_distributed_args, is_writer, start, together
from qsjax.eviction import Eviction, add_eviction_args, eviction_from_args, evicting_prefill
from qsjax.kvcache import cache_bytes, dense_cache_bytes
from qsjax.model import Model
from qsjax.generate_report import GenerationResult, closing_line, make_report
from qsjax.programs import Programs
from qsjax.quicksilver.cli import add_quicksilver_args, check_quicksilver_args, quicksilver_from_args
from qsjax.quicksilver.compacted import compact, kept_places, visible_counts
from qsjax.quicksilver.config import QuickSilverConfig
from qsjax.quicksilver.generation import generated_to_json, prepare, quicksilver_decode, quicksilver_prefill
from qsjax.sampler import Decoding, LoopState, Sampling, decode_loop, dense_decode, dense_prefill, first_token
from qsjax.sharding import to_host


class Generator:
    """A model and its tokenizer, with two compiled programs per (batch, prompt bucket, new-token
    count, sampling mode, stream callback): the prefill with the first new token, and the decode
    loop for the rest (timed apart: time to first token, decode speed)."""

    def __init__(self, model: Model, tokenizer, quicksilver: QuickSilverConfig | None = None, mesh=None,
                 eviction: Eviction | None = None):
        """`mesh`: a qsjax.sharding mesh to shard the model over (after AMQ quantization, so that the
        int8 weights are placed by the same rules); `eviction`: hold the dense cache to a budget."""
        self.quicksilver = quicksilver if quicksilver is not None and quicksilver.enabled else None
        self.kv_dtype = model.dtype  # the float model's: its keys and values (AMQ may store int8 weights)
        if eviction is not None and self.quicksilver is not None:
            raise ValueError("eviction applies to the dense model's cache, not with QuickSilver")
        self.eviction = eviction
        self.model = model if self.quicksilver is None else prepare(model, self.quicksilver)
        if mesh is not None:
            from qsjax.sharding import shard_model

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


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m qsjax.generate", description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    p.add_argument("--model", help="a Hugging Face model directory or a known model name (default: smollm2-135m-instruct)")
    p.add_argument("--prompts-file", help="a UTF-8 text file with one prompt per line (blank lines skipped), run as "
                   "one batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50, help="with --do-sample; 0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="with --do-sample; 1 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--json", metavar="FILE", help="write a report to FILE: settings, token counts, time to first "
                   "token, decode speed, compilation, KV cache bytes, QuickSilver statistics")
    p.add_argument(
        "--mesh",
        metavar="SPEC",
        help="shard over devices, e.g. data=2,model=4: prompts split over data, attention heads and MLP over "
        "model (default: one device)",
    )
    add_quicksilver_args(p)
    add_distributed_args(p)
    add_eviction_args(p)
    return p.parse_args(argv)


SEED_RANGE = (-(2**63), 2**63 - 1)


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line; blank (empty or whitespace-only) lines are skipped."""
    from qsjax.data import decode_utf8

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"--prompts-file {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--prompts-file {path} is a directory; give a text file with one prompt per line") from None
    except OSError as e:
        raise UsageError(f"--prompts-file {path}: cannot read it ({e.strerror or e})") from None
    prompts = [line for line in decode_utf8(data, f"--prompts-file {path}").split("\n") if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts-file {path} has no prompts (one per line)")
    return prompts


def check_args(args) -> list[str]:
    """Validate the options that need neither the model nor its config; return the prompts.

    A prompt must hold a non-whitespace character (a whitespace-only prompt is refused; in
    --prompts-file such lines are skipped as blank); a leading UTF-8 byte-order mark is dropped."""
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a number >= 0, got {args.temperature}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise UsageError(f"--seed must be a 64-bit integer ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {args.seed}")
    check_quicksilver_args(args)
    check_distributed_args(args)
    if args.json == "-":
        raise UsageError("--json -: stdout carries the generated text; give a file name")
    if args.json is not None:
        check_output_file("--json", args.json)
    eviction_from_args(args, quicksilver_from_args(args, None).enabled)
    if (args.prompt is None) == (args.prompts_file is None):
        raise UsageError("give a prompt or --prompts-file (exactly one of them)")
    if args.prompts_file is None:
        prompts = [args.prompt.removeprefix("\ufeff")]
    else:
        prompts = read_prompts_file(args.prompts_file)
    if any(not p.strip() for p in prompts):
        raise UsageError("empty prompt: give at least one non-whitespace character of text")
    return prompts


class Output:
    """stdout for the streamed text: one writer at a time (the token callback, or the interrupt
    watcher), and a closed pipe (`| head`) ends the process quietly. With several processes, only
    process 0's output is written (`enabled`). After `end` nothing more is decoded, written or
    counted: a token that arrives while the interrupt ends the line must not follow it."""

    def __init__(self, decoder, enabled: bool = True):
        self.lock = threading.Lock()
        self.decoder = decoder
        self.new_tokens = 0
        self.enabled = enabled
        self.ended = False

    def token(self, token_id: int) -> None:
        with self.lock:
            if not self.ended:
                self.new_tokens += 1
                self._emit(self.decoder.push(token_id))

    def end(self, text: str = "") -> None:
        """The rest of the streamed text (or `text`, when nothing was streamed), then a newline."""
        with self.lock:
            if not self.ended:
                self.ended = True
                self._emit(self.decoder.flush() + text + "\n")

    def _emit(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # from inside a compiled program's callback: no exception may escape
            os._exit(quiet_broken_pipe())


def load_generator(args, prompts: list[str]) -> tuple[Generator, list[list[int]], Path]:
    """Build the mesh, load the tokenizer and weights (sharded), encode and check the prompts:
    -> the generator, the token-id prompts, the model directory; every failure a UsageError."""
    mesh = None
    if args.mesh is not None:
        from qsjax.sharding import MeshError, mesh_from_spec

        try:
            mesh = mesh_from_spec(args.mesh)
        except MeshError as e:
            raise UsageError(str(e)) from None
    from qsjax.compilecache import enable_compilation_cache
    from qsjax.load import check_vocabulary, load_model_checked, load_tokenizer_checked, model_label, read_config
    from qsjax.weights import resolve_model

    model_dir = resolve_model(args.model)
    qs = quicksilver_from_args(args, read_config(args.model, model_dir).n_layers)
    tokenizer = load_tokenizer_checked(args.model, model_dir)
    if args.chat:
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}])
        except ValueError as e:
            raise UsageError(f"--chat: {model_label(args.model, model_dir)}: {e}") from None
    enable_compilation_cache()
    model = load_model_checked(args.model, model_dir, args.dtype)
    gen = Generator(model, tokenizer, qs, mesh, eviction_from_args(args, qs.enabled))
    ids = [gen.encode(p, args.chat) for p in prompts]
    check_vocabulary(ids, model.cfg.vocab_size)
    gen.check(ids, args.max_new_tokens)
    return gen, ids, model_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = check_args(args)
    start(args)  # several processes: join them (nothing without --coordinator)
    writer = is_writer()  # process 0 (or the only one) writes the text and the closing line
    with together():  # an error in any process stops all of them here, before the first collective
        gen, ids, model_dir = load_generator(args, prompts)
    sampling = Sampling(args.do_sample and args.temperature > 0, args.temperature, args.top_k, args.top_p)
    from qsjax.tokenizer import StreamDecoder

    out = Output(StreamDecoder(gen.tokenizer), enabled=writer)

    def write_token(token_id):
        if token_id not in gen.eos_ids:
            out.token(token_id)

    def on_interrupt(signum):
        """Ctrl-C: what was streamed so far is final; end its line and say how far it got."""
        if len(prompts) == 1:
            out.end()
        if writer:
            print(f"prompt tokens {sum(map(len, ids))}, new tokens {out.new_tokens} (stopped by the interrupt)",
                  file=sys.stderr)

    stream = write_token if len(prompts) == 1 else None
    cfg = gen.model.cfg
    if writer:
        print(f"generating with {model_dir.name} ({cfg.arch}, {cfg.n_layers} layers) ...", file=sys.stderr)
    with exit_on_interrupt(on_interrupt):
        result = gen(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed, stream=stream)
    out.end("" if stream is not None else "\n----\n".join(result.texts))
    if writer:
        print(closing_line(result, gen.programs), file=sys.stderr)
    if args.json is not None and writer:
        report = make_report(args, model_dir, gen, prompts, sampling, result)
        write_file_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
