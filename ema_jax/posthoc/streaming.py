"""Synthesis from a snapshot directory in one pass: each snapshot is read once and added,
with its weight for each width, into every output; memory stays at about two snapshots (the
one being added, the next one being read) plus the outputs, however many snapshots there are."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _checks, _dtypes
from ema_jax.checkpoint import integrity, items
from ema_jax.posthoc import snapshots
from ema_jax.posthoc.solver import solve_coefficients
from ema_jax.posthoc.synthesis import accumulate_widths, zeros
from ema_jax.transform import Params

_AVERAGES = "averages"  # how the errors name a snapshot's trees
#: Snapshots read ahead of the one being added (each read in its own thread).
READ_AHEAD = 1


def synthesize_from(
    directory: str | os.PathLike[str],
    sigma_rel: float | Sequence[float],
    step: int | None = None,
    target: Params | None = None,
) -> Any:
    """:func:`~ema_jax.posthoc.synthesize` from the snapshots in ``directory`` (written by
    :func:`~ema_jax.posthoc.save_snapshot`), in one pass over them.

    Only the snapshots' metadata is read to solve for the weights (one factorisation for
    every width); then each snapshot with a non-zero weight for some width is read once,
    added into every output with its weight for that width, and dropped (the next one is
    read meanwhile), so peak memory is about two snapshots plus the outputs, however many
    snapshots there are. A snapshot's checksums are verified before it is used.

    Args:
      directory: the snapshot directory.
      sigma_rel: the σ_rel to synthesize, in ``(0, SIGMA_REL_GAMMA0)``, or a sequence of
        them: all synthesized in the same pass (a grid to choose from on validation costs
        one read of the snapshots, not one per width).
      step: ``None`` = the last snapshot's step; snapshots after ``step`` are not read.
        A step after the last snapshot is refused.
      target: a params-like tree of arrays or ``jax.ShapeDtypeStruct`` (with shardings to
        land sharded): gives the tree type and where each leaf goes, checked first (paths,
        shapes); NNX: ``nnx.state(model, nnx.Param)`` of snapshots of an
        :class:`ema_jax.nnx.EMA`, and an ``nnx.State`` comes back (``nnx.update(model,
        it)``). Without it the saved tree (dicts, lists) lands where a new array does
        (JAX's default device, uncommitted, like a freshly created state's arrays); the
        snapshots are then read to the host.

    Returns:
      The synthesized params, in the dtypes the params had when recorded; for a sequence
      of σ_rel, a list of them, one per σ_rel, in order.

    Warns:
      UserWarning: the snapshots used are all of one step (σ_rel cannot be chosen from
        them).

    Raises:
      FileNotFoundError: no such directory, or no snapshot in it.
      ValueError: another kind of directory (named, with what reads it), snapshots that
        differ, a target that differs from them, a snapshot whose checksum differs (its
        files changed after writing), a ``step`` after the last snapshot, or a
        ``sigma_rel`` / ``step`` the solver refuses.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(target, nnx.State):  # NNX: by the Variables' paths
        values = synthesize_from(directory, sigma_rel, step, nnx.to_pure_dict(target))
        if isinstance(values, list):
            return [_filled(nnx, target, v) for v in values]
        return _filled(nnx, target, values)
    many = not np.isscalar(sigma_rel) and np.ndim(sigma_rel) == 1  # type: ignore[arg-type]
    widths = list(sigma_rel) if many else [sigma_rel]  # type: ignore[arg-type]
    found = snapshots.find(directory)
    first, last = found[0], found[-1]
    reference = integrity.flat(first.saved.tree[0], _AVERAGES)
    for snapshot in found:
        for k, average in enumerate(snapshot.saved.tree):
            problem = _checks.first_difference(
                reference,
                integrity.flat(average, _AVERAGES),
                expected_name=f"snapshot of step {first.step}",
                got_name=f"snapshot of step {snapshot.step} (average {k})",
                compare_dtypes=True,
            )
            if problem is not None:
                raise ValueError(f"snapshots do not match: {problem}")
    out_step = last.step if step is None else _checks.integer("step", step, 1)
    if out_step > last.step:  # type: ignore[operator]
        raise ValueError(
            f"step={out_step} is after the last snapshot (step {last.step} in "
            f"{os.path.dirname(os.path.dirname(last.path))}): synthesize at a step up to "
            f"{last.step}, or step=None for the last"
        )
    in_steps = [s.step for s in found for _ in s.sigma_rels]
    in_sigmas = [x for s in found for x in s.sigma_rels]
    weights = np.atleast_2d(solve_coefficients(in_steps, in_sigmas, out_step, widths))  # type: ignore[arg-type]

    if target is None:  # read to the host, landing where a new array goes (items.read)
        placed = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), first.saved.tree[0])
    else:
        problem = _checks.first_difference(
            integrity.flat(target, _AVERAGES),
            reference,
            expected_name="target",
            got_name="snapshots",
        )
        if problem is not None:
            raise ValueError(f"target does not match the snapshots: {problem}")
        placed = target
    saved = integrity.flat(first.saved.tree[0])
    keys = list(integrity.flat(placed))  # Orbax's flat keys, in leaf order
    stored = [saved[k].dtype for k in keys]
    leaves, treedef = jax.tree.flatten(placed)
    one = jax.tree.unflatten(
        treedef,
        [
            jax.ShapeDtypeStruct(tuple(x.shape), d, sharding=getattr(x, "sharding", None))
            for x, d in zip(leaves, stored, strict=True)
        ],
    )
    ends = np.cumsum([len(s.sigma_rels) for s in found])
    used = [
        (snapshot, weights[:, end - len(snapshot.sigma_rels) : end])
        for snapshot, end in zip(found, ends, strict=True)
        if np.any(weights[:, end - len(snapshot.sigma_rels) : end])
    ]
    totals = [zeros(one) for _ in widths]
    # Reads overlap (Orbax's fixed cost per restore is mostly waiting), at most READ_AHEAD
    # snapshots ahead of the one being added: memory stays bounded.
    with (
        items.reader() as checkpointer,
        concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool,
    ):
        pending: collections.deque[tuple[concurrent.futures.Future[Any], np.ndarray]]
        pending = collections.deque()
        for snapshot, w in used:
            pending.append((pool.submit(snapshot.read, [one] * w.shape[1], checkpointer), w))
            if len(pending) > READ_AHEAD:
                totals = _add(totals, *pending.popleft())
        while pending:
            totals = _add(totals, *pending.popleft())
    dtypes = [np.dtype(first.param_dtypes[k]) for k in keys]
    out = [_dtypes.cast_back(total, dtypes) for total in totals]
    return out if many else out[0]


def _filled(nnx: Any, target: Any, values: Params) -> Any:
    """A copy of the ``nnx.State`` ``target`` holding ``values`` (its pure dict)."""
    filled = jax.tree.map(lambda x: x, target)
    nnx.replace_by_pure_dict(filled, values)
    return filled


def _add(
    totals: list[Params], averages: concurrent.futures.Future[Any], w: np.ndarray
) -> list[Params]:
    """``totals`` plus one snapshot's averages (once read) with their weights ``w``
    ``[K, averages]``; waits for the sums, so the snapshot's buffers are freed."""
    return jax.block_until_ready(accumulate_widths(totals, averages.result(), jnp.asarray(w)))
