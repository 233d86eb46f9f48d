"""QuickSilver's four inference-time mechanisms on frozen models (Khanna et al., 2025, arXiv 2506.22396),
built on the dense model through its seams (the `linear` map of `qsjax.blocks`, the slot rule of
`qsjax.attention.attention`, the key mask and bias of `qsjax.model.decode_step`).

The mechanisms, each the equation in its docstring:
- `halting`: Dynamic Token Halting (the paper's drift + entropy rule, depth cut-off, importance selection)
- `selection`: importance selection's scores (attention from the last queries, per head or summed,
  accumulated, pooled), recent window and keep budget
- `kvskip`: KV Cache Skipping for halted tokens (mask, zero, propagate)
- `fusion`: Contextual Token Fusion, causal-safe, with proportional attention
- `matryoshka`: Adaptive Matryoshka Quantization (int8 weights, nested 4- and 2-bit views)

The pass that wires them:
- `config`: QuickSilverConfig and presets
- `state`: the named state a pass carries (Tokens, Context, LayerStats, CacheEntries, WindowResult, ...)
- `layer`: one layer: the block for the computing tokens (masked reference or compacted), then the decisions
- `window`: the pass over causal windows (plain layers below the first decision, then `layer` steps)
- `compaction`: bucketed row compaction (gather, compute, scatter with static shapes)

Where it runs:
- `scoring`, `evaluate`: perplexity (the dense harness's loop) with executed-FLOP `accounting`
- `cache`, `generation`, `decode`: a prompt's cache with per-layer visibility, prefill, and decode steps
- `cli`: the command-line options shared by `qsjax.generate` and `qsjax.eval`
"""

from qsjax.quicksilver.config import QuickSilverConfig, preset

__all__ = ["QuickSilverConfig", "preset"]
