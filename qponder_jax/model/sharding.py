"""The mesh, and the two tables that map logical tensor axes onto it.

Layers name their dimensions (`embed`, `mlp`, `heads`, ...) through an `axes=` metadata entry on every
`nnx.Param`, and activations through `constrain(x, axes)`. Only the rules tables below say which mesh
axis each name lands on. A mesh axis that does not divide a dimension is dropped for that tensor (for
example 2 kv heads on a tensor axis of 4), so any mesh shape is valid for any model size.

Two layouts share the mesh. `LOGICAL_RULES` (training, "train"): parameters FSDP-sharded over 'fsdp' and
tensor-parallel over 'tensor'. `DECODE_RULES` (the sampler, "decode"): weights stationary, replicated over
'data' and 'fsdp' and tensor-parallel over 'tensor', so a decode step moves only activations; the batch's rows
split over 'data' x 'fsdp' in both. The sampler reshards its weights into the decode layout once per call
(`qponder_jax.sampling`) and traces under `use_rules(DECODE_RULES)`, so the layers' `constrain` calls follow it.
`choose_layout` picks the decode layout when its weights fit `DECODE_BUDGET_BYTES` per device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axes (a tuple shards one dimension over several mesh axes), None = replicated
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "patches": None,
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "batch_replica": ("data",),  # rows over the data axis only: whole within a model replica
    "lookup_batch": None,  # rows of the embedding lookup: every id on every device (each looks up its own columns)
    "vocab_parallel": ("fsdp", "tensor"),  # the sampler's LM head: vocab over every model axis (see Qwen25VL)
    # parameters
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "qkv": None,  # fused [3, heads, head_dim] columns (vision): a contiguous split would not follow heads
    "kv_heads": ("tensor",),
    "head_dim": None,
    "patch_in": None,
    "norm": None,
}
# the sampler's layout: LOGICAL_RULES with every weight whole over 'data' and 'fsdp' (only 'tensor' splits it), and
# the LM head's vocabulary and the rows it multiplies split like the other weights and rows
DECODE_RULES: dict[str, tuple[str, ...] | None] = {
    **LOGICAL_RULES,
    "embed": None,
    "vocab_parallel": ("tensor",),
    "batch_replica": ("data", "fsdp"),
    "lookup_batch": ("data", "fsdp"),
}
LAYOUTS = {"train": LOGICAL_RULES, "decode": DECODE_RULES}  # layout name -> rules table
LAYOUT_CHOICES = ("auto", *LAYOUTS)  # what a config or `generate(layout=...)` may ask for
# "auto" decodes in the decode layout when its compute-dtype text weights take at most this many bytes per device
# (7B in bf16: 15.2 GB whole, 3.8 GB over a tensor axis of 4); the rest of the device holds the KV cache and the
# training state, which the decode layout leaves where it is
DECODE_BUDGET_BYTES = 8 * 1024**3
_ACTIVE_RULES: contextvars.ContextVar[Mapping] = contextvars.ContextVar("rules", default=LOGICAL_RULES)


@contextlib.contextmanager
def use_rules(rules: Mapping[str, tuple[str, ...] | None]) -> Iterator[None]:
    """`constrain` and the default of `logical_to_spec` follow `rules` inside this context (while tracing)."""
    token = _ACTIVE_RULES.set(rules)
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def make_mesh(shape: Sequence[int] = (1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types; -1 in `shape` takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries for {MESH_AXES}, got {tuple(shape)}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one -1 in mesh shape, got {tuple(shape)}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh shape {tuple(shape)}")
        shape[shape.index(-1)] = len(devices) // known
    n = int(np.prod(shape))
    if n > len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {n} devices, only {len(devices)} available")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:n])


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping | None = None
) -> PartitionSpec:
    """PartitionSpec for a tensor of `shape` whose dimensions are named `axes`, by `rules` (default: the active
    table, `LOGICAL_RULES` unless inside `use_rules`).

    Mesh axes that are missing from the mesh, already used by an earlier dimension, or that do not divide
    the dimension are dropped (that dimension is then replicated over them).
    """
    rules = _ACTIVE_RULES.get() if rules is None else rules
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in the rules table")
        mesh_axes = []
        size = 1
        for ax in (rules.get(name) or ()) if name else ():
            ax_size = mesh.shape.get(ax, 1)
            if ax in used or ax_size == 1 or dim % (size * ax_size):
                continue
            mesh_axes.append(ax)
            size *= ax_size
        used.update(mesh_axes)
        spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*spec)


def logical_sharding(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping | None = None
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def _variable_axes(var: nnx.Variable) -> tuple[tuple[str | None, ...], tuple[int, ...]]:
    """(logical axes, shape) of a variable; unnamed dimensions are None (replicated)."""
    shape = tuple(var.shape if hasattr(var, "shape") else np.shape(var.get_value()))
    axes = var.get_metadata().get("axes")
    return (tuple(axes) if axes is not None else (None,) * len(shape)), shape


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping | None = None) -> nnx.State:
    """A NamedSharding for every variable of `state`, from its `axes` metadata (replicated if absent), by `rules`
    (default: the active table)."""

    def one(var):
        axes, shape = _variable_axes(var)
        return var.replace(logical_sharding(axes, shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def reshard_state(state: nnx.State, rules: Mapping) -> nnx.State:
    """`state` constrained to the layout of `rules` on the current (abstract) mesh, inside a traced function: one
    resharding collective per variable whose layout differs, none on a trivial mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return state

    def one(var):
        axes, shape = _variable_axes(var)
        return var.replace(jax.lax.with_sharding_constraint(var.get_value(), logical_to_spec(axes, shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def bytes_per_device(state: nnx.State, mesh, rules: Mapping, dtype=None) -> int:
    """Bytes one device holds of `state` laid out by `rules` on `mesh` (a Mesh or AbstractMesh), each floating
    variable counted in `dtype` when that is narrower (the compute dtype the sampler casts to)."""
    total = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes, shape = _variable_axes(var)
        value_dtype = np.dtype(var.get_value().dtype)
        itemsize = value_dtype.itemsize
        if dtype is not None and np.issubdtype(value_dtype, np.floating):
            itemsize = min(itemsize, np.dtype(dtype).itemsize)
        split = 1
        for entry in logical_to_spec(axes, shape, mesh, rules):
            for ax in (entry,) if isinstance(entry, str) else (entry or ()):
                split *= mesh.shape[ax]
        total += int(np.prod(shape, dtype=np.int64)) * itemsize // split
    return total


def choose_layout(layout: str, state: nnx.State, mesh, dtype=None) -> str:
    """The layout the sampler decodes `state` (the weights it reads at every decode step) in: "train" or "decode".

    "auto" is "decode" when `mesh` splits rows over 'data' or 'fsdp' (else both layouts are the same) and the
    decode layout's weights, in `dtype`, take at most `DECODE_BUDGET_BYTES` per device; otherwise "train"."""
    if layout not in LAYOUT_CHOICES:
        raise ValueError(f"sampling layout {layout!r} is not one of {LAYOUT_CHOICES}")
    if layout != "auto":
        return layout
    if mesh is None or mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1) == 1:
        return "train"
    return "decode" if bytes_per_device(state, mesh, DECODE_RULES, dtype) <= DECODE_BUDGET_BYTES else "train"


def create_sharded(make_module: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Builds `make_module()` with every variable created directly on its sharding (no full host copy)."""
    abstract = nnx.eval_shape(make_module)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)

    @jax.jit
    def init():
        return nnx.state(make_module())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def dim_shards(axes: Sequence[str | None], shape: Sequence[int], dim: int) -> int:
    """How many ways the active rules split dimension `dim` of a tensor named `axes` on the current mesh (1 outside a
    mesh context)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    entry = logical_to_spec(axes, shape, mesh)[dim]
    return int(np.prod([mesh.shape[ax] for ax in ((entry,) if isinstance(entry, str) else (entry or ()))]))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names under the active rules; a no-op outside a mesh context or on a trivial
    mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)
