"""The mesh, and the two tables that map logical tensor axes onto it.

Layers name their dimensions (`embed`, `mlp`, `heads`, ...) through an `axes=` metadata entry on every
`nnx.Param`, and activations through `constrain(x, axes)`. Only the rules tables below say which mesh
axis each name lands on. A mesh axis that does not divide a dimension is dropped for that tensor (for
example 2 kv heads on a tensor axis of 4), so any mesh shape is valid for any model size.

Two layouts. `LOGICAL_RULES` (training, "train"): parameters FSDP-sharded over 'fsdp' and tensor-parallel over
'tensor'. `DECODE_RULES` (the sampler, "decode"): weights stationary, whole over 'data' and 'fsdp' and
tensor-parallel over 'tensor', so a decode step moves only activations; rows split over 'data' x 'fsdp'. The
decode layout runs on the training mesh's devices regrouped (`decode_mesh`): consecutive devices form tensor
groups of `SamplingLayout.tensor`, so an FSDP-only training mesh (1, N, 1) decodes tensor-parallel over groups of
T on (1, N / T, T) while training keeps its own mesh and memory plan. The sampler reshards its weights once per
call and traces under `layout_scope` (the rules and the regrouped mesh), so the layers' `constrain` calls follow
it. `choose_layout` picks T from the decoder's size (`DECODE_TARGET_BYTES`, `DECODE_BUDGET_BYTES`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

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
# what a config or `generate(layout=...)` may ask for; "decode:T" also fixes the tensor group size T
LAYOUT_CHOICES = ("auto", "decode", "decode:T", "train")
# "auto" picks the smallest tensor group whose devices each hold at most DECODE_TARGET_BYTES of the decoder (a decode
# step reads all of them: 7B in bf16, 15.2 GB, decodes in groups of 4; 3B, 6.2 GB, in groups of 2), up to
# DECODE_MAX_TENSOR devices (one 8-GPU NVLink node); if even that holds more than DECODE_BUDGET_BYTES per device, it
# keeps the training layout
DECODE_TARGET_BYTES = 4 * 1024**3
DECODE_BUDGET_BYTES = 24 * 1024**3
DECODE_MAX_TENSOR = 8


class SamplingLayout(NamedTuple):
    """How the sampler holds the decoder's weights: "train" (the training shardings) or "decode" (`DECODE_RULES` on
    the training mesh's devices regrouped into tensor groups of `tensor`)."""

    name: str
    tensor: int = 1

    @property
    def spec(self) -> str:
        """The layout as `choose_layout` takes it back: "train" or "decode:T"."""
        return f"decode:{self.tensor}" if self.name == "decode" else self.name


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
    if not all(isinstance(s, (int, np.integer)) and (s >= 1 or s == -1) for s in shape):
        raise ValueError(f"mesh shape entries must be positive integers (or one -1), got {tuple(shape)}")
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


def parse_layout(layout: str) -> tuple[str, int | None]:
    """("auto" | "decode" | "train", the tensor group size "decode:T" fixes or None); raises on anything else."""
    name, _, size = str(layout).partition(":")
    if name in ("auto", "train", "decode") and not size:
        return name, None
    if name == "decode" and size.isdigit() and int(size) >= 1:
        return name, int(size)
    raise ValueError(f"sampling layout {layout!r} is not one of {LAYOUT_CHOICES}")


def decode_mesh(mesh, tensor: int) -> jax.sharding.AbstractMesh:
    """The decode layout's mesh: `mesh`'s devices regrouped into (data, fsdp * tensor' / tensor, tensor); consecutive
    devices (a training tensor group, then its neighbours) share a decode tensor group."""
    d, f, t = (mesh.shape.get(a, 1) for a in MESH_AXES)
    if tensor % t or (f * t) % tensor:
        raise ValueError(f"a decode tensor group of {tensor} does not regroup the mesh {dict(mesh.shape)}")
    return jax.sharding.AbstractMesh((d, f * t // tensor, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def choose_layout(layout: str, state: nnx.State, mesh, dtype=None) -> SamplingLayout:
    """The layout the sampler decodes `state` (the weights it reads at every decode step, in `dtype`) in on `mesh`.

    "train" keeps the training shardings. "decode" regroups the devices into the smallest tensor group (a multiple of
    the mesh's 'tensor' axis, at most `DECODE_MAX_TENSOR`) whose devices each hold at most `DECODE_TARGET_BYTES` of
    the weights, else the largest; "decode:T" into groups of T. "auto" is that decode layout when the mesh splits
    rows over 'data' or 'fsdp' (else both layouts are one) and its weights fit `DECODE_BUDGET_BYTES` per device;
    otherwise "train"."""
    name, fixed = parse_layout(layout)
    if mesh is None or name == "train":
        return SamplingLayout("train")
    d, f, t = (mesh.shape.get(a, 1) for a in MESH_AXES)
    if fixed is not None:
        decode_mesh(mesh, fixed)  # raises when it does not regroup this mesh
        return SamplingLayout("decode", fixed)
    if name == "auto" and d * f == 1:
        return SamplingLayout("train")
    sizes = [g for g in range(t, f * t + 1, t) if (f * t) % g == 0 and (g <= DECODE_MAX_TENSOR or g == t)]
    held = {g: bytes_per_device(state, decode_mesh(mesh, g), DECODE_RULES, dtype) for g in sizes}
    tensor = next((g for g in sizes if held[g] <= DECODE_TARGET_BYTES), sizes[-1])
    if name == "auto" and held[tensor] > DECODE_BUDGET_BYTES:
        return SamplingLayout("train")
    return SamplingLayout("decode", tensor)


@contextlib.contextmanager
def layout_scope(layout: SamplingLayout) -> Iterator[None]:
    """Inside a traced function on the training mesh: the rules of `layout` and, for "decode", its regrouped mesh as
    the abstract mesh, so `constrain` (and everything it places) follows the layout."""
    mesh = jax.sharding.get_abstract_mesh()
    with use_rules(LAYOUTS[layout.name]):
        if layout.name != "decode" or mesh is None or mesh.empty or mesh.shape.get("tensor", 1) == layout.tensor:
            yield
        else:
            with jax.sharding.use_abstract_mesh(decode_mesh(mesh, layout.tensor)):
                yield


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
