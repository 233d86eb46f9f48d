"""What speculative decoding runs with (`Speculation`), and the text form of a skip set
(`parse_sublayers`, `format_sublayers`); the command-line options are in `options.py`."""

from __future__ import annotations

import dataclasses

from qsjax.dense.model import Sublayers

METHODS = ("lookup", "layers", "exit")
EXIT_TOKENS = 4  # drafts per verify pass with an early exit
SELF_DRAFT_TOKENS = 2  # with skipped sublayers (measured best, docs/results/speculative/)
BEST_ACCEPTANCE = 0.9  # a model drafter's per-draft acceptance at best (Draft & Verify: 0.92 on LLaMA-2-13B)


def expected_accepted(alpha: float, K: int) -> float:
    """Accepted drafts per pass when each is accepted with probability alpha until the first is not:
    sum_(j=1..K) alpha^j."""
    return sum(alpha ** j for j in range(1, K + 1))


@dataclasses.dataclass(frozen=True)
class Speculation:
    """method: lookup (prompt lookup, `lookup.py`), layers (the model with `skip`'s sublayers left out
    drafts, `drafting.py`) or exit (the first `exit_layer` layers draft: an early exit).
    num_tokens: drafts per verify pass (K); max_ngram: prompt lookup's longest n-gram;
    break_even: the drafts a verify pass must be expected to get accepted to pay for itself (its
    cost over a plain step, less one); below it drafting pauses (`adapt.py`)."""

    method: str = "lookup"
    num_tokens: int = 10
    max_ngram: int = 2
    skip: Sublayers = Sublayers()
    exit_layer: int | None = None
    break_even: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {self.max_ngram}")
        if self.break_even < 0:
            raise ValueError(f"break_even must be >= 0, got {self.break_even}")
        if self.method == "exit" and (self.exit_layer is None or self.exit_layer < 1):
            raise ValueError("method exit needs exit_layer >= 1")

    def drafter_skip(self, n_layers: int) -> Sublayers:
        """The sublayers the drafting model leaves out (`layers`: `skip`; `exit`: all above exit_layer)."""
        if self.method == "exit":
            above = frozenset(range(self.exit_layer + 1, n_layers + 1))
            return Sublayers(above, above)
        return self.skip

    def threshold(self, cfg) -> float:
        """The accepted drafts per verify pass at which verifying pays (`adapt.py`): break_even, plus
        the drafter's own K passes at the share f of the weights it reads (0 for prompt lookup)."""
        if self.method == "lookup":
            return self.break_even
        from qsjax.speculative.drafting import weights_read

        return self.break_even + self.num_tokens * weights_read(self.drafter_skip(cfg.n_layers), cfg)

    def can_pay(self, cfg) -> bool:
        """Whether drafting can pay at all: prompt lookup when every draft is accepted (copied text is),
        a model drafter when its drafts are accepted at BEST_ACCEPTANCE each (our reading: none
        reaches more untrained). When not, the loop never drafts (plain decoding)."""
        best = self.num_tokens if self.method == "lookup" else expected_accepted(BEST_ACCEPTANCE, self.num_tokens)
        return self.threshold(cfg) < best

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["skip"] = {"attention": sorted(self.skip.attention), "mlp": sorted(self.skip.mlp)}
        return out


PARTS = {"attn": "attention", "mlp": "mlp"}


def parse_sublayers(text: str) -> Sublayers:
    """"attn:3,5-7;mlp:4" (layers 1-based; either part may be left out) -> Sublayers; ValueError
    saying what is wrong otherwise."""
    found = {}
    for part in text.split(";"):
        name, colon, layers = part.strip().partition(":")
        if name.strip() not in PARTS or not colon:
            raise ValueError(f"expected parts like attn:3,5-7 and mlp:4 separated by ';', got {part.strip()!r}")
        if name.strip() in found:
            raise ValueError(f"{name.strip()} given twice")
        found[name.strip()] = frozenset(layer_list(layers, name.strip()))
    if not any(found.values()):
        raise ValueError("no sublayer to skip")
    return Sublayers(found.get("attn", frozenset()), found.get("mlp", frozenset()))


def layer_list(text: str, name: str) -> list[int]:
    """"3,5-7" -> [3, 5, 6, 7]"""
    layers = []
    for item in text.split(","):
        first, dash, last = item.strip().partition("-")
        if not (first.isdigit() and (last.isdigit() if dash else True)):
            raise ValueError(f"{name}: expected layer numbers or ranges like 5-7, got {item.strip()!r}")
        first, last = int(first), int(last) if dash else int(first)
        if first < 1 or last < first:
            raise ValueError(f"{name}: layers count from 1 and a range goes up, got {item.strip()!r}")
        layers += range(first, last + 1)
    return layers


def format_sublayers(skip: Sublayers) -> str:
    """Sublayers -> the text parse_sublayers reads ("" for none), ranges joined."""
    def ranges(layers):
        out, run = [], []
        for l in sorted(layers):
            if run and l != run[-1] + 1:
                out.append(run)
                run = []
            run.append(l)
        out += [run] if run else []
        return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in out)

    return ";".join(f"{name}:{ranges(getattr(skip, field))}" for name, field in PARTS.items() if getattr(skip, field))
