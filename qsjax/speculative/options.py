"""Speculative decoding's options on `python -m qsjax.generate` (named as transformers' `generate`
names them) and their checks: the options -> a `Speculation` (settings.py)."""

from __future__ import annotations

from qsjax.speculative.settings import EXIT_TOKENS, SELF_DRAFT_TOKENS, Speculation, parse_sublayers


def add_speculation_args(parser) -> None:
    """The options of `python -m qsjax.generate` (named as transformers' `generate` names them)."""
    g = parser.add_argument_group("speculative decoding (lossless: greedy output identical to plain decoding)")
    g.add_argument("--prompt-lookup-num-tokens", type=int, metavar="K",
                   help="draft up to K tokens per step by prompt lookup: what followed the text's last n-gram "
                   "where it appeared before (fast on copying, extracting, summarising, editing)")
    g.add_argument("--max-matching-ngram-size", type=int, metavar="N",
                   help="prompt lookup: the longest n-gram matched (default 2)")
    g.add_argument("--assistant-early-exit", type=int, metavar="E",
                   help="draft with the model's first E layers (an early exit; for comparison: an untrained "
                   "model's early exit is rarely accepted)")
    g.add_argument("--self-speculation", action="store_true",
                   help="draft with the model's own layers, some sublayers skipped: the set stored beside the model "
                   "(python -m qsjax.speculative.search makes it)")
    g.add_argument("--skip-sublayers", metavar="SET",
                   help="draft with the model without these sublayers (layers from 1), e.g. 'attn:3,5-7;mlp:4'")
    g.add_argument("--num-assistant-tokens", type=int, metavar="K",
                   help=f"drafts per step with --assistant-early-exit, --self-speculation or --skip-sublayers "
                   f"(default {EXIT_TOKENS}, {SELF_DRAFT_TOKENS} when self-drafting)")


def speculation_from_args(args, model_dir=None, n_layers: int | None = None) -> Speculation | None:
    """The Speculation the options ask for (None: plain decoding); UsageError for a bad combination.
    model_dir, n_layers: the model whose stored set --self-speculation reads (`store.py`); None: the
    options are only checked, and the set is left empty."""
    from qsjax.runtime.cli import UsageError
    from qsjax.speculative.store import load_skip

    lookup, exit_layer = args.prompt_lookup_num_tokens, args.assistant_early_exit
    for flag, value in (("--prompt-lookup-num-tokens", lookup), ("--max-matching-ngram-size", args.max_matching_ngram_size),
                        ("--assistant-early-exit", exit_layer), ("--num-assistant-tokens", args.num_assistant_tokens)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    given = [flag for flag, on in (("--prompt-lookup-num-tokens", lookup is not None),
                                   ("--assistant-early-exit", exit_layer is not None),
                                   ("--self-speculation", args.self_speculation),
                                   ("--skip-sublayers", args.skip_sublayers is not None)) if on]
    if len(given) > 1:
        raise UsageError(f"give one drafter: {' or '.join(given)}")
    if lookup is None and args.max_matching_ngram_size is not None:
        raise UsageError("--max-matching-ngram-size goes with --prompt-lookup-num-tokens")
    if given in ([], ["--prompt-lookup-num-tokens"]) and args.num_assistant_tokens is not None:
        raise UsageError("--num-assistant-tokens goes with --assistant-early-exit, --self-speculation or --skip-sublayers")
    if lookup is not None:
        return Speculation("lookup", lookup, args.max_matching_ngram_size or 2)
    if exit_layer is not None:
        return Speculation("exit", args.num_assistant_tokens or EXIT_TOKENS, exit_layer=exit_layer)
    K = args.num_assistant_tokens or SELF_DRAFT_TOKENS
    if args.skip_sublayers is not None:
        try:
            return Speculation("layers", K, skip=parse_sublayers(args.skip_sublayers))
        except ValueError as e:
            raise UsageError(f"--skip-sublayers {args.skip_sublayers!r}: {e}") from None
    if args.self_speculation:
        if model_dir is None:
            return Speculation("layers", K)
        return Speculation("layers", K, skip=load_skip(model_dir, n_layers, args.model))
    return None
