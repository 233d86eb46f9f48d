"""Executed-FLOP accounting: QuickSilver's counts use the reporting convention of `qsjax.evaluation.flops`."""

import dataclasses

import numpy as np

from qsjax.evaluation.flops import attention_flops, forward_flops, lm_head_flops, needed_flops
from qsjax.evaluation.perplexity import strided_windows
from qsjax.quicksilver.accounting import Accounting, kv_projection_flops, qkv_projection_flops, weight_reads
from qsjax.quicksilver.settings import QuickSilverConfig
from qsjax.quicksilver.scorer import QuickSilverScorer, evaluate_quicksilver
from qsjax.quicksilver.window.state import LayerStats


def stats(computing, pairs, checks=0, propagated=0, skipped=0, selection=0, voters=0):
    """Per-layer statistics [L, B=1] from per-layer lists."""
    col = lambda xs: np.asarray(xs, np.int32)[:, None]
    L = len(computing)
    return LayerStats(col(computing), col(pairs), col([checks] * L), col([propagated] * L), col([skipped] * L),
                      col([selection] * L), col([voters] * L))


def test_all_tokens_computing_is_the_dense_convention(tiny_models):
    cfg = tiny_models["llama-gqa"][0].cfg
    n, L = 10, cfg.n_layers
    acct = Accounting(cfg, 4)
    total = acct.add(stats([n] * L, [n * (n + 1) // 2] * L), n, 4, amq_checks=0, halted=0, fused=0)
    assert total == needed_flops(cfg, [n], 4) and acct.overhead.total == 0
    assert acct.to_json()["fraction_token_layers_executed"] == 1.0


def test_overhead_is_added_and_reported(tiny_models):
    cfg = tiny_models["llama-gqa"][0].cfg
    n, L = 10, cfg.n_layers
    acct = Accounting(cfg, 4)
    total = acct.add(stats([n, 6], [55, 21], checks=2, propagated=3, skipped=4, selection=40, voters=4), n, 4,
                     amq_checks=5, halted=4, fused=0)
    overhead = acct.overhead
    assert overhead.lm_head == lm_head_flops(cfg, 2 * L + 5)
    assert overhead.projections == kv_projection_flops(cfg, 3 * L) + qkv_projection_flops(cfg, 4 * L)
    assert overhead.attention == attention_flops(cfg, 40 * L) // 2  # scores only
    assert total == forward_flops(cfg, [n, 6], [55, 21], 4) + overhead and acct.flops == total
    report = acct.to_json()
    assert report["token_layers_executed"] == n + 6 and report["kv_writes_skipped"] == 4 * L
    assert report["cache_bytes_saved"] == 4 * L * 2 * cfg.n_kv_heads * cfg.head_dim * 4


def test_cache_bytes_saved_use_the_models_kv_dtype(tiny_dirs):
    """bfloat16 keys and values are 2 bytes each (the figure once assumed 4 whatever the dtype)."""
    from qsjax.checkpoints.hf_params import load_model

    path = tiny_dirs["llama-gqa"][0]
    qs = QuickSilverConfig(amq_layer=1)  # int8 weights from the first layer: the K/V dtype still comes from the float model
    for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
        scorer = QuickSilverScorer(load_model(path, dtype), qs)
        assert scorer.kv_itemsize == itemsize
        acct = Accounting(scorer.model.cfg, scorer.kv_itemsize)
        L = acct.cfg.n_layers
        acct.add(stats([3] * L, [6] * L, skipped=1), 3, 1, amq_checks=0, halted=1, fused=0)
        assert acct.cache_bytes_saved() == L * 2 * acct.cfg.n_kv_heads * acct.cfg.head_dim * itemsize


def test_bits_histogram_counts_the_tokens_that_chose_a_width(tiny_models, rng):
    """Every token that picked a Matryoshka width is in the histogram, and nothing else: the
    attention sinks and the scored positions keep 8 bits without choosing (they are not eligible)."""
    model, _ = tiny_models["llama-gqa"]
    qs = QuickSilverConfig(amq_layer=2, amq_low=6.54, amq_high=6.56)
    stream = rng.integers(0, 96, 100).astype(np.int32)
    windows = strided_windows(len(stream), 48, 16)
    for compact in (False, True):
        setting = dataclasses.replace(qs, compact=compact)
        _, report, _ = evaluate_quicksilver(QuickSilverScorer(model, setting), stream, windows, progress=False)
        hist = report["bits_histogram"]
        eligible = sum(max(0, w.offset - setting.n_sink) for w in windows)  # scope=context: positions n_sink..offset-1
        assert sum(hist.values()) == eligible
        assert hist["4"] + hist["2"] > 0  # widths were chosen
        amq_checks = report["overhead_flops"]["lm_head"] // lm_head_flops(model.cfg, 1)
        assert amq_checks == eligible  # one entropy projection per token that chose


def test_selection_overhead_is_the_voters_rows_at_each_scoring_layer(tiny_models, rng):
    """Accumulated attention selection scores n_q voters x T keys (T: the padded window) and projects
    the voters' q, k, v at every layer up to c, and nothing else; n_q = select_queries, or fewer."""
    model, _ = tiny_models["llama-deep"]
    c, n_q = 3, 8
    qs = QuickSilverConfig(halt="select", halt_cutoff_layer=c, keep_top_k=0.5, select_queries=n_q,
                           select_accumulate=True)
    stream = rng.integers(0, 96, 100).astype(np.int32)
    windows = strided_windows(len(stream), 48, 16)
    _, report, _ = evaluate_quicksilver(QuickSilverScorer(model, qs), stream, windows, progress=False)
    voters = [min(n_q, max(0, w.offset - qs.n_sink)) for w in windows]  # scope=context: positions n_sink..offset-1
    assert voters[0] == 0 and voters[1] == n_q  # the first window has no context
    T = max(w.length for w in windows)  # every batch is padded to the longest window: its scores are computed
    pairs = sum(voters) * T * c
    assert report["overhead_flops"]["attention"] == attention_flops(model.cfg, pairs) // 2
    assert report["overhead_flops"]["projections"] == qkv_projection_flops(model.cfg, sum(voters) * c)


def test_weight_reads_count_each_layers_width(tiny_models):
    """A float layer reads its matrix; a naive Matryoshka layer at r bits reads r/8 byte per weight
    plus its per-column scales: at 8 bits exactly the int8 reference and the bytes it stores."""
    from qsjax.quicksilver.mechanisms.matryoshka import quantize_blocks

    model, _ = tiny_models["llama-gqa"]
    dense = weight_reads(model.module())
    assert dense.per_token(8) == dense.per_token(2) == dense.float32 == 2 * dense.bfloat16
    weights = dense.float32 // 4
    module = model.module()
    stored = quantize_blocks(module, 0)  # every block: int8 codes + one float32 scale per column
    reads = weight_reads(module)
    assert reads.base == 0 and reads.per_token(8) == stored == dense.int8
    assert reads.views[8] - reads.views[4] == weights // 2 and reads.views[4] - reads.views[2] == weights // 4
    half = model.module()
    quantize_blocks(half, 1)
    upper, L = weight_reads(half), model.cfg.n_layers  # block 1 float, the others int8 (blocks alike)
    assert upper.base * L == dense.float32 and upper.views[8] * L == dense.int8 * (L - 1)


def test_weight_bytes_per_token_follow_the_tokens_widths(tiny_models, rng):
    """Every real token reads at its width (the tokens that chose none at 8 bits): with 0/0 all read
    the 8-bit views; with every in-scope token at 2 bits the mean drops by exactly their share."""
    model, _ = tiny_models["llama-gqa"]
    stream = rng.integers(0, 96, 100).astype(np.int32)
    windows = strided_windows(len(stream), 48, 16)
    for low, high in ((0.0, 0.0), (1e9, 1e9)):
        qs = QuickSilverConfig(scope="all", amq_layer=2, amq_low=low, amq_high=high)
        _, report, _ = evaluate_quicksilver(QuickSilverScorer(model, qs), stream, windows, progress=False)
        reads = weight_reads(QuickSilverScorer(model, qs).model.module())
        got, tokens, n2 = report["weight_bytes_per_token"], report["tokens"], report["bits_histogram"]["2"]
        assert got["every_token_at_8_bits"] == reads.per_token(8) and got["float32_dense"] == reads.float32
        assert (n2 > 0) == (low > 0)
        assert got["read"] * tokens == (tokens - n2) * reads.per_token(8) + n2 * reads.per_token(2)
        assert got["saved_vs_8_bits"] == 1 - got["read"] / reads.per_token(8)
