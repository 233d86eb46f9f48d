"""Static sizes: prompt buckets and cache lengths, so that new input sizes rarely compile anew."""

import pytest

from qsjax.runtime.buckets import bucket, cache_slots, prompt_bucket, round_up


@pytest.mark.parametrize("n, expected", [(1, 16), (16, 16), (17, 32), (1000, 1024), (1024, 1024), (1025, 2048)])
def test_bucket_is_the_next_power_of_two(n, expected):
    assert bucket(n) == expected


def test_bucket_is_capped_and_refuses_what_cannot_fit():
    assert bucket(5000, maximum=8192) == 8192
    assert bucket(6000, maximum=6000) == 6000
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket(9000, maximum=8192)


def test_prompt_bucket_and_cache_slots():
    assert prompt_bucket(7, context=8192) == 16
    assert prompt_bucket(7, context=8) == 16  # a tiny model still gets the smallest bucket
    assert prompt_bucket(8000, context=8192) == 8192
    assert cache_slots(16, 64) == 128 and cache_slots(16, 113) == 256
    assert round_up(129, 128) == 256 and round_up(128, 128) == 128
