"""Running on several devices: a ("data", "model") mesh, and where each array lives on it.

Every parameter dimension carries a logical axis name (MaxText's idea, without its config): the
tables below name them per parameter, and `LOGICAL_TO_MESH` maps a name to a mesh axis. Attention
heads and the MLP hidden dimension are split over "model" (tensor parallelism), the batch over
"data", everything else is replicated:

    qkv_proj.w  [D, K (G+2) Dh]  ("embed", "qkv")   -> P(None, "model")   (Llama: K groups of heads)
    down_proj.w [F, D]           ("mlp", "embed")   -> P("model", None)
    activations [B, T, D]        ("batch", ...)     -> P("data")

The mesh axes are `Auto`: only the parameters and the first activation are placed or constrained;
XLA propagates shardings through the rest of the program and inserts the collectives, so a sharded
program computes the same numbers as the single-device one, within float rounding.

A dimension is split only if its units divide evenly over its mesh axis: whole heads for
heads and key/value groups (a head cut in two would be regathered before attention), pairs of
gate/up columns, otherwise its length.
Otherwise that dimension is replicated: SmolLM2-135M (9 query heads, 3 key/value heads, MLP 1,536)
with model=4 splits only its MLP. The batch follows the same rule (see `constrain_batch`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qsjax.dense.config import ModelConfig

AXES = ("data", "model")

# logical axis -> mesh axis (None: replicated on every device)
LOGICAL_TO_MESH = {
    "batch": "data",
    "heads": "model",  # query heads; also the input of the attention output projection
    "qkv": "model",  # fused q/k/v columns: GPT-2's [q | k | v], Llama's grouped by key/value head
    "mlp": "model",  # MLP hidden
    "gate_up": "model",  # Llama's fused gate/up columns, interleaved: F pairs
    "embed": None,
    "vocab": None,
    "positions": None,
    "norm": None,
}

# Linear layers by attribute name: the logical axes of their [D_in, D_out] weight. GPT-2's fused
# qkv is cut in contiguous column blocks of whole heads; a block may hold the end of q and the
# start of k, and XLA moves columns between devices after the split into q, k, v. Llama's fused
# maps are laid out so that a cut in whole units keeps what belongs together on one device: q/k/v
# by key/value group (`layers.fuse_qkv`), gate/up by (gate_f, up_f) pair (`layers.fuse_gate_up`).
LINEAR_AXES = {
    "qkv_proj": ("embed", "qkv"),
    "out_proj": ("heads", "embed"),
    "fc": ("embed", "mlp"),
    "proj": ("mlp", "embed"),
    "o_proj": ("heads", "embed"),
    "gate_up_proj": ("embed", "gate_up"),
    "down_proj": ("mlp", "embed"),
}
EMBEDDING_AXES = {"tok_embed": ("vocab", "embed"), "pos_embed": ("positions", "embed"), "lm_head": ("embed", "vocab")}
NORMS = ("ln1", "ln2", "attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")


def logical_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at `path` in the model state, e.g. ("blocks", 3, "qkv_proj", "w").

    A Linear holds w [D_in, D_out] and b [D_out], or, quantized (QuickSilver's AMQ), int8 codes
    [D_in, D_out] and scales [1, D_out] (naive) or per-width steps and offsets [3, G, D_out] (the
    calibrated store): codes shard like w, scales, offsets and biases like its output.
    Leading stacked-layer axes are replicated. An unknown parameter raises: a new parameter needs
    a rule, not a silent default."""
    owner, name = (path[-2] if len(path) > 1 else None), path[-1]
    if name in EMBEDDING_AXES:
        axes = EMBEDDING_AXES[name]
    elif owner in LINEAR_AXES:
        d_in, d_out = LINEAR_AXES[owner]
        axes = {"w": (d_in, d_out), "codes": (d_in, d_out), "scale": (None, d_out), "zero": (None, d_out),
                "b": (d_out,)}[name]
    elif owner in NORMS:
        axes = ("norm",)
    else:
        raise KeyError(f"no sharding rule for parameter {'.'.join(map(str, path))}")
    return (None,) * (ndim - len(axes)) + axes


def axis_units(cfg: ModelConfig) -> dict[str, int]:
    """Logical axes whose dimension is made of indivisible units: heads of head_dim columns; for
    Llama's fused q/k/v, key/value groups of G + 2 heads; for its fused gate/up, column pairs."""
    qkv = 3 * cfg.n_heads if cfg.arch == "gpt2" else cfg.n_kv_heads
    return {"heads": cfg.n_heads, "qkv": qkv, "gate_up": cfg.d_ff}


def partition_spec(axes: tuple, shape: tuple, cfg: ModelConfig, mesh_shape: dict[str, int]) -> P:
    """Logical axes -> PartitionSpec on a mesh of `mesh_shape` (axis name -> size); a dimension
    whose units do not divide evenly over its mesh axis is replicated."""
    units = axis_units(cfg)
    spec = []
    for name, length in zip(axes, shape):
        axis = LOGICAL_TO_MESH[name] if name is not None else None
        spec.append(axis if axis is not None and units.get(name, length) % mesh_shape[axis] == 0 else None)
    return P(*spec)


def state_shardings(state, cfg: ModelConfig, mesh: Mesh):
    """A NamedSharding for every array of an NNX state (same tree structure)."""

    def one(path, x):
        names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        return NamedSharding(mesh, partition_spec(logical_axes(names, x.ndim), x.shape, cfg, dict(mesh.shape)))

    return jax.tree_util.tree_map_with_path(one, state)


def shard_model(model, mesh: Mesh):
    """The model with its parameters placed on `mesh` and `model.mesh` set: its compiled functions
    (and any function of `model.module(state)` jitted over its state, e.g. the perplexity scorers)
    then run sharded, their inputs placed by `model.place` (rows over "data").

    For QuickSilver's AMQ, quantize first (`prepare`), then shard: the int8 codes and scales are
    placed by the same rules (and `prepare` leaves an already quantized model as it is)."""
    state = jax.tree.map(put, model.state, state_shardings(model.state, model.cfg, mesh))
    return dataclasses.replace(model, state=state, mesh=mesh)


def batch_sharding(batch: int, mesh: Mesh) -> NamedSharding:
    """Rows over "data" when they divide evenly, else replicated (every data group runs them all)."""
    return NamedSharding(mesh, P("data") if batch % mesh.shape["data"] == 0 else P())


def shard_batch(x, mesh: Mesh):
    """Place an input batch x [B, ...] with its rows over "data" (replicated when B does not divide).
    Inputs placed so are what makes a program data-parallel: XLA propagates their split.

    x is the whole batch, the same in every process (see `put`)."""
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    return put(x, batch_sharding(x.shape[0], mesh))


def put(x, sharding: NamedSharding):
    """x, whole and the same in every process, placed on `sharding`: each process copies the pieces
    its own devices hold (none can place another's). With several processes, jax.device_put would
    first check that every process holds the same value, an exchange of the whole array (every
    weight of the model); this copies without it. An array already spread over processes is moved
    by XLA."""
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
    """Device arrays -> NumPy arrays, whole in every process. An array split over the devices of
    several processes (rows over "data" on several hosts) is gathered first: that is a collective,
    so every process must call this at the same point."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(one, tree)


def make_mesh(data: int = 1, model: int = 1) -> Mesh:
    """A (data, model) mesh over the first data * model devices, with Auto axes (XLA propagates
    shardings; jax.make_mesh would otherwise make them Explicit, which needs sharding-aware code)."""
    devices = jax.devices()[: data * model]
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


class MeshError(ValueError):
    """A --mesh specification that cannot be built here (the command-line tools show it as one line)."""


def parse_mesh(spec: str, n_devices: int, n_processes: int = 1) -> tuple[int, int]:
    """'data=2,model=4' -> (2, 4); an axis left out has size 1.

    data * model may be less than the device count in one process (the first devices are used, so
    one machine can try several shapes); with several processes (multi-host) it must equal it,
    since every process must hold devices of the mesh to take part in its computations."""
    example = "e.g. --mesh data=2,model=4"
    sizes = {}
    for item in spec.split(","):
        name, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not name:
            raise MeshError(f"--mesh {spec!r}: expected AXIS=SIZE items separated by commas, {example}")
        if name not in AXES:
            raise MeshError(f"--mesh {spec!r}: unknown axis {name!r} (the axes are data and model), {example}")
        if name in sizes:
            raise MeshError(f"--mesh {spec!r}: axis {name} is given twice")
        if not value.isdigit() or int(value) < 1:
            raise MeshError(f"--mesh {spec!r}: the size of {name} must be a positive integer, got {value!r}")
        sizes[name] = int(value)
    data, model = sizes.get("data", 1), sizes.get("model", 1)
    needed = data * model
    if needed > n_devices:
        raise MeshError(
            f"--mesh {spec} needs data * model = {needed} devices but {n_devices} "
            f"{'is' if n_devices == 1 else 'are'} available; on CPU, start the process with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} to split the host into {needed} devices"
        )
    if n_processes > 1 and needed != n_devices:
        raise MeshError(
            f"--mesh {spec} uses {needed} of the {n_devices} devices of {n_processes} processes; with several "
            f"processes the mesh must span every device (data * model = {n_devices})"
        )
    return data, model


def mesh_from_spec(spec: str) -> Mesh:
    """The mesh a --mesh option asks for, on this process's (or, multi-host, all processes') devices."""
    return make_mesh(*parse_mesh(spec, jax.device_count(), jax.process_count()))
