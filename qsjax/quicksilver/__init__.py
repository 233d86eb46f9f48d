"""QuickSilver's four inference-time mechanisms on frozen models (Khanna et al., 2025, arXiv 2506.22396),
built on the dense model through its seams (the `linear` map of `qsjax.dense.blocks`, the slot rule of
`qsjax.dense.attention.attention`, the key mask and bias of `qsjax.dense.model.decode_step`).

- `settings`: QuickSilverConfig (every mechanism switchable alone) and the presets
- `mechanisms/`: halting, kvskip, fusion, matryoshka (the paper's four; `nested`, its calibrated
  store's grids), selection and local attention
- `window/`: the pass over causal windows that wires them (state, one layer's step, the pass, row
  compaction) and a window's NLL under it (scoring)
- `decoding/`: generation: the prompt's cache, its compaction, prefill and decode steps
- `scorer`: perplexity under QuickSilver (the dense harness's loop with QuickSilver's NLL)
- `accounting`: executed FLOPs, the work the decisions leave plus the mechanisms' own cost
- `options`: the command-line options shared by `generate`, `eval` and `passkey`
- `calibration`, `amqstore`: Matryoshka grids learned with optax, and their store beside the model
"""

from qsjax.quicksilver.settings import QuickSilverConfig, preset

__all__ = ["QuickSilverConfig", "preset"]
