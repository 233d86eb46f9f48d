"""qsjax: GPT-2 and Llama in JAX/Flax, with QuickSilver's inference-time mechanisms."""

__version__ = "0.1.0"
