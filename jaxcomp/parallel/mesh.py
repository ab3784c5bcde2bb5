"""Device mesh from recipe sizes, partition specs from path rules, multi-process start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcomp.errors import JaxcompError

AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all devices (of every process).

    Args:
      data, fsdp, tensor: axis sizes; one of them may be -1 for "the remaining devices".
      devices: defaults to ``jax.devices()``.

    Example:
      >>> make_mesh(data=2, fsdp=2, tensor=2).shape  # with 8 devices
      {'data': 2, 'fsdp': 2, 'tensor': 2}
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise JaxcompError(f"heal.mesh sizes must be >= 1 with at most one -1, got "
                           f"data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise JaxcompError(f"heal.mesh: {len(devices)} devices are not divisible by "
                               f"{known} (data={data} fsdp={fsdp} tensor={tensor})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise JaxcompError(f"heal.mesh data*fsdp*tensor = {int(np.prod(sizes))} but there are "
                           f"{len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def _auto_spec(shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Default layout of one array: the last axis of a matrix-like array over ``tensor``, the
    largest remaining axis over ``fsdp``, each only where it divides evenly; vectors and
    scalars replicated."""
    spec: list = [None] * len(shape)
    if len(shape) < 2:
        return PartitionSpec(*spec)
    t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
    if t > 1 and shape[-1] % t == 0:
        spec[-1] = "tensor"
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % f == 0]
    if f > 1 and free:
        spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return PartitionSpec(*spec)


def partition_specs(arrays: Mapping[str, object], mesh: Mesh,
                    rules: Sequence[Sequence] = ()) -> dict[str, PartitionSpec]:
    """A ``PartitionSpec`` per array of a flat ``{path: array}`` dict.

    Args:
      arrays: ``{path: array or ShapeDtypeStruct}``; paths as :func:`jax.tree_util.keystr`
        writes them (e.g. ``['layers_0']['mlp']['up_proj']['kernel'].cores[1]``).
      mesh: the mesh (axes ``data``, ``fsdp``, ``tensor``).
      rules: ordered ``[regex, [axis or None, ...]]`` pairs, first match (``re.search``)
        wins; unmatched arrays get the automatic layout (last axis over ``tensor``, largest
        other axis over ``fsdp``, where divisible).

    Raises:
      JaxcompError: a rule's spec has the wrong rank, names an unknown axis, or does not
        divide the array's shape.
    """
    compiled = compile_mesh_rules(rules)
    specs = {}
    for path, a in arrays.items():
        shape = tuple(np.shape(a))
        for pattern, spec in compiled:
            if pattern.search(path):
                _check_spec(path, shape, spec, mesh)
                specs[path] = PartitionSpec(*spec)
                break
        else:
            specs[path] = _auto_spec(shape, mesh)
    return specs


def _axis_names(axis) -> tuple[str, ...]:
    return () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)


def compile_mesh_rules(rules: Sequence[Sequence]) -> list[tuple[re.Pattern, tuple]]:
    """``heal.mesh.rules`` checked without any arrays (the recipe loader calls it, so a bad
    rule fails before compression): ``[regex, [axis or None, ...]]`` pairs, valid regexes,
    known axis names. Returns ``(compiled regex, spec)`` pairs."""
    compiled = []
    for rule in rules:
        if (isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2
                or isinstance(rule[1], str) or not isinstance(rule[1], Sequence)):
            raise JaxcompError(f"heal.mesh.rules entries are [regex, [axis or null, ...]], "
                               f"got {rule!r}")
        try:
            pattern = re.compile(str(rule[0]))
        except re.error as e:
            raise JaxcompError(f"heal.mesh.rules: {rule[0]!r} is not a valid regex: {e}"
                               ) from None
        for axis in rule[1]:
            for name in _axis_names(axis):
                if name not in AXES:
                    raise JaxcompError(f"heal.mesh.rules: unknown mesh axis {name!r} in rule "
                                       f"{rule[0]!r} (axes: {', '.join(AXES)})")
        compiled.append((pattern, tuple(rule[1])))
    return compiled


def _check_spec(path: str, shape, spec, mesh: Mesh) -> None:
    if len(spec) != len(shape):
        raise JaxcompError(f"heal.mesh.rules: spec {list(spec)} for {path} has {len(spec)} "
                           f"entries, the array has shape {shape}")
    for dim, axis in zip(shape, spec, strict=True):
        names = _axis_names(axis)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if dim % size:
            raise JaxcompError(f"heal.mesh.rules: {path} dimension {dim} is not divisible by "
                               f"the {'x'.join(names)} axis size {size}")


def put_global(array, sharding: NamedSharding) -> jax.Array:
    """Places a host array that every process holds in full onto a (multi-process) sharding."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def initialize_distributed() -> bool:
    """Starts multi-process JAX when the environment asks for it; returns whether it did.

    Set ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` explicitly, or run under a cluster JAX detects by itself (SLURM, Open
    MPI, Cloud TPU pod slices: set ``JAXCOMP_DISTRIBUTED=1`` and nothing else). One process
    per host; each sees its local accelerators.
    """
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    if not explicit and os.environ.get("JAXCOMP_DISTRIBUTED") != "1":
        return False
    if jax.distributed.is_initialized():
        return True
    if explicit:
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                   int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    return True
