"""The prompts of scripts/bench_speculative.py, chosen deterministically from the shipped C4 sample.

- grounded: a task on a passage of C4 (copy, extract, summarise, quote), in the chat template: the
  answer repeats spans of the prompt, where prompt lookup's drafts are accepted;
- open: chat questions and story starts with nothing to copy from;
- long: about `long_tokens` tokens of C4 text (the documents after the passages) with a summary
  instruction, in the chat template, run under `--quicksilver long`.

Passages: the first C4 documents (file order) of PASSAGE_CHARS characters, one per task.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from qsjax.evaluation.data import decode_utf8, read_bytes, resolve_data

GROUNDED_TASKS = (
    ("copy", "Repeat the following text word for word.\n\n{text}"),
    ("extract", "List the facts stated in the following text, one per line, in the text's own words.\n\n{text}"),
    ("summarise", "Summarise the following text.\n\n{text}"),
    ("quote", "Quote the sentences of the following text that give its main point.\n\n{text}"),
)
OPEN_PROMPTS = (
    ("story", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    ("habits", "What are some good habits for staying healthy? Explain each one briefly."),
    ("rainbow", "Explain to a child how a rainbow forms."),
    ("poem", "Write a poem about autumn in a big city."),
)
LONG_INSTRUCTION = "\n\nSummarise the text above, quoting its most important sentences."
PASSAGE_CHARS = (700, 1500)


class Prompt(NamedTuple):
    name: str
    ids: list[int]  # the chat-templated prompt's token ids


class Group(NamedTuple):
    name: str  # grounded, open or long
    prompts: list[Prompt]
    new_tokens: int
    quicksilver: bool  # run qsjax under --quicksilver long


def c4_documents() -> list[str]:
    """The shipped C4 sample's documents, in file order."""
    lines = decode_utf8(read_bytes(resolve_data("c4")), "the C4 sample").split("\n")
    return [json.loads(line)["text"] for line in lines if line.strip()]


def passages(docs: list[str], count: int) -> list[int]:
    """The indices of the first `count` documents of PASSAGE_CHARS characters."""
    lo, hi = PASSAGE_CHARS
    return [i for i, d in enumerate(docs) if lo <= len(d) <= hi][:count]


def grounded(tokenizer, docs: list[str], count: int) -> list[Prompt]:
    picked = passages(docs, count)
    return [Prompt(f"{task}-c4doc{i}", tokenizer.encode_prompt(template.format(text=docs[i].strip()), chat=True))
            for (task, template), i in zip(GROUNDED_TASKS, picked)]


def open_ended(tokenizer, count: int) -> list[Prompt]:
    return [Prompt(name, tokenizer.encode_prompt(text, chat=True)) for name, text in OPEN_PROMPTS[:count]]


def long_prompt(tokenizer, docs: list[str], tokens: int, skip: int) -> Prompt:
    """About `tokens` tokens of C4 (the documents from index `skip` on, whole documents until the
    count is reached, then cut at a token) and the instruction, in the chat template."""
    ids, first = [], skip
    while len(ids) < tokens and first < len(docs):
        ids += tokenizer.encode(docs[first].strip() + "\n\n", add_special_tokens=False)
        first += 1
    text = tokenizer.decode(ids[:tokens])
    return Prompt(f"summary-c4docs{skip}-{first - 1}", tokenizer.encode_prompt(text + LONG_INSTRUCTION, chat=True))


def prompt_groups(tokenizer, args) -> list[Group]:
    """The groups args ask for: --prompts passages and questions, and the long prompt unless --skip-long."""
    docs = c4_documents()
    count = min(args.prompts, len(GROUNDED_TASKS))
    groups = [Group("grounded", grounded(tokenizer, docs, count), args.new_tokens, False),
              Group("open", open_ended(tokenizer, count), args.new_tokens, False)]
    if not args.skip_long:
        skip = max(passages(docs, len(GROUNDED_TASKS))) + 1
        groups.append(Group("long", [long_prompt(tokenizer, docs, args.long_tokens, skip)], args.long_new_tokens, True))
    return groups
