"""QuickSilver's four inference-time mechanisms on frozen models (Khanna et al., 2025, arXiv 2506.22396).

- `halting`: Dynamic Token Halting (the paper's drift + entropy rule, depth cut-off, importance selection)
- `kvskip`: KV Cache Skipping for halted tokens (mask, zero, propagate)
- `fusion`: Contextual Token Fusion, causal-safe, with proportional attention
- `matryoshka`: Adaptive Matryoshka Quantization (int8 weights, nested 4- and 2-bit views)
- `forward`: the masked reference forward pass that wires them, with per-token decisions
- `config`: QuickSilverConfig and presets
"""

from qsjax.quicksilver.config import QuickSilverConfig, preset

__all__ = ["QuickSilverConfig", "preset"]
