"""QuickSilver in generation: `cache` (a prompt's cache with per-layer visibility), `compacted` (each
layer's cache gathered to the entries it shows), `steps` (prefill through the mechanisms, decode
steps, the generated tokens' report), `decode` (one new token per row, with the window pass's rules)."""
