"""What speculative decoding runs with (`Speculation`), its options on `python -m qsjax.generate`
(named as transformers names them) and their checks."""

from __future__ import annotations

import dataclasses

from qsjax.dense.model import Sublayers

METHODS = ("lookup", "layers", "exit")


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

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["skip"] = {"attention": sorted(self.skip.attention), "mlp": sorted(self.skip.mlp)}
        return out
