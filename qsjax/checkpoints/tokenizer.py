"""Tokenizers of a Hugging Face model directory, through the `tokenizers` library.

    tokenizer = load_tokenizer("weights/smollm2-135m-instruct")
    ids = tokenizer.encode("The capital of France is")
    text = tokenizer.decode(ids)

A directory provides either `tokenizer.json` or GPT-2's `vocab.json` + `merges.txt`; the special
token ids come from `generation_config.json`, `config.json` and `tokenizer_config.json`, the chat
template from `tokenizer_config.json` or `chat_template.jinja`.
"""

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from qsjax.dense.config import read_json_object

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
IN_WORKER_CHARS = 1 << 16  # longer texts are tokenized in a worker thread, so that Ctrl-C / SIGTERM act at once


class TextTooLong(ValueError):
    """Text that cannot fit a context (from its size alone), or a chat template rendering too much."""


def in_worker(fn, *args):
    """fn(*args) in a daemon thread while the main thread waits in Python, where SIGINT and SIGTERM
    raise at once (`fn` must release the GIL, as `tokenizers`' batch encoding does)."""
    box = {}

    def work():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    worker = threading.Thread(target=work, name="qsjax-tokenize", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` with the model's special tokens and chat template."""

    backend: tokenizers.Tokenizer
    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int | None
    add_bos: bool  # whether `encode(..., add_special_tokens=True)` starts with BOS
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes any token's text has (byte-level and byte-fallback spellings only
        overstate the bytes a token covers): n bytes of text need at least n / this many tokens."""
        return max(4, max(len(t.encode("utf-8")) for t in self.backend.get_vocab()))

    def check_fits(self, text: str, context: int, what: str = "the text") -> None:
        """Raise TextTooLong when `text` is too large to fit `context` tokens, from its size alone."""
        limit = context * self.max_token_bytes
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise TextTooLong(f"{what} is {size:,} bytes: it cannot fit the model's context of {context:,} tokens "
                              f"(at most {self.max_token_bytes} bytes a token, {limit:,} bytes in all)")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) <= IN_WORKER_CHARS:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return in_worker(lambda: self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def encode_prompt(self, prompt: str, chat: bool = False, context: int | None = None,
                      what: str = "the prompt") -> list[int]:
        """A user prompt's token ids: with `chat`, wrapped in the chat template as one user turn (the
        template adds the special tokens); with `context`, refused (TextTooLong) from its size, and its
        rendering's, when it cannot fit that many tokens."""
        if context is not None:
            self.check_fits(prompt, context, what)
        if chat:
            limit = 1 << 28 if context is None else context * self.max_token_bytes
            prompt = self.apply_chat_template([{"role": "user", "content": prompt}], limit=limit)
            if context is not None:
                self.check_fits(prompt, context, f"{what} in the chat template")
        return self.encode(prompt, add_special_tokens=not chat)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            limit: int = 1 << 28) -> str:
        """Render `[{"role": ..., "content": ...}, ...]` into the prompt text the model was tuned on;
        TextTooLong if it renders more than `limit` characters."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template (no chat_template in tokenizer_config.json, "
                             "no chat_template.jinja); drop --chat")
        try:
            return render_chat_template(
                self.chat_template,
                messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                limit=limit,
            )
        except TextTooLong:
            raise
        except Exception as e:  # a syntax error, an undefined name, raise_exception(...), a non-string template
            raise ValueError(f"the model's chat template cannot be rendered ({type(e).__name__}: {e}); drop --chat") from None


class BoundedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """A sandbox in which `*` (repetition) cannot build a value longer than `limit`."""

    intercepted_binops = frozenset({"*"})
    limit = 1 << 28

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if hasattr(seq, "__len__") and isinstance(times, int) and len(seq) * times > self.limit:
                    raise TextTooLong(f"the chat template builds a value of over {self.limit:,} characters")
        return super().call_binop(context, operator, left, right)


def render_chat_template(template: str, messages: list[dict], limit: int = 1 << 28, **variables) -> str:
    """Render a Hugging Face chat template (Jinja) the way transformers does: sandboxed, with
    `trim_blocks`, `lstrip_blocks`, loop controls and `raise_exception`; TextTooLong once the output
    (or a repeated value in it) passes `limit` characters."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.limit = limit
    env.globals["raise_exception"] = raise_exception
    parts, size = [], 0
    for part in env.from_string(template).generate(messages=messages, **variables):
        size += len(part)
        if size > limit:
            raise TextTooLong(f"the chat template renders over {limit:,} characters")
        parts.append(part)
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Loading


def read_json(path: Path) -> dict:
    """A JSON object file ({} if there is none); ValueError naming the file if it is malformed."""
    return read_json_object(path) if path.is_file() else {}


def token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string or an `AddedToken`-like dict."""
    return value["content"] if isinstance(value, dict) else value


def byte_level_bpe(vocab_path: Path, merges_path: Path, special_tokens: list[str]) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer from its `vocab.json` and `merges.txt`: byte-level BPE, no prefix space."""
    tokenizer = tokenizers.Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tokenizer


def load_backend(model_dir: Path, special_tokens: list[str], *, prefer_json: bool = True) -> tokenizers.Tokenizer:
    """`tokenizer.json` if the directory has one (and `prefer_json`), else `vocab.json` + `merges.txt`."""
    tokenizer_json = model_dir / "tokenizer.json"
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if tokenizer_json.is_file() and (prefer_json or not vocab.is_file()):
        return tokenizers.Tokenizer.from_file(str(tokenizer_json))
    if vocab.is_file() and merges.is_file():
        return byte_level_bpe(vocab, merges, special_tokens)
    raise FileNotFoundError(f"{model_dir} has no tokenizer.json, nor vocab.json and merges.txt")


def first_setting(key: str, *configs: dict):
    """The value of `key` in the first of `configs` that sets it (not to None)."""
    for config in configs:
        if config.get(key) is not None:
            return config[key]
    return None


def as_ids(value) -> tuple[int, ...]:
    """A token id setting (None, an int, or a list of ints) as a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def with_bos(backend: tokenizers.Tokenizer, bos_token: str, bos_id: int) -> tokenizers.Tokenizer:
    """Make `backend` start every encoding with BOS: for `add_bos_token: true` when its post-processor does not."""
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
    )
    return backend


def load_tokenizer(model_dir, *, prefer_json: bool = True) -> Tokenizer:
    """Load the tokenizer of a Hugging Face model directory (see the module docstring)."""
    model_dir = Path(model_dir)
    tokenizer_config = read_json(model_dir / "tokenizer_config.json")
    config = read_json(model_dir / "config.json")
    generation_config = read_json(model_dir / "generation_config.json")
    special = {key: token_text(tokenizer_config.get(key)) for key in SPECIAL_TOKEN_KEYS}
    backend = load_backend(model_dir, sorted({t for t in special.values() if t}), prefer_json=prefer_json)

    # ids: from generation_config.json, else config.json, else the tokens tokenizer_config.json names
    named_ids = {f"{key}_id": backend.token_to_id(token) for key, token in special.items() if token}
    bos_id = first_setting("bos_token_id", generation_config, config, named_ids)
    eos_ids = as_ids(first_setting("eos_token_id", generation_config, config, named_ids))
    pad_id = first_setting("pad_token_id", generation_config, config, named_ids)
    bos_token = special["bos_token"] or (backend.id_to_token(bos_id) if bos_id is not None else None)
    eos_token = special["eos_token"] or (backend.id_to_token(eos_ids[0]) if eos_ids else None)

    def starts_with_bos():
        return bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]

    if tokenizer_config.get("add_bos_token") and bos_id is not None and not starts_with_bos():
        backend = with_bos(backend, bos_token, bos_id)

    chat_template = tokenizer_config.get("chat_template")
    if chat_template is None and (model_dir / "chat_template.jinja").is_file():
        chat_template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return Tokenizer(
        backend=backend,
        bos_id=bos_id,
        eos_ids=eos_ids,
        pad_id=pad_id,
        add_bos=starts_with_bos(),
        chat_template=chat_template,
        bos_token=bos_token,
        eos_token=eos_token,
    )


# ---------------------------------------------------------------------------------------------
# Streaming


class StreamDecoder:
    """Turns token ids arriving one at a time into text increments.

    Decoding ids one by one breaks characters whose UTF-8 bytes span several byte-level tokens,
    so each `push` decodes all ids so far and returns the new suffix, holding back trailing
    U+FFFD replacement characters (an incomplete UTF-8 sequence) until more ids complete them.
    `flush` returns whatever is still held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def push(self, token_id) -> str:
        """Add one token id; return the text that became final (often "", never a partial character)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        return self._emit(text.rstrip("\ufffd"))

    def flush(self) -> str:
        """The rest of the text, including any incomplete character."""
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens))

    def _emit(self, text: str) -> str:
        new = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return new
