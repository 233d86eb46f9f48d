"""The real default model against Hugging Face transformers loading the same GGUF file.

transformers de-quantizes the Q4_1 GGUF to float32 (`dtype=torch.float32`; without it transformers 5
keeps the weights quantized), the same numbers `qsjax.convert` wrote into model.safetensors, so the
two models must agree: logits within 1e-3, identical greedy continuations, identical token ids.
"""

import numpy as np
import pytest

from qsjax.runtime.generator import Generator
from qsjax.checkpoints.hf_params import load_model
from qsjax.checkpoints.tokenizer import load_tokenizer
from qsjax.weights import gguf_path

pytestmark = pytest.mark.slow

EOS = 2
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village at the foot of the mountains, there lived an old clockmaker who",
    "<|im_start|>user\nWhat is the boiling point of water in Celsius?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf(default_model_dir):
    """(transformers model, transformers tokenizer), both read from the GGUF file."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf = gguf_path(default_model_dir)
    if gguf is None:
        pytest.skip(f"no GGUF file kept in {default_model_dir}")
    kwargs = {"gguf_file": gguf.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir, **kwargs)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def ours(default_model_dir):
    """(qsjax float32 Model, qsjax Tokenizer)."""
    return load_model(default_model_dir, "float32"), load_tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def prompt_ids(hf, ours):
    """Each prompt's token ids, the same from both tokenizers."""
    ids = [ours[1].encode(p) for p in PROMPTS]
    assert ids == [hf[1](p).input_ids for p in PROMPTS]
    assert ids[3][0] == 1 and ids[3][-1] == 198  # the chat markers are special tokens (<|im_start|>, "\n")
    assert len({len(p) for p in ids}) == len(ids)  # different lengths
    return ids


def hf_logits(model, ids, attention_mask=None, position_ids=None):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids),
            attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask),
            position_ids=None if position_ids is None else torch.as_tensor(position_ids),
        )
    return out.logits.numpy()


def test_logits_match_transformers(hf, ours, prompt_ids):
    model = ours[0]
    worst = 0.0
    for ids in prompt_ids:
        expected = hf_logits(hf[0], [ids])
        got = np.asarray(model.logits(np.asarray([ids])))
        worst = max(worst, np.abs(got - expected).max())
    # the same prompts as one left-padded batch: HF gets the padding mask and the shifted positions
    T = max(map(len, prompt_ids))
    start = np.array([T - len(p) for p in prompt_ids])
    tokens = np.full((len(prompt_ids), T), EOS)
    for row, p in zip(tokens, prompt_ids):
        row[T - len(p) :] = p
    slots = np.arange(T)
    valid = slots[None, :] >= start[:, None]
    positions = np.maximum(slots[None, :] - start[:, None], 0)
    expected = hf_logits(hf[0], tokens, valid.astype(np.int64), positions)
    got = np.asarray(model.logits(tokens, start))
    worst_batch = np.abs(got - expected)[valid].max()  # padded slots are garbage in both
    print(f"max |logits diff|: {worst:.2e} one by one, {worst_batch:.2e} left-padded batch")
    assert worst < 1e-3 and worst_batch < 1e-3


def test_greedy_continuations_match_transformers(hf, ours, prompt_ids):
    import torch

    model, tokenizer = hf
    result = Generator(*ours)(prompt_ids, max_new_tokens=32)  # one left-padded batch
    for ids, got in zip(prompt_ids, result.token_ids):
        with torch.no_grad():
            out = model.generate(
                torch.as_tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                max_new_tokens=32, eos_token_id=EOS, pad_token_id=EOS,
            )  # fmt: skip
        expected = out[0, len(ids) :].tolist()
        expected = expected[: expected.index(EOS)] if EOS in expected else expected
        assert got == expected, tokenizer.decode(ids)
    assert any(len(t) < 32 for t in result.token_ids)  # the chat prompt's answer ends with EOS


def test_tokenizer_matches_transformers_on_all_of_wikitext(hf, ours):
    from qsjax.evaluation.data import read_text, resolve_data

    text = read_text(resolve_data("wikitext103"))  # the copy shipped with qsjax
    expected = hf[1](text).input_ids  # add_special_tokens=True in both: SmolLM2 adds no BOS
    got = ours[1].encode(text)
    assert len(got) > 300_000 and got[0] != 1
    assert got == expected
    assert ours[1].decode(got) == text
