"""The mechanisms, each the equation in its docstring: `halting` (Dynamic Token Halting), `kvskip`
(KV Cache Skipping), `fusion` (Contextual Token Fusion), `matryoshka` (Adaptive Matryoshka
Quantization; `nested`, the calibrated store's group-wise grids whose narrower views are the codes'
top bits), and their neighbours `selection` (importance selection of context tokens) and `local`
(local attention for far context)."""
