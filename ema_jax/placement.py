"""Where the accumulators live: host offload (``memory_kind``) and data-parallel sharding of
the EMA of replicated params (``shard_over``). Both are options of :func:`ema_jax.ema`;
neither changes a single value of the average, only where its bytes are.

* ``memory_kind="pinned_host"``: the accumulators are kept in pinned host memory. An update
  brings them to device memory, averages there and puts the result back
  (:func:`to_device` / :func:`to_host`; under ``jit`` these are XLA's memory-space
  transfers). The scalars of the state (``count``, ``weight``, ``num_skipped``) stay in
  device memory: the update reads them every step and they are a few bytes.
* ``shard_over=("data", ...)``: a param laid out with a ``NamedSharding`` that replicates
  it over those mesh axes gets an accumulator split over them along its first dimension
  that is not sharded already and whose size the axes' size divides
  (:func:`accumulator_sharding`). Each device then averages its own slice of the replicated
  param: a local slice, no collective. Params already sharded over the axes (FSDP) keep
  their layout. A leaf that cannot be split stays replicated and :func:`place` warns once,
  at ``init``, naming it.

The shardings chosen at ``init`` are recorded in the state (``EmaState.shardings``, a
static field), so a jitted update constrains the accumulators to them and the params it
reads to their replicated layout (XLA's sharding propagation must not re-shard a train
step's params after the accumulators).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

Params = Any
#: The memory kinds ``ema(memory_kind=...)`` accepts: ``None`` is the default (device).
MEMORY_KINDS = (None, "device", "pinned_host")


def memory_kind(value: Any) -> str | None:
    """The checked ``memory_kind``: ``None`` for device memory (``"device"`` is the same),
    ``"pinned_host"`` for host offload."""
    if value not in MEMORY_KINDS:
        raise ValueError(
            f"memory_kind must be None (device memory) or 'pinned_host' (keep the "
            f"accumulators in host memory), got {value!r}"
        )
    return None if value == "device" else value


def shard_axes(value: Any) -> tuple[str, ...] | None:
    """The checked ``shard_over``: ``None``, or a tuple of mesh axis names."""
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else value
    if (
        not isinstance(names, (tuple, list))
        or not names
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise TypeError(
            "shard_over must be a mesh axis name or a tuple of distinct names (e.g. 'data' "
            f"or ('data', 'replica')), got {value!r}"
        )
    return tuple(names)


def in_host_memory(x: Any) -> bool:
    """Whether the array (or tracer) ``x`` lives in host memory."""
    space = getattr(jax.typeof(x), "memory_space", None)
    return space == jax.memory.Space.Host


def to_device(tree: Params) -> Params:
    """``tree`` with every leaf in host memory brought to device memory (the others as they
    are: nothing is emitted for a tree already on the devices)."""
    return jax.tree.map(
        lambda x: jax.device_put(x, jax.memory.Space.Device) if in_host_memory(x) else x, tree
    )


def to_host(tree: Params) -> Params:
    """``tree`` in pinned host memory, each leaf keeping its sharding."""
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Host), tree)


def replacement(
    new: Params,
    old: Params,
    shardings: Sequence[NamedSharding | None] | None = None,
    axes: tuple[str, ...] | None = None,
) -> Params:
    """``new`` in fresh buffers, to take the place of ``old`` in a state (same tree, shapes
    and dtypes), e.g. the params replaced by a shadow.

    With ``shard_over`` (``axes`` and the ``shardings`` recorded at ``init``, one per leaf),
    each leaf of an average split over ``axes`` is held to its param's own layout again.
    Computed as a select between the two, so ``old`` stays an input of a jitted function
    that donates it and jax pairs its buffers with these outputs. Unused, ``old`` would be
    dropped and jax (up to 0.12 at least) would pair donated accumulators in host memory of
    the same shape and dtype with these device outputs, which aborts the process: it
    matches donated buffers to outputs ignoring memory kinds."""
    if shardings is not None and axes is not None:
        leaves, treedef = jax.tree.flatten(new)
        held = [
            x if s is None else _hold(x, _param_sharding(s, x.ndim, axes))
            for x, s in zip(leaves, shardings, strict=True)
        ]
        new = jax.tree.unflatten(treedef, held)
    return jax.tree.map(lambda n, o: jnp.where(True, n, o), new, old)


def accumulator_sharding(
    leaf: Any, axes: tuple[str, ...], averages: int
) -> tuple[NamedSharding | None, bool]:
    """``(sharding, unsplittable)`` of the accumulator of ``leaf`` under ``shard_over=axes``.

    ``sharding`` is ``None`` when the accumulator keeps the param's layout: the leaf is not
    laid out with a ``NamedSharding``, is sharded over one of ``axes`` already (FSDP), or
    cannot be split (then ``unsplittable`` is ``True``). Otherwise it is the param's
    sharding with ``axes`` added on the first dimension that is not sharded and whose size
    their size divides (``averages`` trailing axes, K decays', stay replicated).
    """
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None, False
    mesh = sharding.mesh
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"shard_over={axes!r} names axes {missing} that the params' mesh does not have "
            f"(its axes: {tuple(mesh.axis_names)}): pass axes of the params' mesh"
        )
    spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
    used = {a for entry in spec if entry is not None for a in _names(entry)}
    if used & set(axes):
        return None, False  # sharded over them already (FSDP): its own layout
    size = math.prod(mesh.shape[a] for a in axes)
    for dim, (entry, length) in enumerate(zip(spec, leaf.shape, strict=True)):
        if entry is None and length > 0 and length % size == 0:
            split = (*spec[:dim], axes if len(axes) > 1 else axes[0], *spec[dim + 1 :])
            full = PartitionSpec(*split, *(None,) * averages)
            return NamedSharding(mesh, full, memory_kind=sharding.memory_kind), False
    return None, size > 1


def _names(entry: Any) -> tuple[str, ...]:
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def place(
    accumulators: Params,
    params: Params,
    axes: tuple[str, ...] | None,
    kind: str | None,
    averages: int,
) -> tuple[Params, tuple[NamedSharding | None, ...] | None]:
    """The accumulators placed as ``shard_over`` / ``memory_kind`` ask, and the shardings to
    record in the state (``None`` without ``shard_over``). Warns once, naming them, for the
    leaves that stay replicated because no dimension can be split."""
    if axes is None:
        return (accumulators if kind is None else to_host(accumulators)), None
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    chosen, unsplittable = [], []
    for path, leaf in flat:
        if isinstance(leaf, jax.core.Tracer):
            raise ValueError(
                "ema(..., shard_over=...) chooses the accumulators' layout from the params' "
                "shardings: call init with concrete (placed) params, not under jit or "
                "eval_shape. For an abstract restore target, map a concrete state's leaves "
                "to jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)"
            )
        sharding, cannot = accumulator_sharding(leaf, axes, averages)
        chosen.append(sharding)
        if cannot:
            unsplittable.append(f"params{jax.tree_util.keystr(path)} {tuple(leaf.shape)}")
    if unsplittable:
        warnings.warn(
            f"shard_over={axes!r}: no dimension of {', '.join(unsplittable)} is divisible by "
            "the axes' size, so their accumulators stay replicated (every device keeps a "
            "full copy of them)",
            UserWarning,
            stacklevel=3,  # the caller of init
        )
    shardings = tuple(None if s is None else s.with_memory_kind(kind or "device") for s in chosen)
    leaves = jax.tree.leaves(accumulators)  # the params' tree, leaf for leaf
    placed = [
        x if s is None else jax.device_put(x, s) for x, s in zip(leaves, shardings, strict=True)
    ]
    tree = jax.tree.unflatten(treedef, placed)
    return (tree if kind is None else to_host(tree)), shardings


def constrain(tree: Params, shardings: Sequence[NamedSharding | None]) -> Params:
    """``tree`` (one leaf per recorded sharding) held to those shardings inside ``jit``
    (leaves recorded as ``None`` as they are)."""
    leaves, treedef = jax.tree.flatten(tree)
    held = [x if s is None else _hold(x, s) for x, s in zip(leaves, shardings, strict=True)]
    return jax.tree.unflatten(treedef, held)


def local_slices(
    params: Params, shardings: Sequence[NamedSharding | None], axes: tuple[str, ...]
) -> Params:
    """The params as each device's accumulator slice needs them: held to their own,
    replicated layout (so XLA keeps a train step's new params replicated), then split like
    the accumulator: a local slice of a replicated array, no communication. Leaves recorded
    as ``None`` are as they are."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for x, s in zip(leaves, shardings, strict=True):
        if s is not None:
            x = _hold(x, _param_sharding(s, x.ndim, axes))
            spec = tuple(s.spec)[: x.ndim]  # without the averages axis of K decays
            x = _hold(x, NamedSharding(s.mesh, PartitionSpec(*spec)))
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def _param_sharding(accumulator: NamedSharding, ndim: int, axes: tuple[str, ...]) -> NamedSharding:
    """The layout of the param whose accumulator ``shard_over=axes`` laid out as
    ``accumulator``: its spec over the param's ``ndim`` dimensions without ``axes``."""
    spec = tuple(accumulator.spec)[:ndim]  # without the averages axis of K decays
    own = tuple(None if e is not None and set(_names(e)) == set(axes) else e for e in spec)
    return NamedSharding(accumulator.mesh, PartitionSpec(*own))


def _hold(x: Any, sharding: NamedSharding) -> Any:
    """``x`` constrained to ``sharding`` in device memory: ``reshard`` on a mesh with
    explicit axes, ``with_sharding_constraint`` on one with automatic axes."""
    sharding = sharding.with_memory_kind("device")
    if any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)
