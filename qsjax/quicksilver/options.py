"""QuickSilver's command-line options, shared by `qsjax.generate`, `qsjax.eval` and `qsjax.passkey`.

Every mechanism flag, its help line, type, choices and range come from the QuickSilverConfig field's
metadata (qsjax.quicksilver.settings): nothing here repeats them.

`--quicksilver PRESET` starts from a preset (off, paper, fast, long); any mechanism flag overrides it,
but a flag that turns every mechanism of the preset off is refused. Without `--halt`, the policy
follows the flags given: `--halt-drift`/`--halt-entropy` mean the paper's drift rule, `--keep-top-k`
or any other selection flag (`--select-*`, `--halt-cutoff-layer2`, `--keep-top-k2`) importance
selection, `--halt-cutoff-layer` alone a depth cut-off.

`--quicksilver-config FILE` runs exactly the setting a JSON file holds: an object of QuickSilverConfig
fields (missing ones take the defaults), or a whole report of generate, eval or passkey (its
`settings.quicksilver`). It stands alone: no preset or mechanism flag beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from qsjax.runtime.cli import UsageError
from qsjax.quicksilver.settings import GROUPS, QuickSilverConfig, flag_of, preset

PRESETS = ("off", "paper", "fast", "long")
FIELDS = {f.name: f for f in dataclasses.fields(QuickSilverConfig)}
FIELD_FLAGS = {name: flag_of(f) for name, f in FIELDS.items() if flag_of(f) is not None}
# importance selection's fields: any of them given without --halt means --halt select
SELECT_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["group"] == "selection")


def count_or_share(text: str) -> int | float:
    """A whole number (a count: 256) or a share below 1 (0.7)."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def value_type(field: dataclasses.Field):
    """The type a field's flag parses (its annotation, less `| None`)."""
    if field.name == "select_recent":
        return count_or_share
    return {"int": int, "float": float, "str": str, "bool": bool}[field.type.split(" |")[0]]


def wants_help_all(argv) -> bool:
    return "--help-all" in (sys.argv[1:] if argv is None else argv)


def add_quicksilver_args(parser, help_all: bool = False) -> None:
    """The preset, --quicksilver-config and one flag per QuickSilverConfig field, in one group per
    mechanism; advanced fields are listed by --help-all only (--help says so at its end)."""
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    groups["preset"].add_argument(
        "--quicksilver", default="off", choices=PRESETS,
        help="preset: paper = the paper's halting rule and fusion at the best point of their threshold grid, on "
        "context tokens (qsjax's reading); fast = qsjax's "
        "calibrated setting for short windows; long = context selection for long prompts (no effect up to 1,024 "
        "context tokens); mechanism flags override it (default off)")
    groups["preset"].add_argument(
        "--quicksilver-config", metavar="FILE.json",
        help="run exactly the setting in FILE: a JSON object of QuickSilverConfig fields (missing ones: defaults) or "
        "a report of generate, eval or passkey (its settings.quicksilver); not combined with --quicksilver or "
        "mechanism flags")
    for name, field in FIELDS.items():
        flag, meta = FIELD_FLAGS.get(name), field.metadata
        if flag is None:
            continue
        shown = meta["help"] if help_all or not meta["advanced"] else argparse.SUPPRESS
        group, dest, kind = groups[meta["group"]], f"qs_{name}", value_type(field)
        if kind is bool:  # the flag sets the opposite of the default
            group.add_argument(flag, dest=dest, action="store_const", const=not field.default, default=None,
                               help=shown)
            continue
        metavar = None if meta["choices"] else {int: "N", float: "X", count_or_share: "N|X"}[kind]
        group.add_argument(flag, dest=dest, type=kind, default=None, choices=meta["choices"], metavar=metavar,
                           help=shown)
    groups["halting"].add_argument("--no-drift-test", action="store_true",
                                   help="drift: skip the drift test (entropy only)")
    groups["halting"].add_argument("--no-entropy-test", action="store_true",
                                   help="drift: skip the entropy test (drift only)")
    parser.add_argument("--help-all", action="help", help="show every option, the advanced QuickSilver ones too")
    if not help_all:
        hidden = ", ".join(FIELD_FLAGS[n] for n, f in FIELDS.items() if f.metadata["advanced"])
        parser.epilog = f"Advanced QuickSilver options ({hidden}): see --help-all."


def mechanism_flags(args) -> dict:
    """The QuickSilverConfig fields the mechanism flags set: field -> value."""
    given = {name: getattr(args, f"qs_{name}") for name in FIELD_FLAGS if getattr(args, f"qs_{name}") is not None}
    if args.no_drift_test:
        given["halt_drift"] = None
    if args.no_entropy_test:
        given["halt_entropy"] = None
    return given


def check_quicksilver_args(args) -> None:
    """The checks that need only the arguments (run before the model loads): numbers in range,
    --quicksilver-config alone and readable, combinations (e.g. selection needs --scope context)."""
    for name, value in mechanism_flags(args).items():
        why = FIELDS[name].metadata["range"] and FIELDS[name].metadata["range"].check(FIELD_FLAGS[name], value)
        if why:
            raise UsageError(why)
    quicksilver_from_args(args, None)


def in_flag_words(message: str, implied: str | None) -> str:
    """A QuickSilverConfig message with its field names as the flags that set them."""
    names = "|".join(FIELD_FLAGS)

    def with_value(m):
        field, value = m.group(1), m.group(2)
        if field == "halt" and implied:
            return f"--halt {value} (implied by {implied})"
        return f"{FIELD_FLAGS[field]} {value}"

    message = re.sub(rf"(?<![-\w])({names})=(\S+)", with_value, message)
    return re.sub(rf"(?<![-\w])({names})(?![-\w])", lambda m: FIELD_FLAGS[m.group(1)], message)


def read_config_file(path: str) -> dict | None:
    """--quicksilver-config FILE: the QuickSilverConfig fields it holds (None: QuickSilver off), each
    of the right type; every problem a UsageError naming the file and the field."""
    where = f"--quicksilver-config {path}"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{where} is a directory; give a JSON file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    except ValueError as e:
        raise UsageError(f"{where}: not JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("settings"), dict) and "quicksilver" in data["settings"]:
        data = data["settings"]["quicksilver"]  # a report
    if data is None:
        return None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a JSON object of QuickSilverConfig fields (or a report)")
    for name, value in data.items():
        if name not in FIELDS:
            raise UsageError(f"{where}: unknown field {name!r} (QuickSilverConfig has {', '.join(FIELDS)})")
        field = FIELDS[name]
        kind = value_type(field)
        ok = (value is None and "None" in field.type) or (
            type(value) is kind if kind in (str, bool, int) else type(value) in (int, float))
        if not ok:
            wanted = {str: "a string", bool: "true or false", int: "a whole number"}.get(kind, "a number")
            wanted += " or null" if "None" in field.type else ""
            raise UsageError(f"{where}: {name} must be {wanted}, got {json.dumps(value)}")
    return data


def quicksilver_from_args(args, n_layers: int | None) -> QuickSilverConfig:
    """The QuickSilverConfig the options ask for; a bad combination is a UsageError in the flags'
    words.  `n_layers=None`: only the checks that do not depend on the model."""
    given = mechanism_flags(args)
    if getattr(args, "quicksilver_config", None) is not None:
        return config_from_file(args, given, n_layers)
    implied = None
    if "halt" not in given:
        chosen = [field for field in SELECT_FIELDS if field in given]
        if chosen:
            given["halt"], implied = "select", FIELD_FLAGS[chosen[0]]
        elif {"halt_drift", "halt_entropy"} & given.keys():
            given["halt"], implied = "drift", "the drift/entropy flags"
        elif "halt_cutoff_layer" in given:
            given["halt"], implied = "cutoff", "--halt-cutoff-layer"
    try:
        base = preset(args.quicksilver, n_layers or 1_000_000)
        qs = dataclasses.replace(base, **given)
        if n_layers is not None:
            qs.validate_for(n_layers)
    except ValueError as e:
        raise UsageError(f"QuickSilver options: {in_flag_words(str(e), implied)}") from None
    if base.enabled and not qs.enabled:
        cancel = [f"{FIELD_FLAGS[n]} {given[n]}" for n in given if given[n] != getattr(base, n)]
        raise UsageError(f"--quicksilver {args.quicksilver} with {', '.join(cancel)} turns every mechanism off; "
                         "give one or the other")
    return qs


def config_from_file(args, flags: dict, n_layers: int | None) -> QuickSilverConfig:
    """--quicksilver-config: the file's setting, exactly (QuickSilver off for a null one)."""
    if args.quicksilver != "off" or flags:
        beside = "--quicksilver" if args.quicksilver != "off" else FIELD_FLAGS.get(next(iter(flags)), "--no-*-test")
        raise UsageError(f"--quicksilver-config runs the file's setting exactly; {beside} cannot be given beside it")
    fields = read_config_file(args.quicksilver_config)
    try:
        qs = QuickSilverConfig() if fields is None else QuickSilverConfig(**fields)
        if n_layers is not None:
            qs.validate_for(n_layers)
    except ValueError as e:
        raise UsageError(f"--quicksilver-config {args.quicksilver_config}: {e}") from None
    return qs


def recorded(args, qs: QuickSilverConfig | None) -> dict:
    """How every report records the setting (`settings` keys): the whole QuickSilverConfig
    (None: off), which --quicksilver-config replays, and the preset it started from."""
    on = qs is not None and qs.enabled
    return {"quicksilver": dataclasses.asdict(qs) if on else None,
            "quicksilver_preset": args.quicksilver if on and args.quicksilver != "off" else None}
