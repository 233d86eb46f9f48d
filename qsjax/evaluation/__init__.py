"""Evaluation: what qsjax measures and how.

- `data`: the evaluation text (shipped WikiText-103 and C4 samples, or a file)
- `perplexity`: windowing protocols (strided, tail) and the compiled scoring function
- `flops`: analytic FLOP counts of the work a forward pass executes
- `passkey_task`: the needle-in-a-haystack task (prompts, cells, scoring)
- `plots`: figures drawn from data (frontiers, passkey grids); they import no task"""
