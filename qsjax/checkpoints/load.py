"""Loading the model and tokenizer for the commands (`generate`, `eval`): every failure is one
UsageError that names the directory (or the default model) and how to fix it.

The config is read first, on its own (it is small), so that checks needing only the layer count or
the context run before the weights load.
"""

from __future__ import annotations

from pathlib import Path

from qsjax.runtime.cli import UsageError


def model_label(arg: str | None, model_dir: Path) -> str:
    """How messages name the model: the --model the user typed, or the default model."""
    if arg is None:
        return f"the default model ({model_dir})"
    return f"--model {arg}"


def repair_hint(arg: str | None) -> str:
    from qsjax.weights import KNOWN_MODELS

    if arg is None or arg in KNOWN_MODELS:
        return "; repair it with `python -m qsjax.weights fetch`"
    return ""


def read_config(arg: str | None, model_dir: Path):
    """The ModelConfig of `model_dir` (config.json only)."""
    from qsjax.dense.config import ConfigError
    from qsjax.dense.families import load_config

    try:
        return load_config(model_dir)
    except (ConfigError, OSError) as e:
        raise UsageError(f"{model_label(arg, model_dir)}: {e}{repair_hint(arg)}") from None


def load_model_checked(arg: str | None, model_dir: Path, dtype: str):
    from qsjax.dense.config import ConfigError
    from qsjax.checkpoints.hf_params import WeightError, load_model

    try:
        return load_model(model_dir, dtype)
    except (WeightError, ConfigError, OSError) as e:
        raise UsageError(f"{model_label(arg, model_dir)}: {e}{repair_hint(arg)}") from None


def load_tokenizer_checked(arg: str | None, model_dir: Path):
    from qsjax.checkpoints.tokenizer import load_tokenizer

    try:
        return load_tokenizer(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{model_label(arg, model_dir)}: {e}{repair_hint(arg)}") from None
    except Exception as e:  # the `tokenizers` library raises a bare Exception for a malformed tokenizer.json
        raise UsageError(f"{model_label(arg, model_dir)}: cannot read its tokenizer ({e}){repair_hint(arg)}") from None


def check_vocabulary(ids, vocab_size: int) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer larger than the model)."""
    top = max((max(row) for row in ids if len(row)), default=-1)
    if top >= vocab_size:
        raise UsageError(f"the tokenizer gives id {top}, outside the model's vocabulary ({vocab_size} ids); "
                         "the tokenizer does not belong to this model")

