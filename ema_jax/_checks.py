"""Argument and tree checks, each written once: clear errors naming the argument or path."""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``float(value)`` if it is a finite real number in the given range, else a clear error.

    Accepts Python and NumPy numbers and concrete 0-d arrays; rejects bools and NaN.
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    is_number = isinstance(value, numbers.Real) or (
        np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)
        if hasattr(value, "dtype")
        else False
    )
    if isinstance(value, (bool, np.bool_)) or not is_number:
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}")
    x = float(value)
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if math.isnan(x) or too_low or too_high or math.isinf(x):
        raise ValueError(f"{name} must be finite and in {interval}, got {value!r}")
    return x


def decay(name: str, value: Any) -> float:
    """A decay: a real number in [0, 1)."""
    return real(name, value, low=0.0, high=1.0, high_open=True)


def positive(name: str, value: Any) -> float:
    return real(name, value, low=0.0, low_open=True)


def below_one(beta: float, name: str, value: Any, formula: str, dtype: Any = np.float64) -> float:
    """``beta`` if it stays < 1 in ``dtype``, else a ``ValueError`` blaming argument ``name``:
    the decay computed from it (``formula``) rounds to 1.0, and such an average never moves."""
    if np.asarray(beta, dtype) == 1.0:
        raise ValueError(
            f"{name}={value!r} is out of range: {formula} rounds to 1.0 in {np.dtype(dtype)} "
            "and an average with decay 1.0 never moves"
            + (
                ""
                if np.dtype(dtype) == np.float64
                else " (enable jax_enable_x64 for longer windows)"
            )
        )
    return beta


#: The relative error an average may accumulate before :func:`accuracy` warns.
ACCURACY = 1e-3


def accuracy(name: str, beta: float, dtype: Any) -> None:
    """Warns when an average with decay ``beta`` kept in ``dtype`` drifts by more than
    ``ACCURACY`` (relative): each lerp step is rounded to ``dtype``, and once ``(1 - β)·|θ -
    ema|`` is below half an ulp of ``ema`` the average stops moving, ``≈ (eps/2)/(1 - β)``
    from its target (measured table: docs/guarantees.md)."""
    eps = float(np.finfo(dtype).eps) / 2
    if beta < 1.0 and eps / (1.0 - beta) > ACCURACY:
        limit = 1.0 - eps / ACCURACY
        warnings.warn(
            f"{name}={beta!r} in {np.dtype(dtype).name}: an average this long is kept only to "
            f"a relative error of about {eps / (1.0 - beta):.0e} (rounding of each step; "
            f"{np.dtype(dtype).name} stays within {ACCURACY:g} for decays up to {limit:.6g}). "
            "Use float64 params / accumulator_dtype=float64 with jax_enable_x64, or a shorter "
            "window",
            UserWarning,
            stacklevel=3,
        )


def integer(
    name: str, value: Any, minimum: int, *, allow_none: bool = False, maximum: int | None = None
) -> int | None:
    """``int(value)`` if it is an integer (a Python or NumPy int, anything
    ``operator.index`` takes) in ``[minimum, maximum]`` (or ``None`` when allowed), else a
    clear error. Bools are rejected: ``True`` is no step count."""
    if value is None and allow_none:
        return None
    try:
        number = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        number = None
    if number is None:
        kind = "None or an int" if allow_none else "an int"
        raise TypeError(f"{name} must be {kind} >= {minimum}, got {value!r}")
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value!r}")
    return number


def scalar_decay(name: str, value: Any, dtype: Any) -> jax.Array:
    """A schedule's value at one step as a 0-d ``dtype`` array; a ``TypeError`` naming the
    decay (``decay``, ``decay[i]``) when it holds more than one number (shapes are static,
    so this is raised while tracing, before anything runs)."""
    value = jnp.asarray(value, dtype)
    if value.size != 1:
        raise TypeError(
            f"{name} is a schedule that returned shape {value.shape} for one step: a "
            "schedule maps a step t (a 0-d int array) to one decay β_t, so return a scalar"
        )
    return value.reshape(())


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool (``None`` or ``1`` would silently mean something)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def floating_dtype(name: str, value: Any) -> np.dtype:
    """``np.dtype(value)`` if it names a real floating dtype (float16/bfloat16/float32/...)."""
    try:
        dtype = np.dtype(value)
    except TypeError as e:
        raise TypeError(f"{name} must be a floating dtype, got {value!r}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype, got {dtype}")
    return dtype


def accumulator_dtype(accumulator_dtype: Any) -> np.dtype | None:
    """The checked ``accumulator_dtype``; a warning when it is narrower than float32 (kept,
    as asked: bf16 loses any step below half its ulp, so its average stalls far from the
    params, and float16 overflows above 65504)."""
    if accumulator_dtype is None:
        return None
    dtype = floating_dtype("accumulator_dtype", accumulator_dtype)
    if np.finfo(dtype).bits < 32:
        warnings.warn(
            f"accumulator_dtype={dtype.name} is narrower than float32: each EMA step is "
            f"rounded to {dtype.name}, so an average with a decay near 1 stalls far from the "
            "params (bfloat16, decay 0.999: 0.25 instead of 0.993 after 5000 steps towards "
            "1.0) and float16 overflows above 65504. Leave accumulator_dtype=None (float32 "
            "for narrow params) unless you have measured that it suffices",
            UserWarning,
            stacklevel=3,
        )
    return dtype


def traced_flag(name: str, value: Any) -> Any:
    """``None`` for ``True`` (nothing to trace), else ``value`` as a boolean scalar array:
    a bool, or a boolean scalar array (a tracer under ``jit`` too); a ``TypeError`` naming
    ``name`` for anything else."""
    if value is True:
        return None
    if isinstance(value, (bool, np.bool_)):
        return jnp.asarray(value)
    if getattr(value, "dtype", None) != jnp.bool_ or np.shape(value) != ():
        raise TypeError(
            f"{name} must be a bool or a boolean scalar array (traced under jit is fine), "
            f"got {value!r}"
        )
    return value


def shapes_by_path(tree: Any, prefix: str = "", drop: int = 0) -> dict[str, Any]:
    """``{prefix + keystr(path): ShapeDtypeStruct}`` of every leaf, its last ``drop`` axes
    left out (a K-decay accumulator's averages axis): what :func:`first_difference` compares."""
    return {
        prefix + jax.tree_util.keystr(path): jax.ShapeDtypeStruct(
            np.shape(leaf)[: np.ndim(leaf) - drop], jnp.result_type(leaf)
        )
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def first_difference(
    expected: Mapping[str, Any],
    got: Mapping[str, Any],
    *,
    expected_name: str,
    got_name: str,
    compare_dtypes: bool = False,
) -> str | None:
    """A message naming the first path (in ``expected``'s order) where two flattened trees
    differ, or ``None`` when they match.

    ``expected`` and ``got`` map a readable path to a leaf (anything with ``.shape``, or a
    Python scalar). Compared: the paths, the shapes and, with ``compare_dtypes``, floating
    dtypes (integer widths may differ: a Python-int step and an int32 step are the same
    value; leaves without a dtype are not compared).
    """
    for path, leaf in expected.items():
        if path not in got:
            instead = [p for p in got if p not in expected][:3]
            return (
                f"{path} is in the {expected_name} but not in the {got_name} "
                f"(the {got_name} has instead: {', '.join(instead) or 'nothing'})"
            )
        other = got[path]
        if tuple(np.shape(other)) != tuple(np.shape(leaf)):
            return (
                f"{path} has shape {tuple(np.shape(other))} in the {got_name}, "
                f"{tuple(np.shape(leaf))} in the {expected_name}"
            )
        if compare_dtypes:
            want, have = _dtype_of(leaf), _dtype_of(other)
            if want is None or have is None or want == have:
                continue
            if np.issubdtype(want, np.integer) and np.issubdtype(have, np.integer):
                continue
            return (
                f"{path} has dtype {have.name} in the {got_name}, {want.name} in the "
                f"{expected_name}"
            )
    for path in got:
        if path not in expected:
            return f"{path} is in the {got_name} but not in the {expected_name}"
    return None


def not_an_optimizer(rule: str) -> TypeError:
    """The error of a rule's ``update`` called as an optax transform's (with updates)."""
    return TypeError(
        f"{rule}.update(params, state) averages params, not updates: it is not an "
        "optax.GradientTransformation, so it cannot go in optax.chain or serve as an "
        "optimizer (tx=). Call it after the optimizer step with the new params, or "
        "pass it as EmaTrainState.create(..., ema=...)"
    )


def params_difference(
    averaged: Any,
    params: Any,
    param_dtypes: Sequence[Any],
    *,
    drop: int,
    kind: Callable[[Any], str],
) -> str | None:
    """The first path where ``params`` differ from the ``averaged`` tree (whose leaves carry
    ``drop`` trailing axes of averages) in tree, node types, shape or ``kind`` of dtype
    (``param_dtypes`` are the averaged params' dtypes); ``None`` when they match."""
    problem = first_difference(
        shapes_by_path(averaged, "params", drop=drop),
        shapes_by_path(params, "params"),
        expected_name="EMA state",
        got_name="params",
    )
    same_nodes = jax.tree.structure(averaged) == jax.tree.structure(params)  # type: ignore[operator]
    if problem is None and not same_nodes:
        return "the params tree's node types differ from the EMA state's"
    if problem is not None:
        return problem
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), dtype in zip(leaves, param_dtypes, strict=True):
        if kind(leaf.dtype) != kind(dtype):
            return (
                f"params{jax.tree_util.keystr(path)} has dtype {np.dtype(leaf.dtype).name} in "
                f"the params, {np.dtype(dtype).name} in the EMA state ({kind(leaf.dtype)} vs "
                f"{kind(dtype)} values cannot be averaged into each other)"
            )
    return None


def _dtype_of(leaf: Any) -> np.dtype | None:
    dtype = getattr(leaf, "dtype", None)
    return None if dtype is None else np.dtype(dtype)


def deleted_leaf(tree: Any) -> str | None:
    """The path (``keystr``) of the first ``jax.Array`` leaf of ``tree`` whose buffer was
    deleted, e.g. donated to a jitted step; ``None`` when every buffer is alive. A Python
    loop over the leaves, no device work: call it before donating, or after a failure."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        concrete = isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
        if concrete and leaf.is_deleted():
            return jax.tree_util.keystr(path)
    return None
