"""QuickSilver's command-line options: one source for every field's meaning (its metadata), the
groups in --help, --quicksilver-config replaying a report's setting exactly, and the errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import save_tiny_gpt2_with_tokenizer

from qsjax.quicksilver.options import FIELD_FLAGS, FIELDS
from qsjax.quicksilver.settings import GROUPS, QuickSilverConfig, preset
from qsjax.runtime.cli import UsageError

COMMANDS = ("generate", "eval", "passkey")


def command(name):
    import importlib

    return importlib.import_module(f"qsjax.{name}")


def help_text(name, flag, capsys) -> str:
    with pytest.raises(SystemExit):
        command(name).parse_args([flag])
    return capsys.readouterr().out


def test_every_field_has_its_meaning_in_metadata():
    for field in dataclasses.fields(QuickSilverConfig):
        meta = field.metadata
        assert meta["help"].strip() and "\n" not in meta["help"], field.name
        assert meta["group"] in GROUPS, field.name
        assert meta["help"] in QuickSilverConfig.__doc__, field.name  # the docstring reads the same text


@pytest.mark.parametrize("name", COMMANDS)
def test_every_mechanism_flag_has_a_help_line_in_its_group(name, capsys):
    full = help_text(name, "--help-all", capsys)
    short = help_text(name, "--help", capsys)
    for field, flag in FIELD_FLAGS.items():
        meta = FIELDS[field].metadata
        shown = [line for line in full.splitlines() if line.strip().startswith(flag + " ") or line.strip() == flag
                 or line.strip().startswith(flag + " {")]
        assert shown, f"{name} --help-all lacks {flag}"
        words = meta["help"].split()[:3]
        assert " ".join(words) in " ".join(full.split()), f"{flag}'s help is not shown"
        assert (f"\n  {flag}" in short) != meta["advanced"], flag  # advanced flags: --help-all only
        title = GROUPS[meta["group"]]
        assert full.index(title.split(" (")[0]) < full.index(f"\n  {flag}"), flag
    assert short.rstrip().endswith("see --help-all.")
    assert "QuickSilverConfig." not in full


def test_one_sink_flag_for_quicksilver_and_eviction():
    from qsjax.generate import parse_args
    from qsjax.kvpolicy.eviction import eviction_from_args
    from qsjax.quicksilver.options import quicksilver_from_args

    args = parse_args(["hi", "--n-sink", "2", "--kv-budget", "16"])
    assert eviction_from_args(args, False).n_sink == 2 and quicksilver_from_args(args, 2).n_sink == 2
    with pytest.raises(SystemExit):
        parse_args(["hi", "--kv-sinks", "2"])


@pytest.mark.parametrize("argv, message", [
    (["--quicksilver", "long", "--halt", "none"], "--quicksilver long with --halt none turns every mechanism off"),
    (["--quicksilver", "fast", "--halt", "none"], "--quicksilver fast with --halt none turns every mechanism off"),
    (["--quicksilver", "paper", "--halt", "none", "--amq-layer", "1"], None),  # Matryoshka stays on: allowed
])
def test_a_preset_cancelled_by_a_flag_is_an_error(argv, message):
    from qsjax.generate import check_args, parse_args

    if message is None:
        check_args(parse_args(["hi", *argv]))
        return
    with pytest.raises(UsageError, match=message):
        check_args(parse_args(["hi", *argv]))


def config_error(tmp_path, content, *extra) -> str:
    from qsjax.generate import check_args, parse_args

    path = tmp_path / "qs.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UsageError) as e:
        check_args(parse_args(["hi", "--quicksilver-config", str(path), *extra]))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("content, message", [
    ({"halt": "cutoff", "halt_cutoff_layer": 1, "bogus": 3}, "unknown field 'bogus'"),
    ({"halt": "cutoff", "halt_cutoff_layer": "1"}, 'halt_cutoff_layer must be a whole number, got "1"'),
    ({"halt": "cutoff", "halt_cutoff_layer": 1.5}, "halt_cutoff_layer must be a whole number, got 1.5"),
    ({"halt": "select", "halt_cutoff_layer": 1, "keep_top_k": 2}, "keep_top_k must be > 0 and <= 1, got 2"),
    ({"fuse_threshold": True}, "fuse_threshold must be a number or null, got true"),
    ({"kv_skip": "drop"}, "kv_skip must be one of ('mask', 'zero', 'propagate'), got 'drop'"),
    ({"n_sink": -1}, "n_sink must be >= 0, got -1"),
    ([1, 2], "expected a JSON object of QuickSilverConfig fields"),
    ("{not json", "not JSON"),
])
def test_config_file_errors_name_the_field(tmp_path, content, message):
    assert message in config_error(tmp_path, content)


def test_config_file_stands_alone(tmp_path):
    setting = {"halt": "cutoff", "halt_cutoff_layer": 1}
    assert "--keep-top-k cannot be given beside it" in config_error(tmp_path, setting, "--keep-top-k", "0.5")
    assert "--quicksilver cannot be given beside it" in config_error(tmp_path, setting, "--quicksilver", "fast")
    from qsjax.generate import check_args, parse_args

    with pytest.raises(UsageError, match="no such file"):
        check_args(parse_args(["hi", "--quicksilver-config", str(tmp_path / "missing.json")]))


def test_config_file_layers_are_checked_against_the_model(tmp_path):
    from qsjax.generate import parse_args
    from qsjax.quicksilver.options import quicksilver_from_args

    path = tmp_path / "qs.json"
    path.write_text(json.dumps(dataclasses.asdict(preset("fast", 30))))
    args = parse_args(["hi", "--quicksilver-config", str(path)])
    assert quicksilver_from_args(args, 30) == preset("fast", 30)
    with pytest.raises(UsageError, match="halt_cutoff_layer=25 but the model has 2 layers"):
        quicksilver_from_args(args, 2)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    sentences = ["The quick brown fox jumps over the lazy dog.", "A small model reads a small text, one token at a time."]
    return save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("tiny-gpt2"), sentences, n_positions=64, init_std=0.3)


def test_a_reports_setting_replays_to_the_same_tokens(tiny_gpt2, tmp_path, capsys, monkeypatch):
    """generate's settings.quicksilver (the whole config), given back through --quicksilver-config
    (the report itself, or the block alone), runs the same setting: the same tokens and statistics."""
    from qsjax.generate import main

    monkeypatch.setenv("QSJAX_COMPILATION_CACHE", "off")
    prompt = "The quick brown fox jumps over the lazy dog. A small model reads"
    base = [prompt, "--model", str(tiny_gpt2), "--max-new-tokens", "8"]
    flags = ["--halt-cutoff-layer", "1", "--kv-skip", "propagate", "--n-sink", "2", "--masked-reference"]
    assert main([*base, *flags, "--json", str(tmp_path / "first.json")]) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    setting = first["settings"]["quicksilver"]
    assert setting == dataclasses.asdict(QuickSilverConfig(halt="cutoff", halt_cutoff_layer=1, kv_skip="propagate",
                                                           n_sink=2, compact=False))
    (tmp_path / "block.json").write_text(json.dumps(setting))
    for source in ("first.json", "block.json"):
        assert main([*base, "--quicksilver-config", str(tmp_path / source), "--json", str(tmp_path / "again.json")]) == 0
        again = json.loads((tmp_path / "again.json").read_text())
        assert again["settings"]["quicksilver"] == setting
        assert [p["token_ids"] for p in again["prompts"]] == [p["token_ids"] for p in first["prompts"]]
        assert again["quicksilver"]["prompt"] == first["quicksilver"]["prompt"]
    dense = tmp_path / "dense.json"
    assert main([*base, "--json", str(dense)]) == 0
    off = json.loads(dense.read_text())
    assert off["settings"]["quicksilver"] is None and off["settings"]["quicksilver_preset"] is None
    assert main([*base, "--quicksilver-config", str(dense), "--json", str(tmp_path / "off.json")]) == 0  # null: off
    assert json.loads((tmp_path / "off.json").read_text())["settings"]["quicksilver"] is None
