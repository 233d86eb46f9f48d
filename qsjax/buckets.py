"""Static sizes: a few bucket lengths, so that new input sizes do not trigger new compiles."""

from __future__ import annotations


def bucket(n: int, minimum: int = 16, maximum: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), capped at `maximum` (which must fit n)."""
    size = max(minimum, 1 << max(0, n - 1).bit_length())
    if maximum is not None:
        if n > maximum:
            raise ValueError(f"{n} exceeds the largest bucket {maximum}")
        size = min(size, maximum)
    return size


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
