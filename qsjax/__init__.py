"""qsjax: GPT-2 and the Llama family in JAX/Flax, with QuickSilver's inference-time mechanisms.

The public API (imported on first use, so that `python -m qsjax.*` answers bad input at once):

    from qsjax import load_model, load_tokenizer, Generator, QuickSilverConfig, preset
    model = load_model("weights/smollm2-135m-instruct")
    gen = Generator(model, load_tokenizer("weights/smollm2-135m-instruct"), preset("long", model.cfg.n_layers))

Reading order:
1. `qsjax.dense`: the model as math (config, layers, rope, attention, modules, blocks, model,
   kvcache, sampler), then `qsjax.checkpoints` (safetensors, GGUF, tokenizer).
2. `qsjax.quicksilver.mechanisms`: the four mechanisms and context selection, each its equation.
3. `qsjax.quicksilver.window` and `qsjax.quicksilver.decoding`: the pass that wires them, in
   perplexity windows and in generation.
4. `qsjax.runtime` (the Generator, compiled programs, buckets, sharding), `qsjax.evaluation`
   (perplexity, FLOPs, passkey, plots), `qsjax.kvpolicy` (StreamingLLM / H2O eviction),
   `qsjax.speculative` (lossless speculative decoding: prompt lookup, self-drafting).
5. The commands: `generate`, `eval`, `passkey`, `weights`, `convert` (`python -m qsjax.<name>`).
"""

import importlib

_EXPORTS = {
    "load_model": "qsjax.checkpoints.hf_params",
    "load_tokenizer": "qsjax.checkpoints.tokenizer",
    "Generator": "qsjax.runtime.generator",
    "QuickSilverConfig": "qsjax.quicksilver.settings",
    "preset": "qsjax.quicksilver.settings",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qsjax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
