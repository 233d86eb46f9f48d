"""qsjax.dense.attention against a plain reference (materialized mask, jax.nn.softmax), float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsjax.dense import attention as A
from qsjax.dense.attention import attention


def reference(q, k, v, q_slot, k_slot, k_ok, bias=None, self_visible=False, window=None):
    """The definition, written out: a [B, T, S] mask and a softmax over every key."""
    B, T, H, Dh = q.shape
    G = H // k.shape[2]
    kr, vr = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)  # [B, S, H, Dh]
    s = jnp.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(Dh)
    if bias is not None:
        s = s + bias[:, None, None, :]
    ok = k_ok[:, None, :] | ((k_slot[:, None, :] == q_slot[:, :, None]) & self_visible)
    mask = (k_slot[:, None, :] <= q_slot[:, :, None]) & ok  # [B, T, S]
    if window is not None:  # local: keys from slot q_from[i] on, and anchors anywhere
        mask &= (k_slot[:, None, :] >= window.q_from[:, :, None]) | window.k_anchor[:, None, :]
    p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
    p = jnp.where(mask[:, None], p, 0.0)  # rows with no visible key: NaN -> 0
    return jnp.einsum("bhts,bshd->bthd", p, vr), mask


def qkv(B, T, S, H, K, Dh=16, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
    return f(B, T, H, Dh), f(B, S, K, Dh), f(B, S, K, Dh)


@pytest.fixture(params=["direct", "blocks"])
def path(request, monkeypatch):
    """Run every case through the one-block path and through the loops (small blocks, ragged ends)."""
    if request.param == "blocks":
        monkeypatch.setattr(A, "DIRECT_MAX", 0)
        monkeypatch.setattr(A, "QUERY_BLOCK", 16)
        monkeypatch.setattr(A, "KEY_BLOCK", 24)
    return request.param


def check(q, k, v, q_slot, k_slot, k_ok, bias=None, self_visible=False, window=None):
    # a fresh jit per call: the block-size globals are read when tracing
    got = jax.jit(lambda *a: attention(*a[:7], self_visible=self_visible, window=a[7]))(q, k, v, q_slot, k_slot, k_ok,
                                                                                        bias, window)
    want, mask = jax.jit(reference, static_argnums=7)(q, k, v, q_slot, k_slot, k_ok, bias, self_visible, window)
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    return got, mask


def causal_slots(B, T, start):
    slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return slots, slots, slots >= jnp.asarray(start)[:, None]


@pytest.mark.parametrize("T", [1, 16, 61])
@pytest.mark.parametrize("H,K", [(4, 4), (6, 2), (4, 1)])  # MHA, GQA, MQA
def test_causal_window(path, T, H, K):
    q, k, v = qkv(1, T, T, H, K)
    check(q, k, v, *causal_slots(1, T, [0]))


def test_left_padding_and_padding_queries_are_zero(path):
    T = 50
    q, k, v = qkv(3, T, T, 6, 2)
    start = [0, 5, 33]
    got, mask = check(q, k, v, *causal_slots(3, T, start))
    assert not jnp.any(mask[2, :33].any(-1))  # padding queries see nothing ...
    assert jnp.all(got[2, :33] == 0)  # ... and return zeros


def test_per_key_bias(path):
    T = 40
    q, k, v = qkv(2, T, T, 6, 3)
    bias = jnp.log(jnp.asarray(np.random.default_rng(1).integers(1, 8, (2, T)), jnp.float32))  # log-size
    check(q, k, v, *causal_slots(2, T, [0, 3]), bias)


def test_compacted_rows(path):
    """Gathered ascending slots with gaps, some keys not ok, self_visible: query 3's own key is not ok."""
    r = np.random.default_rng(2)
    B, T, n = 2, 90, 37
    slots = jnp.asarray(np.stack([np.sort(r.choice(T, n, replace=False)) for _ in range(B)]), jnp.int32)
    k_ok = jnp.asarray(r.random((B, n)) < 0.6).at[:, 3].set(False).at[:, 0].set(True)
    q, k, v = qkv(B, n, n, 6, 2, seed=3)
    bias = jnp.asarray(r.normal(size=(B, n)), jnp.float32)
    _, mask = check(q, k, v, slots, slots, k_ok, bias, self_visible=True)
    assert mask[:, 3, 3].all()  # its own key, though not ok, is visible to it


@pytest.mark.parametrize("W", [1, 7, 30])
def test_local_window(path, W):
    """Sliding-window queries (some rows' last queries see everything), two anchors, left padding, bias:
    the loops skip the key blocks the window leaves out and give the definition's result."""
    B, T = 2, 70
    q, k, v = qkv(B, T, T, 6, 2, seed=4)
    slots, _, k_ok = causal_slots(B, T, [0, 9])
    q_from = jnp.where(slots < jnp.asarray([[60], [T]]), slots - W + 1, jnp.iinfo(jnp.int32).min)
    anchor = (slots == jnp.asarray([[0], [9]])) | (slots == jnp.asarray([[1], [10]]))
    bias = jnp.asarray(np.random.default_rng(5).normal(size=(B, T)), jnp.float32)
    _, mask = check(q, k, v, slots, slots, k_ok, bias, window=A.Window(q_from, anchor))
    assert mask[0, 50].sum() == min(W, 49) + 2 and mask[0, 65].sum() == 66  # a far query, a full one
    assert not mask[1, 5].any()  # padding still sees nothing


def test_not_ok_first_key_without_self_visible(path):
    """A query whose only earlier key is not ok, self_visible=False: no visible key -> zeros."""
    q, k, v = qkv(1, 30, 30, 4, 2)
    slots = jnp.arange(30, dtype=jnp.int32)[None] * 3 + 5
    k_ok = jnp.ones((1, 30), bool).at[0, 0].set(False)
    got, _ = check(q, k, v, slots, slots, k_ok)
    assert jnp.all(got[0, 0] == 0)


def test_propagate(path):
    """A few gathered query rows (T = n) against the full window of keys (S = T_window)."""
    r = np.random.default_rng(4)
    B, S, n = 2, 70, 19
    q_slot = jnp.asarray(np.stack([np.sort(r.choice(S, n, replace=False)) for _ in range(B)]), jnp.int32)
    k_slot = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    k_ok = jnp.asarray(r.random((B, S)) < 0.7)
    q, k, v = qkv(B, n, S, 9, 3, seed=5)
    check(q, k, v, q_slot, k_slot, k_ok, jnp.asarray(r.normal(size=(B, S)), jnp.float32), self_visible=True)


def test_unsorted_slots_are_still_correct(path):
    r = np.random.default_rng(6)
    q, k, v = qkv(2, 33, 45, 4, 2)
    q_slot = jnp.asarray(r.permutation(60)[:33][None].repeat(2, 0), jnp.int32)
    k_slot = jnp.asarray(r.permutation(60)[:45][None].repeat(2, 0), jnp.int32)
    check(q, k, v, q_slot, k_slot, jnp.asarray(r.random((2, 45)) < 0.8))


def test_decode(path):
    """T = 1 against a cache of S slots, valid between start and the current index."""
    B, S = 3, 64
    q, k, v = qkv(B, 1, S, 9, 3)
    slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    index = jnp.asarray([40, 40, 40], jnp.int32)
    k_ok = (slots >= jnp.asarray([0, 7, 39])[:, None]) & (slots <= index[:, None])
    check(q, k, v, index[:, None], slots, k_ok)


def test_bfloat16_inputs(path):
    q, k, v = qkv(1, 40, 40, 6, 2)
    got = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), *causal_slots(1, 40, [0]))
    want, _ = reference(q, k, v, *causal_slots(1, 40, [0]))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2)


def test_library_path_plumbing():
    """The GPU branch (jax.nn.dot_product_attention, is_causal, left padding rotated into right
    padding) run with implementation="xla": it matches the reference on left-padded causal windows,
    and other slot patterns go to the fallback."""
    T = 24
    q, k, v = qkv(3, T, T, 6, 2)
    nan = lambda *a: jnp.full(q.shape, jnp.nan)  # a fallback that would fail the comparison
    lib = lambda fallback: jax.jit(lambda *a: A._on_plain_causal(*a, fallback, "xla"))
    plain = causal_slots(3, T, [0, 9, 23])
    np.testing.assert_allclose(lib(nan)(q, k, v, *plain), reference(q, k, v, *plain)[0], atol=1e-5, rtol=1e-5)
    holes = (plain[0], plain[1], plain[2].at[0, 5].set(False))  # not left padding: the library would see key 5
    twice = (plain[0] * 2 + 1, plain[1] * 2, jnp.ones((3, T), bool))  # not arange
    for slots in [holes, twice]:
        np.testing.assert_allclose(lib(attention)(q, k, v, *slots), reference(q, k, v, *slots)[0], atol=1e-5, rtol=1e-5)
        assert jnp.isnan(lib(nan)(q, k, v, *slots)).all()  # the fallback ran


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_on_gpu():
    """On a GPU, a bfloat16 left-padded causal window goes to cuDNN's fused attention (a cuDNN call
    in the compiled program) and matches the float32 reference within bfloat16's rounding; slots
    that are not a plain causal window go to the XLA fallback and match too."""
    T, Dh = 256, 64
    q, k, v = qkv(3, T, T, 9, 3, Dh)
    bf = lambda x: x.astype(jnp.bfloat16)
    f32 = lambda x: bf(x).astype(jnp.float32)  # the reference sees the same rounded inputs
    plain = causal_slots(3, T, [0, 100, 255])
    holes = (plain[0], plain[1], plain[2].at[0, 5].set(False))
    run = jax.jit(attention)
    assert "cudnn" in run.lower(bf(q), bf(k), bf(v), *plain).compile().as_text().lower()
    for slots in [plain, holes]:
        got = run(bf(q), bf(k), bf(v), *slots).astype(jnp.float32)
        np.testing.assert_allclose(got, reference(f32(q), f32(k), f32(v), *slots)[0], atol=3e-2)


def test_memory_is_linear_in_length():
    """8,192 tokens, SmolLM2's heads (B=1, H=9, K=3, Dh=64): the compiled temporaries stay O(T x
    block), far below the T x T float32 scores (2.25 GiB for 9 heads, 256 MiB for one). Bound: 96 MiB,
    i.e. five [T, H, Dh] float32 copies (18 MiB each) plus score blocks of 256 x 512 per head (4.5 MiB
    in all); measured 53 MiB (the old masked attend_causal: 1.5 GiB)."""
    B, T, H, K, Dh = 1, 8192, 9, 3, 64
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    args = (f32(B, T, H, Dh), f32(B, T, K, Dh), f32(B, T, K, Dh), i32(B, T), i32(B, T), jax.ShapeDtypeStruct((B, T), jnp.bool_))
    mem = jax.jit(attention).lower(*args).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 96 * 2**20, mem.temp_size_in_bytes
