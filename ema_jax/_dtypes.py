"""The dtype policy, written once: which leaves are averaged, in which dtype they accumulate,
and how an average is cast back. Used by the transform, post-hoc synthesis and checkpoints.

* Leaves of an *inexact* dtype (real or complex floating) are averaged; bool and integer
  leaves are carried (copied), never averaged.
* A floating leaf narrower than 32 bits accumulates in float32 (complex in complex64), so a
  decay near 1 does not stall in bf16; wider leaves keep their dtype. An explicit
  ``accumulator_dtype`` overrides the real precision; a complex leaf then keeps a complex
  accumulator of that precision: the imaginary part is never dropped.
* Casting back gives each leaf the params' dtype again (a no-op for leaves already in it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def kind(dtype: Any) -> str:
    """``"bool"``, ``"integer"``, ``"complex"`` or ``"real"``: dtypes of one kind may be cast
    into each other's accumulators, different kinds may not."""
    for name, family in (
        ("bool", jnp.bool_),
        ("integer", jnp.integer),
        ("complex", jnp.complexfloating),
    ):
        if jnp.issubdtype(dtype, family):
            return name
    return "real"


def is_averaged(dtype: Any) -> bool:
    """Whether leaves of ``dtype`` are averaged (real or complex floating) rather than copied."""
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def accumulator(dtype: Any, override: np.dtype | None = None) -> np.dtype:
    """The dtype a leaf of ``dtype`` accumulates in (see the module docstring)."""
    dtype = np.dtype(dtype)
    if not is_averaged(dtype):
        return dtype
    complex_leaf = bool(jnp.issubdtype(dtype, jnp.complexfloating))
    if override is not None:
        return np.dtype(jnp.promote_types(override, jnp.complex64)) if complex_leaf else override
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def cast_back(tree: Any, dtypes: Sequence[Any]) -> Any:
    """``tree`` with leaf ``i`` in ``dtypes[i]`` (leaves already in it are kept as they are)."""
    leaves, treedef = jax.tree.flatten(tree)
    cast = [x if x.dtype == d else x.astype(d) for x, d in zip(leaves, dtypes, strict=True)]
    return jax.tree.unflatten(treedef, cast)


def cast_real(tree: Any, dtype: Any) -> Any:
    """``tree`` with its real floating leaves in ``dtype``; complex, integer and bool leaves
    as they are (a real ``dtype`` would drop an imaginary part)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )
