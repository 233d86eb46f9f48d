"""Every command the README shows is one its program accepts: the flags exist and take the values
given (each command's own `parse_args`; nothing runs). A renamed or removed flag, or a changed
choice, fails here instead of in a reader's terminal.

Commands written as templates are expanded first: a placeholder (TEMPLATE_VALUES) takes an example
value, `a|b` its first alternative, an optional `[--flag value]` is included, and a prompt given
as `"$(cat file)"` becomes a word."""

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_VALUES = {"D": "wikitext103", "R": "256"}  # README placeholders (--data D, --local-full R)
NOT_OURS = {"pytest", "pip"}  # `python -m pytest` and the like: other programs


def readme_commands() -> list[str]:
    """The `python ...` commands of the README's bash blocks (a line each, continuations joined,
    comments dropped) and of its inline code, each from `python` on (an environment prefix dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
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


COMMANDS = [c for c in readme_commands() if program(expanded(c))[0] is not None]


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 50  # the extraction still finds the README's commands
    names = {program(expanded(c))[0] for c in COMMANDS}
    assert {"qsjax.generate", "qsjax.eval", "qsjax.passkey", "qsjax.weights", "bench_long", "sweep"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=[c[7:87] for c in COMMANDS])
def test_readme_command_parses(command):
    name, argv = program(expanded(command))
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    try:
        module.parse_args(argv)
    except SystemExit as e:  # argparse: unknown flag or bad value (the one `error:` line is in the output)
        pytest.fail(f"{command!r} does not parse (exit {e.code})")
