"""The passkey retrieval task (needle in a haystack): prompts, cells, the answer rule and scoring.

`python -m qsjax.passkey` is its command line (its docstring gives the prompt layout, the length and
depth rules and the answer rule); `qsjax.evaluation.plots.passkey_grids` draws the matrices that
`accuracy_matrix` makes."""

from __future__ import annotations

import re
import sys

import numpy as np

from qsjax.runtime.cli import UsageError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key?"
ANSWER = "The pass key is"
ANSWER_RULE = "correct when the first run of decimal digits in the continuation is exactly the key"
LENGTH_RULE = "prompt + max_new_tokens = length: the prompt is exactly length - max_new_tokens tokens"


def first_number(text: str) -> str | None:
    """The first run of decimal (ASCII) digits in `text`, or None."""
    match = re.search(r"[0-9]+", text)
    return match.group() if match else None


def is_correct(answer: str, key: int) -> bool:
    return first_number(answer) == str(key)


def depth_fractions(n: int) -> list[float]:
    """N depths evenly spaced over [0, 1]; one depth is the middle."""
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def split_sentences(text: str) -> list[str]:
    """Sentences, each with the whitespace before it (so "".join gives the text back): a cut after
    . ! or ? followed by whitespace, and at the end of every non-blank line."""
    return [s for s in re.split(r"(?<=[.!?])(?=\s)|(?<=\S)(?=\n)", text) if s]


def haystack_tokens(encode_batch, sentences: list[str], n: int) -> tuple[list[int], list[int]]:
    """The first n tokens of the sentences repeated as often as needed, each sentence tokenized on
    its own, and the sentence boundaries among them (token offsets, 0 and n included).
    `encode_batch(list_of_text) -> list of id lists`."""
    ids, boundaries, i = [], [0], 0
    while len(ids) < n:
        chunk = [sentences[(i + j) % len(sentences)] for j in range(256)]
        i += len(chunk)
        for piece in encode_batch(chunk):
            ids += piece
            if len(ids) >= n:
                break
            if piece:
                boundaries.append(len(ids))
    return ids[:n], boundaries + ([n] if boundaries[-1] != n else [])


def build_prompt(head, haystack, boundaries, depth: float, needle, tail) -> tuple[list[int], int]:
    """head + haystack[:b] + needle + haystack[b:] + tail, b the boundary nearest to depth x
    len(haystack) (the earlier one on a tie) -> (token ids, b)."""
    target = depth * len(haystack)
    b = min(boundaries, key=lambda x: (abs(x - target), x))
    return [*head, *haystack[:b], *needle, *haystack[b:], *tail], b


def prompt_frame(tokenizer, chat: bool) -> tuple[list[int], list[int]]:
    """The tokens before the haystack (BOS, instruction) and after it (question, answer start)."""
    if not chat:
        bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
        return bos + tokenizer.encode(INSTRUCTION, add_special_tokens=False), \
            tokenizer.encode(f"{QUESTION} {ANSWER}", add_special_tokens=False)
    before, after = tokenizer.apply_chat_template([{"role": "user", "content": "\0"}]).split("\0")
    return (tokenizer.encode(before + INSTRUCTION, add_special_tokens=False),
            tokenizer.encode(QUESTION + after + ANSWER, add_special_tokens=False))


def make_cells(tokenizer, haystack_text: str, lengths, depths, trials, seed, max_new, chat,
               flag: str = "--lengths") -> list[dict]:
    """Every (length, depth) cell with its keys and prompts (token ids); UsageError (naming `flag`) for
    a length too short to hold a prompt and its answer."""
    head, tail = prompt_frame(tokenizer, chat)
    keys = np.random.default_rng(seed).integers(10_000, 100_000, size=(len(lengths), len(depths), trials))
    needles = {int(k): tokenizer.encode(NEEDLE.format(key=int(k)), add_special_tokens=False) for k in keys.flat}
    fixed = len(head) + len(tail) + max(map(len, needles.values()))
    for length in lengths:
        if length - max_new - fixed < 1:
            raise UsageError(f"{flag} {length} is too short: instruction, needle and question take {fixed} tokens "
                             f"and the answer {max_new}; give at least {fixed + max_new + 1}")
    sentences = split_sentences(haystack_text)
    longest, boundaries = haystack_tokens(lambda texts: tokenizer.encode_batch(texts, add_special_tokens=False),
                                          sentences, max(lengths) - max_new - len(head) - len(tail))
    cells = []
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            prompts, at, hay_lengths = [], [], []
            for key in keys[i, j]:
                n = length - max_new - len(head) - len(tail) - len(needles[int(key)])
                stops = [b for b in boundaries if b < n] + [n]
                ids, b = build_prompt(head, longest[:n], stops, depth, needles[int(key)], tail)
                prompts.append(ids)
                at.append(b)
                hay_lengths.append(n)
            cells.append(dict(length=length, depth=depth, keys=[int(k) for k in keys[i, j]], prompts=prompts,
                              needle_at=at, haystack_tokens=hay_lengths))
    return cells


def run_cells(gen, cells, max_new: int, progress: bool, desc: str, batch_size: int | None = None) -> dict:
    """Generate for every cell (its trials in batches of `batch_size`, default all at once): accuracy,
    cells and timings."""
    from tqdm import tqdm

    from qsjax.runtime.memory import batches

    out, seconds, compile_s = [], 0.0, 0.0
    for cell in tqdm(cells, desc=desc, unit="cell", file=sys.stderr, disable=not progress):
        results = [gen(batch, max_new_tokens=max_new)
                   for batch in batches(cell["prompts"], batch_size or len(cell["prompts"]))]
        seconds += sum(r.seconds for r in results)
        compile_s += sum(r.seconds_compile for r in results)
        texts = [text for r in results for text in r.texts]
        trials = [dict(key=key, answer=text, correct=is_correct(text, key), prompt_tokens=len(ids),
                       needle_at=b, depth_actual=b / n)
                  for key, text, ids, b, n in zip(cell["keys"], texts, cell["prompts"], cell["needle_at"],
                                                  cell["haystack_tokens"])]
        correct = sum(t["correct"] for t in trials)
        out.append(dict(length=cell["length"], depth=cell["depth"], correct=correct, trials_run=len(trials),
                        accuracy=correct / len(trials), trials=trials))
    total = sum(c["trials_run"] for c in out)
    return dict(accuracy=sum(c["correct"] for c in out) / total, cells=out, seconds=seconds, seconds_compile=compile_s)


def grid(run: dict) -> dict:
    """(length, depth) -> cell."""
    return {(c["length"], c["depth"]): c for c in run["cells"]}


def report_runs(report: dict) -> list[tuple[str, dict]]:
    """The runs a `qsjax.passkey` report holds, named: dense first when it compares, then its setting."""
    label = report["settings"]["label"]
    return [("dense", report["dense"]), (label, report)] if "dense" in report else [(label, report)]


def accuracy_matrix(run: dict, lengths, depths) -> np.ndarray:
    """A run's accuracy per cell: lengths (rows) x depths (columns)."""
    g = grid(run)
    return np.array([[g[n, d]["accuracy"] for d in depths] for n in lengths])
