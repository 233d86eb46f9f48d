"""Text generation: `python -m qsjax.generate "PROMPT"`.

stdout carries the continuation (streamed token by token for a single prompt); stderr carries
progress and one closing line with token counts, compile seconds, time to first token and decode
speed; `--json FILE` writes them all, per prompt, with the KV cache's bytes and QuickSilver's
statistics (`qsjax.runtime.generation_report`; the `Generator` itself is `qsjax.runtime.generator`). Bad input is one
`error:` line (status 2), checked before the model loads where the arguments suffice. Ctrl-C stops
within moments, even inside the compiled decode loop: the text so far stays, the closing line
counts it, status 130 (see qsjax.runtime.cli).

`--mesh data=2,model=4` shards the model over devices (see qsjax.runtime.sharding); prompts split over
"data" when their number is a multiple of it, otherwise every data group runs all of them.

Several processes (hosts): `--coordinator HOST:PORT --num-processes N --process-id I` in every
process, with a --mesh over all their devices (see qsjax.runtime.distributed); process 0 writes the text and
the closing line, and an error in any process stops them all with status 2.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path

from qsjax.dense.sampler import Sampling
from qsjax.kvpolicy.eviction import add_eviction_args, eviction_from_args
from qsjax.quicksilver.options import add_quicksilver_args, check_quicksilver_args, quicksilver_from_args, wants_help_all
from qsjax.runtime.cli import (
    add_dtype_argument,
    ArgumentParser,
    UsageError,
    check_not_inputs,
    check_output_file,
    exit_on_interrupt,
    model_inputs,
    quiet_broken_pipe,
    run_cli,
    stdout_status,
    write_output,
    write_stdout,
)
from qsjax.runtime.distributed import add_distributed_args, check_distributed_args, is_writer, start, together
from qsjax.runtime.generation_report import closing_line, make_report
from qsjax.runtime.generator import Generator, check_speculation
from qsjax.speculative.options import add_speculation_args, speculation_from_args


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m qsjax.generate", description=__doc__.splitlines()[0])
    g = p.add_argument_group("generation")
    g.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    g.add_argument("--model", help="a Hugging Face model directory or a known model name (default: smollm2-135m-instruct)")
    g.add_argument("--prompts-file", help="a UTF-8 text file with one prompt per line (blank lines skipped), run as "
                   "batches of --batch-size")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="stop after N new tokens per prompt, or at its end-of-sequence token (default 64)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--batch-size", type=int, metavar="N", help="prompts run together (default: as many as fit in "
                   "memory); the results come in prompt order")
    add_dtype_argument(g)
    s = p.add_argument_group("sampling (greedy unless --do-sample)")
    s.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    s.add_argument("--temperature", type=float, default=1.0, metavar="X",
                   help="with --do-sample: divide the logits by X; 0 is greedy (default 1)")
    s.add_argument("--top-k", type=int, default=50, metavar="N", help="with --do-sample: the N likeliest tokens; 0 disables "
                   "(default 50)")
    s.add_argument("--top-p", type=float, default=1.0, metavar="X", help="with --do-sample: the likeliest tokens up to "
                   "probability X; 1 disables (default 1)")
    s.add_argument("--seed", type=int, default=0, help="the sampling seed: the same seed, the same tokens (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write a report to FILE: settings (settings.quicksilver replays with "
                   "--quicksilver-config), token counts, time to first token, decode speed, compilation, KV cache "
                   "bytes, QuickSilver statistics")
    add_quicksilver_args(p, wants_help_all(argv))
    add_eviction_args(p)
    add_speculation_args(p)
    add_distributed_args(p, "shard over devices, e.g. data=2,model=4: prompts split over data, attention heads and MLP "
                         "over model (default: one device)")
    return p.parse_args(argv)


SEED_RANGE = (-(2**63), 2**63 - 1)


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line; blank (empty or whitespace-only) lines are skipped."""
    from qsjax.evaluation.data import decode_utf8

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
    speculation_from_args(args)
    if (args.prompt is None) == (args.prompts_file is None):
        raise UsageError("give a prompt or --prompts-file (exactly one of them)")
    if args.prompts_file is None:
        prompts = [args.prompt.removeprefix("\ufeff")]
    else:
        prompts = read_prompts_file(args.prompts_file)
    if any(not p.strip() for p in prompts):
        raise UsageError("empty prompt: give at least one non-whitespace character of text")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        prompts[0].encode("utf-8")
    except UnicodeEncodeError as e:  # the shell passed bytes that are not UTF-8 (Python keeps them as surrogates)
        raise UsageError(f"the prompt is not UTF-8 text (character {e.start}); give UTF-8 text") from None
    return prompts


class Output:
    """stdout for the streamed text: one writer at a time (the token callback, or the interrupt
    watcher), and a closed pipe (`| head`) ends the process quietly. With several processes, only
    process 0's output is written (`enabled`). After `end` nothing more is decoded, written or
    counted: a token that arrives while the interrupt ends the line must not follow it.  When
    stdout fails otherwise (a full disk, closed), or closes while a --json report is still to be
    written (`keep_going`), the error is kept in `error` and decoding goes on silently."""

    def __init__(self, decoder, enabled: bool = True, keep_going: bool = False):
        self.lock = threading.Lock()
        self.decoder = decoder
        self.new_tokens = 0
        self.enabled = enabled
        self.keep_going = keep_going
        self.ended = False
        self.error = None

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
        if not self.enabled or self.error is not None:
            return
        error = write_stdout(text)  # from inside a compiled program's callback: no exception may escape
        if isinstance(error, BrokenPipeError) and not self.keep_going:
            os._exit(quiet_broken_pipe())
        self.error = error


def encode_prompts(tokenizer, prompts: list[str], chat: bool, context: int, label: str) -> list[list[int]]:
    """Each prompt's token ids (`Tokenizer.encode_prompt`, as Generator.encode); a prompt (or its
    rendering) too large for the context is refused from its size, before tokenizing."""
    from qsjax.checkpoints.tokenizer import TextTooLong

    ids = []
    for i, prompt in enumerate(prompts):
        what = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        try:
            ids.append(tokenizer.encode_prompt(prompt, chat, context, what))
        except TextTooLong as e:
            raise UsageError(f"{e}; shorten it") from None
        except ValueError as e:
            raise UsageError(f"--chat: {label}: {e}") from None
    return ids


def load_generator(args, prompts: list[str]):
    """Build the mesh, load the tokenizer, encode the prompts, plan the batches from the memory
    estimate, load the weights (sharded): -> the generator, the token-id prompts, the model
    directory, the batch size; every failure a UsageError, and the memory check before the weights load."""
    mesh = None
    if args.mesh is not None:
        from qsjax.runtime.sharding import MeshError, mesh_from_spec

        try:
            mesh = mesh_from_spec(args.mesh)
        except MeshError as e:
            raise UsageError(str(e)) from None
    from qsjax.runtime.compilecache import enable_compilation_cache
    from qsjax.checkpoints.load import check_vocabulary, load_model_checked, load_tokenizer_checked, model_label, read_config
    from qsjax.runtime.memory import batch_size, estimate
    from qsjax.weights import resolve_model

    model_dir = resolve_model(args.model)
    check_not_inputs([("--json", args.json)], model_inputs(model_dir))
    cfg = read_config(args.model, model_dir)
    qs = quicksilver_from_args(args, cfg.n_layers)
    eviction, speculation = eviction_from_args(args, qs.enabled), speculation_from_args(args, model_dir, cfg.n_layers)
    if speculation is not None:
        try:  # a drafter the model or the other options do not allow
            check_speculation(speculation, qs if qs.enabled else None, cfg.n_layers)
        except ValueError as e:
            raise UsageError(str(e)) from None
    tokenizer = load_tokenizer_checked(args.model, model_dir)
    ids = encode_prompts(tokenizer, prompts, args.chat, cfg.max_positions, model_label(args.model, model_dir))
    check_vocabulary(ids, cfg.vocab_size)
    longest = max(map(len, ids))
    size = args.batch_size or len(ids)
    if 0 < longest and longest + args.max_new_tokens <= cfg.max_positions:  # else Generator.check refuses it
        need = estimate(cfg, args.dtype, longest, args.max_new_tokens, len(ids), sum(map(len, ids)))
        size = batch_size(need, args.batch_size, len(ids))
    enable_compilation_cache()
    from qsjax.quicksilver.amqstore import amq_model

    model = amq_model(load_model_checked(args.model, model_dir, args.dtype), qs, model_dir)  # AMQ's store
    gen = Generator(model, tokenizer, qs, mesh, eviction, speculation)
    gen.check(ids, args.max_new_tokens)
    return gen, ids, model_dir, size


def generate_batches(gen, ids: list[list[int]], size: int, **options):
    """gen(...) over consecutive batches of `size` prompts -> one GenerationResult, rows in prompt order."""
    from qsjax.runtime.generation_report import join_results
    from qsjax.runtime.memory import batches

    return join_results([gen(batch, **options) for batch in batches(ids, size)])


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = check_args(args)
    check_not_inputs([("--json", args.json)], [("--prompts-file", args.prompts_file),
                                               ("--quicksilver-config", args.quicksilver_config)])
    start(args)  # several processes: join them (nothing without --coordinator)
    writer = is_writer()  # process 0 (or the only one) writes the text and the closing line
    with together():  # an error in any process stops all of them here, before the first collective
        gen, ids, model_dir, size = load_generator(args, prompts)
    sampling = Sampling(args.do_sample and args.temperature > 0, args.temperature, args.top_k, args.top_p)
    from qsjax.checkpoints.tokenizer import StreamDecoder

    out = Output(StreamDecoder(gen.tokenizer), enabled=writer, keep_going=args.json is not None)

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
        result = generate_batches(gen, ids, size, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                                  stream=stream)
    out.end("" if stream is not None else "\n----\n".join(result.texts))
    if writer:
        print(closing_line(result, gen.programs), file=sys.stderr)
    if args.json is not None and writer:
        report = make_report(args, model_dir, gen, prompts, sampling, result, size)
        from qsjax.quicksilver.amqstore import weights_report

        report["weights"] = weights_report(gen.model)  # bytes held, and which AMQ store ran
        write_output("--json", args.json, json.dumps(report, indent=2) + "\n")
    return stdout_status(out.error, f"; the report is in {args.json}" if args.json else "")


if __name__ == "__main__":
    run_cli(main)
