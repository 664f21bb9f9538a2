"""Which Variables of an NNX model an :class:`ema_jax.nnx.EMA` tracks, by path.

An EMA averages the Variables a filter (``only``) selects, in the order of
``nnx.state(model, only)``; it records their paths (``"encoder/kernel"``) so that a model
whose Variables moved, were added or were renamed is refused by name, not averaged into
the wrong place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def tracked(model: Any, only: Any, graph: bool | None) -> nnx.State:
    """``nnx.state(model, only)``, refused when it selects nothing or RNG state."""
    tracked = nnx.state(model, only, graph=graph)
    flat = nnx.to_flat_state(tracked)
    if not flat:
        raise ValueError(
            f"only={only!r} selects no Variable of the model: pass a filter that matches "
            "the Variables to average (the default, nnx.Param, selects the parameters)"
        )
    for path, variable in flat:
        if isinstance(variable, nnx.RngState):
            where = "/".join(str(k) for k in path)
            raise ValueError(
                f"only={only!r} selects RNG state at {where!r} ({type(variable).__name__}): RNG "
                "keys and counts cannot be averaged; narrow the filter, e.g. only=nnx.Param or "
                "only=(nnx.Param, nnx.BatchStat)"
            )
    return tracked


def paths_and_values(tracked: nnx.State) -> tuple[tuple[str, ...], list[Any]]:
    """The tracked Variables' paths (``"encoder/kernel"``) and values, in the order of
    ``jax.tree.leaves`` (that of the state's lists and of saved checkpoints); Python scalars
    (``nnx.Param(1.0)``) as arrays."""
    paths, values = [], []
    for key_path, value in jax.tree_util.tree_flatten_with_path(tracked)[0]:
        path = _path(key_path)
        if isinstance(value, (bool, int, float, complex)):
            value = jnp.asarray(value)
        elif not hasattr(value, "dtype"):
            raise TypeError(
                f"the model's Variable at {path!r} holds a {type(value).__name__}, not an "
                "array or a number: exclude it with the only= filter"
            )
        paths.append(path)
        values.append(value)
    return tuple(paths), values


def _path(key_path: Any) -> str:
    return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def tracked_paths(model: Any, only: Any = nnx.Param, graph: bool | None = None) -> tuple[str, ...]:
    """The paths (``"encoder/kernel"``) of ``model``'s Variables that ``only`` selects, in
    the order an :class:`EMA` tracks them (its ``tracked_paths``)."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, only, graph=graph))[0]
    return tuple(_path(key_path) for key_path, _ in flat)


def path_changes(averaged: Sequence[str], found: Sequence[str]) -> str | None:
    """What differs between the averaged Variables' paths and ``found`` ("renamed (or
    replaced): 'enc/kernel' -> 'dec/kernel'", "missing: ...", "added: ..."), or ``None``
    when they are the same paths."""
    missing = [p for p in averaged if p not in found]
    added = [p for p in found if p not in averaged]
    if missing and len(missing) == len(added):
        return "renamed (or replaced): " + ", ".join(
            f"{a!r} -> {b!r}" for a, b in zip(missing, added, strict=True)
        )
    parts = []
    if missing:
        parts.append("missing: " + ", ".join(map(repr, missing)))
    if added:
        parts.append("added: " + ", ".join(map(repr, added)))
    if not parts and list(averaged) != list(found):
        parts.append(f"in another order: {list(found)}")
    return "; ".join(parts) or None


def filter_name(only: Any) -> str:
    """A filter as written in code: ``nnx.Param`` for a Variable type."""
    return f"nnx.{only.__name__}" if isinstance(only, type) else repr(only)


__all__ = ["filter_name", "path_changes", "paths_and_values", "tracked", "tracked_paths"]
