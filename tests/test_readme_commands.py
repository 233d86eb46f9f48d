"""Every command the documentation shows (README.md and every Markdown page under docs/) is one its
program accepts: the flags exist and take the values given (each command's own `parse_args`;
nothing runs). A renamed or removed flag, or a changed choice, fails here, naming the page, instead
of in a reader's terminal.

Commands written as templates are expanded first: a placeholder (TEMPLATE_VALUES) takes an example
value, `a|b` its first alternative, an optional `[--flag value]` is included, and a prompt given
as `"$(cat file)"` becomes a word."""

import importlib
import re
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_VALUES = {"D": "wikitext103", "R": "256"}  # placeholders in the docs (--data D, --local-full R)
NOT_OURS = {"pytest", "pip"}  # `python -m pytest` and the like: other programs


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def page_commands(page: Path) -> list[str]:
    """The `python ...` commands of a page's bash blocks (a line each, continuations joined,
    comments dropped) and of its inline code, each from `python` on (an environment prefix dropped)."""
    text = page.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [line.split("  #")[0] for line in block.replace("\\\n", " ").splitlines()]
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]*python [^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))]
    commands = []
    for line in lines:
        for part in re.split(r" \| | && | &(?: |$)", line):  # pipes, chains, background jobs
            if "python " in part:
                commands.append(part[part.index("python "):].strip())
    return commands


def expanded(command: str) -> list[str]:
    """A template command as the words of one real command."""
    command = re.sub(r'"\$\([^)]*\)"', "TEXT", command)
    command = re.sub(r"\[(--[^\]]*)\]", r"\1", command)
    command = re.sub(r"(?<=\S)\|\S+", "", command)
    return [TEMPLATE_VALUES.get(word, word) for word in shlex.split(command)]


def program(words: list[str]) -> tuple[str | None, list[str]]:
    """(the module that parses the command, its arguments); None for a program that is not ours."""
    if words[1] == "-m":
        name = words[2]
        return (None if name.split(".")[0] in NOT_OURS else name), words[3:]
    if words[1].startswith("scripts/"):
        return Path(words[1]).stem, words[2:]
    return None, words[2:]


class Shown(NamedTuple):
    page: str  # relative to the repository root
    command: str


SHOWN = [Shown(str(page.relative_to(ROOT)), c) for page in PAGES for c in page_commands(page)
         if program(expanded(c))[0] is not None]


def test_the_docs_show_commands():
    assert len(SHOWN) > 50  # the extraction still finds the documentation's commands
    names = {program(expanded(s.command))[0] for s in SHOWN}
    assert {"qsjax.generate", "qsjax.eval", "qsjax.passkey", "qsjax.weights", "bench_long", "sweep"} <= names
    assert any(s.page == "README.md" for s in SHOWN)  # the front door shows commands too


@pytest.mark.parametrize("shown", SHOWN, ids=[f"{s.page}: {s.command[7:80]}" for s in SHOWN])
def test_documented_command_parses(shown):
    command = shown.command
    name, argv = program(expanded(command))
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    try:
        module.parse_args(argv)
    except SystemExit as e:  # argparse: unknown flag or bad value (the one `error:` line is in the output)
        if e.code == 0 and {"--help", "--help-all"} & set(argv):
            return  # a help command: it printed the help and exits 0
        pytest.fail(f"{shown.page}: {command!r} does not parse (exit {e.code})")
