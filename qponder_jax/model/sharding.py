"""The mesh, and the one table that maps logical tensor axes onto it.

Layers name their dimensions (`embed`, `mlp`, `heads`, ...) through an `axes=` metadata entry on every
`nnx.Param`, and activations through `constrain(x, axes)`. Only `LOGICAL_RULES` below says which mesh
axis each name lands on. A mesh axis that does not divide a dimension is dropped for that tensor (for
example 2 kv heads on a tensor axis of 4), so any mesh shape is valid for any model size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for a tensor of `shape` whose dimensions are named `axes`.

    Mesh axes that are missing from the mesh, already used by an earlier dimension, or that do not divide
    the dimension are dropped (that dimension is then replicated over them).
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        mesh_axes = []
        size = 1
        for ax in (LOGICAL_RULES.get(name) or ()) if name else ():
            ax_size = mesh.shape.get(ax, 1)
            if ax in used or ax_size == 1 or dim % (size * ax_size):
                continue
            mesh_axes.append(ax)
            size *= ax_size
        used.update(mesh_axes)
        spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*spec)


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A NamedSharding for every variable of `state`, from its `axes` metadata (replicated if absent)."""

    def one(var):
        axes = var.get_metadata().get("axes")
        value_shape = var.shape if hasattr(var, "shape") else np.shape(var.get_value())
        if axes is None:
            axes = (None,) * len(value_shape)
        return var.replace(logical_sharding(axes, value_shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context or on a trivial mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)
