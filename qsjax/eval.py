"""Perplexity evaluation: `python -m qsjax.eval --model DIR --data PATH`.

    python -m qsjax.eval --data wikitext103 --max-eval-tokens 8192
    python -m qsjax.eval --data c4 --protocol disjoint --seqlen 2048 --json result.json
    python -m qsjax.eval --protocol tail --max-length 8192 --stride 512 --max-eval-tokens 20480

--data takes a .txt, .jsonl or .jsonl.gz file (see qsjax.evaluation.data) or a data set name (wikitext103,
c4). The whole text is tokenized once, cut to --max-eval-tokens, and scored under one protocol
(see qsjax.evaluation.perplexity): `strided` (Hugging Face's sliding window, --max-length and --stride),
`disjoint` (GPTQ's side-by-side windows of --seqlen tokens) or `tail` (long context: windows of
--max-length tokens every --stride tokens, each scoring its last --stride, so that every scored token
sees --max-length minus --stride tokens of context).

stderr carries a progress bar; the closing table goes to stdout (to stderr when --json - puts the
JSON on stdout). --json FILE writes the report, atomically (never a half-written file), after the
table; that FILE can be written is checked before anything loads, and should the write still fail
the table has been printed. Ctrl-C stops the run at once (status 130) and writes nothing. Every window
shape is compiled before the clock starts: `seconds` is scoring only, `seconds_compile` the
compilation (mostly a disk read when the persistent compilation cache already holds it). `flops`
counts the matmuls executed (qsjax.evaluation.flops), padding included, in all and per scored token.

QuickSilver options (`--quicksilver fast`, `--halt-cutoff-layer 25 --kv-skip propagate`, ...; see
`--help`) evaluate with the mechanisms on; `flops` then counts the work their decisions leave plus
their own overhead, and the `quicksilver` key holds the settings and statistics.

`--mesh data=2,model=4` shards the model over devices (see qsjax.runtime.sharding). --batch-size must then
be a multiple of the data axis: refused otherwise rather than padded, since padding rows would
enter QuickSilver's statistics (summed over rows inside the compiled program). The run's last,
smaller batch, when it does not divide, runs whole on every data group (same numbers).

Several processes (hosts): `--coordinator HOST:PORT --num-processes N --process-id I` in every
process, with a --mesh over all their devices (see qsjax.runtime.distributed); process 0 writes the table,
the report and the progress bar, and an error in any process stops them all with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qsjax.runtime.cli import (
    add_dtype_argument,
    ArgumentParser,
    UsageError,
    check_not_inputs,
    check_output_file,
    exit_on_interrupt,
    model_inputs,
    run_cli,
    write_results,
)
from qsjax.runtime.distributed import add_distributed_args, check_distributed_args, is_writer, start, together
from qsjax.quicksilver.options import (add_quicksilver_args, check_quicksilver_args, quicksilver_from_args, recorded,
                                      wants_help_all)

if TYPE_CHECKING:
    import numpy as np
    from jax.sharding import Mesh

    from qsjax.dense.model import Model
    from qsjax.evaluation.perplexity import Window
    from qsjax.quicksilver.settings import QuickSilverConfig

PROTOCOLS = ("strided", "disjoint", "tail")


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m qsjax.eval", description=__doc__.splitlines()[0])
    g = p.add_argument_group("evaluation")
    g.add_argument("--model", help="a Hugging Face model directory or a known model name (default: smollm2-135m-instruct)")
    g.add_argument("--data", default="wikitext103",
                   help="a .txt, .jsonl or .jsonl.gz file, or wikitext103 or c4 (default: wikitext103)")
    g.add_argument("--protocol", default="strided", choices=PROTOCOLS,
                   help="strided (sliding windows), disjoint (side by side) or tail (long context) (default strided)")
    g.add_argument("--max-length", type=int, default=1024, help="strided, tail: window length (default 1024)")
    g.add_argument("--stride", type=int, default=512,
                   help="strided, tail: step between windows; tail: the tokens each window scores (default 512)")
    g.add_argument("--seqlen", type=int, default=2048, help="disjoint: window length (default 2048)")
    g.add_argument("--max-eval-tokens", type=int, help="keep only the first N tokens of the stream")
    g.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    add_dtype_argument(g)
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE (- for stdout); its "
                   "settings.quicksilver replays with --quicksilver-config")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_quicksilver_args(p, wants_help_all(argv))
    add_distributed_args(p, "shard over devices, e.g. data=2,model=4: windows split over data (--batch-size a "
                         "multiple of it), attention heads and MLP over model (default: one device)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Checks that need neither the model nor the data."""
    if args.protocol in ("strided", "tail"):
        if args.max_length < 2:
            raise UsageError(f"--max-length must be at least 2, got {args.max_length}")
        if not 0 < args.stride <= args.max_length:
            raise UsageError(f"--stride must be in 1..--max-length ({args.max_length}), got {args.stride}")
        if args.protocol == "tail" and args.stride == args.max_length:
            raise UsageError(f"--protocol tail needs --stride below --max-length ({args.max_length}): "
                             "the rest of each window is the scored tokens' context")
    elif args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.max_eval_tokens is not None and args.max_eval_tokens <= 1:
        raise UsageError(
            f"--max-eval-tokens must be at least 2 (one token is predicted from another), got {args.max_eval_tokens}"
        )
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    check_quicksilver_args(args)
    check_distributed_args(args)


def mesh_from_args(args):
    """The device mesh --mesh asks for (None without it); the batch must split evenly over "data"."""
    if args.mesh is None:
        return None
    from qsjax.runtime.sharding import MeshError, mesh_from_spec

    try:
        mesh = mesh_from_spec(args.mesh)
    except MeshError as e:
        raise UsageError(str(e)) from None
    data = mesh.shape["data"]
    if args.batch_size % data:
        raise UsageError(
            f"--batch-size {args.batch_size} is not a multiple of the mesh's data axis ({data}); "
            f"use --batch-size {data} (or a multiple) so that every data group gets whole windows"
        )
    return mesh


def protocol_params(args) -> dict:
    """The protocol's name and parameters, as reported."""
    if args.protocol in ("strided", "tail"):
        return {"name": args.protocol, "max_length": args.max_length, "stride": args.stride}
    return {"name": "disjoint", "seqlen": args.seqlen}


def check_context(args, cfg) -> None:
    """The window must fit in the model's context."""
    length, flag = (args.seqlen, "--seqlen") if args.protocol == "disjoint" else (args.max_length, "--max-length")
    if length > cfg.max_positions:
        raise UsageError(f"{flag} {length} is longer than the model's context ({cfg.max_positions} positions)")


def make_windows(args, n_tokens: int):
    """The protocol's windows over a stream of n_tokens."""
    from qsjax.evaluation.perplexity import disjoint_windows, strided_windows, tail_windows

    if args.protocol == "strided":
        return strided_windows(n_tokens, args.max_length, args.stride)
    if args.protocol == "tail":
        if args.max_length > n_tokens:
            raise UsageError(f"--max-length {args.max_length} is longer than the token stream ({n_tokens} tokens)")
        return tail_windows(n_tokens, args.max_length, args.stride)
    if args.seqlen > n_tokens:
        raise UsageError(f"--seqlen {args.seqlen} is longer than the token stream ({n_tokens} tokens)")
    return disjoint_windows(n_tokens, args.seqlen)


def make_report(args, model_dir: Path, data_path: Path, n_tokens: int, result) -> dict:
    """The JSON report: what was evaluated, then `PerplexityResult.to_json()`.  Later settings and
    statistics are added as further top-level keys; the existing ones stay as they are."""
    return {
        "model": args.model or model_dir.name,
        "model_dir": str(model_dir),
        "dtype": args.dtype,
        "data": args.data,
        "data_path": str(data_path),
        "protocol": protocol_params(args),
        "batch_size": args.batch_size,
        "max_eval_tokens": args.max_eval_tokens,
        "tokens_total": n_tokens,
        **result.to_json(),
    }


def programs_line(report: dict) -> str:
    n = report["programs_compiled"]
    line = f"{n} (one per window shape)"
    compaction = report.get("quicksilver", {}).get("compaction")
    if compaction and compaction["compacted"]:
        bodies = max(compaction["layer_bodies_per_program"].values())
        line += f"; each switches between <= {bodies} layer bodies (buckets x {compaction['segments']} segment(s))"
    return line


def format_table(report: dict) -> str:
    flops = report["flops"]
    split = ", ".join(f"{kind} {flops[kind] / 1e9:,.1f}" for kind in ("attention", "projections", "mlp", "lm_head"))
    protocol = ", ".join(f"{k} {v}" for k, v in report["protocol"].items() if k != "name")
    rows = [
        ("model", report["model"]),
        ("data", report["data"]),
        ("protocol", f"{report['protocol']['name']} ({protocol})"),
        ("tokens scored", f"{report['tokens_scored']:,} of {report['tokens_total']:,} in {report['windows']} windows"),
        ("mean NLL", f"{report['nll_mean']:.4f}"),
        ("perplexity", f"{report['perplexity']:.4f}"),
        ("seconds", f"{report['seconds']:.2f} (+ {report['seconds_compile']:.2f} compiling)"),
        ("compiled programs", programs_line(report)),
        ("tokens/s", f"{report['tokens_per_second']:.1f}"),
        ("GFLOP / token", f"{flops['per_token'] / 1e9:.3f}"),
        ("GFLOP total", f"{flops['total'] / 1e9:,.1f} ({split})"),
    ]
    if "mesh" in report:
        rows.append(("mesh", ", ".join(f"{axis} {size}" for axis, size in report["mesh"].items())))
    if "quicksilver" in report:
        q = report["quicksilver"]
        rows += [
            ("quicksilver", report["settings"]["quicksilver_preset"] or "custom"),
            ("token-layers run", f"{100 * q['fraction_token_layers_executed']:.1f}%"),
            ("FLOPs vs dense", f"{-100 * q['executed_flops_reduction']:+.1f}% (needed work, overhead included)"),
            ("halted / fused", f"{q['tokens_halted']:,} / {q['tokens_fused']:,} tokens"),
            ("KV writes skipped", f"{100 * q['kv_writes_skipped_fraction']:.1f}%"),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    start(args)  # several processes: join them (nothing without --coordinator)
    writer = is_writer()  # process 0 (or the only one) writes the table, the report and the progress bar
    with together():  # an error in any process stops all of them here, before the first collective
        inputs = load_inputs(args, writer)
    # from here to the report nothing is written: Ctrl-C ends the run at once, even inside XLA
    with exit_on_interrupt(lambda signum: sys.stderr.write("\n")):
        report = evaluate_model(args, inputs, progress=writer and not args.no_progress)
    if not writer:
        return 0
    # the table first: if the report cannot be written after all, the results are still shown;
    # the report is written even when stdout fails (a closed pipe, a full disk)
    report_file = [("--json", args.json, json.dumps(report, indent=2) + "\n")] if args.json is not None else []
    return write_results(format_table(report), report_file)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Everything checked and loaded before scoring."""

    model_dir: Path
    data_path: Path
    model: Model  # sharded when --mesh is given
    stream: np.ndarray  # [N] token ids
    windows: list[Window]
    qs: QuickSilverConfig
    mesh: Mesh | None
    seconds_load: float
    seconds_tokenize: float


def load_inputs(args, writer: bool = True) -> Inputs:
    """Check the output file (on the writing process), build the mesh, read the data, load the
    tokenizer and weights, tokenize, cut windows, shard: every failure a UsageError."""
    if args.json is not None and writer:
        check_output_file("--json", args.json)
    mesh = mesh_from_args(args)
    from qsjax.runtime.compilecache import enable_compilation_cache
    from qsjax.evaluation.data import read_text, resolve_data, tokenize
    from qsjax.checkpoints.load import check_vocabulary, load_model_checked, load_tokenizer_checked, read_config
    from qsjax.weights import resolve_model

    data_path = resolve_data(args.data)
    check_not_inputs([("--json", args.json)], [("--data", data_path), ("--quicksilver-config", args.quicksilver_config)])
    text = read_text(data_path)
    model_dir = resolve_model(args.model)
    check_not_inputs([("--json", args.json)], model_inputs(model_dir))
    cfg = read_config(args.model, model_dir)
    check_context(args, cfg)
    qs = quicksilver_from_args(args, cfg.n_layers)
    tokenizer = load_tokenizer_checked(args.model, model_dir)
    enable_compilation_cache()
    t0 = time.perf_counter()
    model = load_model_checked(args.model, model_dir, args.dtype)
    from qsjax.quicksilver.amqstore import amq_model

    model = amq_model(model, qs, model_dir, quiet=not writer)  # AMQ: int8 codes, calibrated when stored
    seconds_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream = tokenize(tokenizer, text, args.max_eval_tokens)
    seconds_tokenize = time.perf_counter() - t0
    if len(stream) < 2:
        raise UsageError(f"{data_path} gives {len(stream)} token(s); at least 2 are needed")
    check_vocabulary([stream.tolist()], model.cfg.vocab_size)
    windows = make_windows(args, len(stream))
    if mesh is not None:
        from qsjax.runtime.sharding import shard_model

        model = shard_model(model, mesh)  # quantized (AMQ) above, so the int8 weights are placed by the rules too
    return Inputs(model_dir, data_path, model, stream, windows, qs, mesh, seconds_load, seconds_tokenize)


def evaluate_model(args, inputs: Inputs, progress: bool) -> dict:
    """Score the windows: the report."""
    from qsjax.evaluation.perplexity import Scorer, evaluate

    model, stream, windows, qs = inputs.model, inputs.stream, inputs.windows, inputs.qs
    if qs.enabled:
        from qsjax.quicksilver.scorer import QuickSilverScorer, evaluate_quicksilver

        result, stats, _ = evaluate_quicksilver(QuickSilverScorer(model, qs), stream, windows, args.batch_size,
                                                progress=progress)
        report = make_report(args, inputs.model_dir, inputs.data_path, len(stream), result)
        report["quicksilver"] = stats
    else:
        result = evaluate(Scorer(model), stream, windows, args.batch_size, progress=progress)
        report = make_report(args, inputs.model_dir, inputs.data_path, len(stream), result)
    from qsjax.quicksilver.amqstore import weights_report

    report.update(settings=recorded(args, qs), weights=weights_report(model), seconds_load=inputs.seconds_load,
                  seconds_tokenize=inputs.seconds_tokenize)
    if inputs.mesh is not None:
        report["mesh"] = dict(inputs.mesh.shape)
    return report


if __name__ == "__main__":
    run_cli(main)
