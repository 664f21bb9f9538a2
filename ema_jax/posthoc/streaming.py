"""Synthesis from a snapshot directory, one snapshot at a time: memory stays at about one
snapshot plus the output, however many snapshots there are."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _checks, _dtypes
from ema_jax.checkpoint import integrity, items
from ema_jax.posthoc import snapshots
from ema_jax.posthoc.solver import solve_coefficients
from ema_jax.posthoc.synthesis import accumulate, zeros
from ema_jax.transform import Params

_AVERAGES = "averages"  # how the errors name a snapshot's trees


def synthesize_from(
    directory: str | os.PathLike[str],
    sigma_rel: float,
    step: int | None = None,
    target: Params | None = None,
) -> Params:
    """:func:`~ema_jax.posthoc.synthesize` from the snapshots in ``directory`` (written by
    :func:`~ema_jax.posthoc.save_snapshot`), read one snapshot at a time.

    Only the snapshots' metadata is read to solve for the weights; then each snapshot with
    a non-zero weight is restored, added to the running sum and dropped, so peak memory is
    about one snapshot plus the output, however many snapshots there are.

    Args:
      directory: the snapshot directory.
      sigma_rel: the σ_rel to synthesize, in ``(0, SIGMA_REL_GAMMA0)``.
      step: ``None`` = the last snapshot's step; snapshots after ``step`` are not read.
      target: a params-like tree of arrays or ``jax.ShapeDtypeStruct`` (with shardings to
        land sharded): gives the tree type and where each leaf goes, checked first (paths,
        shapes). Without it the saved tree (dicts, lists) lands on this process's first
        device.

    Returns:
      The synthesized params, in the dtypes the params had when recorded.

    Raises:
      FileNotFoundError: no such directory, or no snapshot in it.
      ValueError: another kind of directory (named, with what reads it), snapshots that
        differ, a target that differs from them, or a ``sigma_rel`` / ``step`` the solver
        refuses.
    """
    found = snapshots.find(directory)
    first = found[0]
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
    in_steps = [s.step for s in found for _ in s.sigma_rels]
    in_sigmas = [x for s in found for x in s.sigma_rels]
    out_step = found[-1].step if step is None else _checks.integer("step", step, 1)
    weights = solve_coefficients(in_steps, in_sigmas, out_step, sigma_rel)  # type: ignore[arg-type]

    if target is None:
        placed = items.local_target(first.saved.tree[0])
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
    total = zeros(one)
    offset = 0
    for snapshot in found:
        k = len(snapshot.sigma_rels)
        w = weights[offset : offset + k]
        offset += k
        if not np.any(w):
            continue
        averages = snapshot.read([one] * k)
        # Wait for the sum before reading the next snapshot: this one's buffers are freed.
        total = jax.block_until_ready(accumulate(total, averages, jnp.asarray(w)))
        del averages
    return _dtypes.cast_back(total, [np.dtype(first.param_dtypes[k]) for k in keys])
