"""The dense model, readable on its own as math (no QuickSilver in here).

Reading order: `config` (ModelConfig, frozen, from a Hugging Face config.json) -> `layers` (norms, MLP,
projections as pure functions) -> `rope` -> `attention` (blockwise, online softmax, never T x T) ->
`modules` (NNX modules that only hold parameters) -> `blocks` (a transformer block as a function of
its parameters) -> `model` (the compiled forward passes over the split state) -> `kvcache` (a
functional, preallocated cache) -> `sampler` (sampling and the generation loop)."""
