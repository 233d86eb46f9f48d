"""The calibrated AMQ store: learned clipping of every linear layer, kept beside the model.

    python -m qsjax.weights calibrate-amq [--model M] [--group-size 64] [--steps 50] [--block-steps 50]

fits each linear layer's grids on its own (`calibration`), then refines each block's together on the
quantized model's own inputs (`blockfit`; `--block-steps 0` skips it), and writes
`<model dir>/amq-g<group>.npz` (the learned grids of every block's linear layers: gamma,
beta, step4, offset4, step2, offset2 [G, D_out] each; the calibration's settings and both stages'
output errors) and `amq-g<group>.npz.sha256`, the file's SHA-256, checked on every
load: a damaged store is an error that names the command that rebuilds it. Both files are written
under temporary names and renamed (the checksum first), so Ctrl-C leaves the old store or none.

When AMQ is on (`--amq-layer`), eval and generate load the store beside the model (of the default
group size, 64, when there are several) and quantize with it (nested group-wise grids, `nested`);
if there is none, AMQ runs the naive per-channel store and says so on stderr. Every report's
`weights` block names the store that ran and its group size, and the bytes the weights take in memory.

Calibration text: the last `CALIBRATION_TOKENS` tokens of each shipped data set (WikiText-103's
test split and the C4 validation sample), one row each. Evaluations of AMQ score the first tokens
of these streams (`--max-eval-tokens`, at most a few tens of thousands of the 305k / 502k): the
calibration text is never in their windows. (A full-file evaluation would include it.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from qsjax.quicksilver.blockfit import refine_blocks
from qsjax.quicksilver.calibration import Settings, calibrate_weight, input_grams, nested_quantizer
from qsjax.runtime.cli import UsageError, write_file_atomic

DEFAULT_GROUP = 64
CALIBRATION_TOKENS = 1024
CALIBRATION_DATA = ("wikitext103", "c4")
FORMAT = 1


class StoreError(UsageError):
    """The store is damaged or does not fit the model."""


def store_path(model_dir, group: int = DEFAULT_GROUP) -> Path:
    return Path(model_dir) / f"amq-g{group}.npz"


def rebuild_hint(group: int) -> str:
    return f"rebuild it with `python -m qsjax.weights calibrate-amq --model DIR --group-size {group}`"


@dataclasses.dataclass(frozen=True)
class ClipStore:
    """The learned grids per (layer, linear name): {name: [G, D_out]} (`nested`); what was run."""

    group: int
    clips: dict
    meta: dict

    def quantizer(self, layer: int, name: str):
        if (layer, name) not in self.clips:
            raise StoreError(f"the AMQ store has no clipping for block {layer} {name}; {rebuild_hint(self.group)}")
        clip = self.clips[layer, name]
        quantize = nested_quantizer(clip, self.group)

        def checked(w):
            if w.shape[-2] % self.group or clip["gamma"].shape != (w.shape[-2] // self.group, w.shape[-1]):
                raise StoreError(f"the AMQ store's block {layer} {name} does not fit the model's weight "
                                 f"{tuple(w.shape)}; {rebuild_hint(self.group)}")
            return quantize(w)

        return checked

    def to_bytes(self) -> bytes:
        arrays = {f"{layer}/{name}/{part}": a for (layer, name), clip in sorted(self.clips.items())
                  for part, a in sorted(clip.items())}
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(self.meta, sort_keys=True).encode(), np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClipStore:
        with np.load(io.BytesIO(data)) as f:
            meta = json.loads(f["meta"].tobytes())
            clips = {}
            for key in f.files:
                if key != "meta":
                    layer, name, part = key.split("/")
                    clips.setdefault((int(layer), name), {})[part] = f[key]
        return cls(meta["group_size"], clips, meta)


def save(store: ClipStore, model_dir) -> Path:
    """The checksum, then the store, each written atomically."""
    path, data = store_path(model_dir, store.group), store.to_bytes()
    write_file_atomic(str(path) + ".sha256", hashlib.sha256(data).hexdigest() + "\n")
    write_file_atomic(str(path), data)
    return path


def load(model_dir, group: int = DEFAULT_GROUP) -> ClipStore | None:
    """The store beside the model (None if there is none), its SHA-256 verified."""
    path = store_path(model_dir, group)
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
        recorded = Path(str(path) + ".sha256").read_text().strip()
    except OSError as e:
        raise StoreError(f"AMQ store {path}: cannot read it or its checksum ({e.strerror or e}); "
                         f"{rebuild_hint(group)}") from None
    if hashlib.sha256(data).hexdigest() != recorded:
        raise StoreError(f"AMQ store {path} is damaged (its SHA-256 is not the recorded one); {rebuild_hint(group)}")
    return ClipStore.from_bytes(data)


def calibration_tokens(tokenizer, n: int = CALIBRATION_TOKENS) -> np.ndarray:
    """The last n tokens of each shipped data set.  -> [len(CALIBRATION_DATA), n] int32"""
    from qsjax.evaluation.data import read_text, resolve_data, tokenize

    return np.stack([tokenize(tokenizer, read_text(resolve_data(d)))[-n:] for d in CALIBRATION_DATA])


def build(model, tokens, settings: Settings, progress: bool = True) -> ClipStore:
    """Calibrate every block's linear layers on tokens [B, T]: a progress bar over the weights."""
    from tqdm import tqdm

    from qsjax.dense.modules import Linear

    module = model.module()
    names = [[n for n, c in vars(b).items() if isinstance(c, Linear)] for b in module.blocks]
    bar = tqdm(total=len(module.blocks) * (1 + settings.block_steps) + sum(map(len, names)),
               desc="calibrating AMQ", unit="step", disable=not progress, file=sys.stderr)
    grams = input_grams(module, tokens, bar)
    clips, fits = {}, {}
    for layer, blk in enumerate(module.blocks):
        for name in names[layer]:
            f = calibrate_weight(getattr(blk, name).w[...], grams[layer][name], settings)
            clips[layer, name] = f.clip
            fits[f"{layer}/{name}"] = {"before": f.before, "after": f.after}
            bar.update(1)
    block_errors = None
    if settings.block_steps:
        clips, block_errors = refine_blocks(module, tokens, clips, settings, bar)
    bar.close()
    meta = {"format": FORMAT, "group_size": settings.group_size, "settings": dataclasses.asdict(settings),
            "calibration": {"data": list(CALIBRATION_DATA), "tokens_each": int(tokens.shape[1]),
                            "which": "the last tokens of each data set"},
            "output_error_energy": fits,
            "block_output_error": None if block_errors is None else {str(k): v for k, v in block_errors.items()}}
    return ClipStore(settings.group_size, clips, meta)


def find(model_dir) -> ClipStore | None:
    """The store beside the model: of the default group size if there is one, else the smallest group found."""
    found = sorted(int(p.name[5:-4]) for p in Path(model_dir).glob("amq-g*.npz") if p.name[5:-4].isdigit())
    groups = sorted(found, key=lambda g: (g != DEFAULT_GROUP, g))
    return load(model_dir, groups[0]) if groups else None


def amq_model(model, qs, model_dir, quiet: bool = False):
    """The model as a command runs AMQ: quantized with the calibrated store when there is one (else
    naive, said on stderr); unchanged when AMQ is off."""
    from qsjax.quicksilver.decoding.steps import prepare

    if qs is None or not qs.enabled or qs.amq_layer is None:
        return model
    store = find(model_dir)
    if store is None and not quiet:
        print(f"note: no calibrated AMQ store in {model_dir}: AMQ runs the naive per-channel slicing "
              "(build the store with `python -m qsjax.weights calibrate-amq`)", file=sys.stderr)
    return prepare(model, qs, store)


def weights_report(model) -> dict:
    """The `weights` block of every report: bytes held, and which AMQ store (None: not quantized)."""
    from qsjax.quicksilver.mechanisms.matryoshka import store_report, weight_bytes

    module = model.module()
    return {"bytes": weight_bytes(module), **{f"amq_{k}": v for k, v in store_report(module).items()}}


def calibrate_command(args) -> int:
    """`python -m qsjax.weights calibrate-amq`: checks first, then the work, then one atomic write."""
    from qsjax.checkpoints.load import load_model_checked, load_tokenizer_checked, read_config
    from qsjax.weights import resolve_model

    model_dir = resolve_model(args.model)
    cfg = read_config(args.model, model_dir)
    d_ins = {cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim}
    if any(d % args.group_size for d in d_ins):
        raise UsageError(f"--group-size {args.group_size} does not divide the model's input dimensions "
                         f"{sorted(d_ins)}")
    if not os.access(model_dir, os.W_OK):
        raise UsageError(f"cannot write the AMQ store into {model_dir} (not writable)")
    tokenizer = load_tokenizer_checked(args.model, model_dir)
    model = load_model_checked(args.model, model_dir, "float32")
    settings = Settings(group_size=args.group_size, steps=args.steps, widths_weight=args.widths_weight,
                        block_steps=args.block_steps)
    tokens = calibration_tokens(tokenizer, min(CALIBRATION_TOKENS, cfg.max_positions))
    store = build(model, tokens, settings, progress=not args.quiet)
    print(save(store, model_dir))
    return 0
