"""Device meshes and the one table that places parameters, optimizer state and activations.

Mesh axes: `data` (pure data parallel: parameters replicated), `fsdp` (data parallel
with parameters and optimizer state sharded, ZeRO-3 style) and `tensor` (Megatron-style
tensor parallel over heads and the MLP width).

Every parameter names its logical axes where it is created (transformer.param_shapes);
RULES maps each logical axis to mesh axes. A mesh axis that does not divide a dimension
(e.g. 2 KV heads over tensor=4), or that an earlier dimension of the same array already
uses, is left out of that dimension's spec: the array is replicated there instead. This is
deliberate, not an error; tests/test_mesh.py checks the resulting shardings of every
parameter on fake multi-device meshes, so a rule that shards nothing does not pass unseen.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (a tuple: sharded over their product). Training layout.
RULES: Mapping[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "act_embed": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": (),
    "norm": (),
}


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=1,fsdp=-1,tensor=1' -> {'data': 1, 'fsdp': -1, 'tensor': 1} (missing axes are 1)."""
    sizes = {a: 1 for a in MESH_AXES}
    if not spec.strip():
        return sizes
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", part)
        if not m:
            raise ValueError(f"--mesh: cannot parse {part!r}; expected e.g. 'data=2,fsdp=-1,tensor=1'")
        name, size = m.group(1), int(m.group(2))
        if name not in MESH_AXES:
            raise ValueError(f"--mesh: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        if size == 0 or size < -1:
            raise ValueError(f"--mesh: axis {name}={size} must be positive or -1")
        sizes[name] = size
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ValueError(f"--mesh {spec!r}: at most one axis may be -1")
    return sizes


def make_mesh(spec: str | Mapping[str, int] = "", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all devices)."""
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else {**{a: 1 for a in MESH_AXES}, **spec}
    devices = list(devices if devices is not None else jax.devices())
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if len(devices) % known:
            raise ValueError(f"--mesh: {len(devices)} devices are not divisible by {known}")
        sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
    n = math.prod(sizes.values())
    if n > len(devices):
        raise ValueError(f"--mesh {sizes} needs {n} devices, {len(devices)} available")
    arr = np.asarray(devices[:n], dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES)


def logical_to_spec(
    mesh: Mesh, axes: Sequence[str], shape: Sequence[int] | None = None, rules: Mapping | None = None
) -> P:
    """PartitionSpec for logical `axes`; a mesh axis is used at most once per array
    (collision -> later use dropped) and only where it divides the dimension."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, ax in enumerate(axes):
        if ax not in rules:
            raise KeyError(f"logical axis {ax!r} has no sharding rule")
        chosen = []
        size = 1
        for m in rules[ax]:
            if m in used or mesh.shape[m] == 1:
                continue
            if shape is not None and shape[i] % (size * mesh.shape[m]):
                continue
            chosen.append(m)
            size *= mesh.shape[m]
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def param_sharding(mesh: Mesh, axes, shape=None, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(mesh, axes, shape, rules))


def constrainer(mesh: Mesh | None, rules: Mapping | None = None):
    """A `constrain(x, logical_axes)` hook for transformer.forward, or None without a mesh."""
    if mesh is None:
        return None

    def pin(x, axes):
        return jax.lax.with_sharding_constraint(x, param_sharding(mesh, axes, x.shape, rules))

    return pin
