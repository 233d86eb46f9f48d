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


def prompt_bucket(n: int, context: int) -> int:
    """The padded length of a prompt batch whose longest prompt has n tokens: a power of two (at
    least 16), capped at the model's context."""
    return bucket(n, maximum=max(context, 16))


def cache_slots(prompt_slots: int, new_tokens: int) -> int:
    """KV-cache length for a prompt bucket and the new tokens, rounded up to 128 so that nearby new-token
    counts share one compiled program."""
    return round_up(prompt_slots + new_tokens, 128)
