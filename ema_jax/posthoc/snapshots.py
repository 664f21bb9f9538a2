"""Post-hoc snapshots on disk: written by a checkpoint :class:`~ema_jax.checkpoint.Manager`
(the same writer lock, the step list re-read after a failed save, checksums), read with the
checkpoint's one item read (checked against a target, checksums verified).

A snapshot is the step directory ``<directory>/<step>/snapshot``: a list of K params trees
(the K recorded averages), described in the item's metadata (the step, their σ_rel, the
params' dtypes to synthesize back into).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _checks, _dtypes, window
from ema_jax.bema_rule import BemaState
from ema_jax.checkpoint import integrity, items, layout
from ema_jax.checkpoint.managers import Manager, as_manager, open_manager
from ema_jax.posthoc.solver import SIGMA_RELS
from ema_jax.transform import EmaState, Params, accumulators, num_averages

#: The Orbax item holding one snapshot's averages.
ITEM = layout.SNAPSHOT
#: The key of a snapshot's description in the item's custom metadata.
META_KEY = "ema_jax.posthoc"
#: Threads reading the snapshots' metadata in :func:`find`.
METADATA_READERS = 8


def snapshot_manager(directory: str | os.PathLike[str], *, async_save: bool = True) -> Manager:
    """A checkpoint manager for :func:`save_snapshot`: ``directory/<step>``, every snapshot
    kept (no ``max_to_keep``), with the guarantees of
    :func:`ema_jax.checkpoint.manager` (one writing run per directory, a failed save keeps
    the intact snapshots listed).

    Give it its own directory, next to the training checkpoint (e.g. ``run/checkpoints``
    and ``run/posthoc``): the training manager prunes old steps, this one must not. With
    ``async_save`` writes continue in the background; call ``mngr.wait_until_finished()``
    (or ``mngr.close()``) before reading.

    The arrays are written uncompressed (:func:`ema_jax.checkpoint.items.handler`): the
    synthesis reads every snapshot, and decompressing them took longer than reading the
    files (recorded weights compress by ~10%). Compressed snapshots (as earlier versions
    wrote them) are read the same way.
    """
    return open_manager(directory, (ITEM,), max_to_keep=None, async_save=async_save, compress=False)


def save_snapshot(
    mngr: Manager,
    step: int,
    averages: Any,
    sigma_rels: Sequence[float] = SIGMA_RELS,
    *,
    dtype: Any = jnp.float32,
    overwrite: bool = False,
) -> bool:
    """Writes the power-function EMAs at ``step`` as one snapshot (all kept).

    Args:
      mngr: from :func:`snapshot_manager`.
      step: the optimizer step the averages are at: with ``update_every = k``, a multiple
        of k (the step of the last update), so the snapshot is that step's profile.
      averages: an :class:`~ema_jax.EmaState` of ``ema((power_function(sigma_rel=s), ...))``
        (Linen: ``state.ema_state``; its full-precision accumulators are written), an
        :class:`ema_jax.nnx.EMA` of such decays (NNX: its accumulators, by the tracked
        Variables' paths, so ``synthesize_from(..., target=nnx.state(model, nnx.Param))``
        returns an ``nnx.State`` for ``nnx.update``), or a sequence of params trees, one
        per σ_rel (e.g. ``state.accumulators(i)`` for chosen ``i`` when other averages
        share the state).
      sigma_rels: the σ_rel of each average, in order.
      dtype: the real floating leaves are written in this dtype (float32 by default);
        complex leaves keep theirs (a real dtype would drop the imaginary part), integer
        and bool leaves too. The params' own dtypes are recorded: synthesis returns them.

      overwrite: delete the snapshots of steps ``>= step`` first (a run resumed from an
        earlier step into the same directory: the abandoned run's later snapshots must not
        be synthesized with this run's).

    Returns:
      Whether a save was started (Orbax's answer).

    Raises:
      ValueError: snapshots of steps ``>= step`` are saved already and ``overwrite`` is
        False (nothing is written or deleted); arguments that are not valid (named).
    """
    mngr = as_manager(mngr)
    step = _checks.integer("step", step, 1)  # type: ignore[assignment]
    dtype = _checks.floating_dtype("dtype", dtype)
    _checks.flag("overwrite", overwrite)
    sigmas = [
        _checks.real(f"sigma_rels[{i}]", s, low=0.0, high=window.SIGMA_REL_MAX, low_open=True)
        for i, s in enumerate(sigma_rels)
    ]
    if isinstance(averages, BemaState) or isinstance(getattr(averages, "state", None), BemaState):
        raise TypeError(
            "averages is BEMA's: post-hoc EMA synthesizes from snapshots of power-function EMAs "
            "(ema_jax.ema((schedules.power_function(sigma_rel=a), "
            "schedules.power_function(sigma_rel=b))))"
        )
    if _is_nnx_ema(averages):
        trees = _nnx_averages(averages)
        param_dtypes = [np.dtype(d) for d in averages.state.param_dtypes]
    elif isinstance(averages, EmaState):
        trees = [accumulators(averages, i) for i in range(num_averages(averages))]
        param_dtypes = [np.dtype(d) for d in averages.param_dtypes]
    else:
        trees = list(averages)
        leaves = integrity.flat(trees[0]).values() if trees else []
        param_dtypes = [np.dtype(jnp.result_type(x)) for x in leaves]
    if len(trees) != len(sigmas):
        raise ValueError(
            f"averages holds {len(trees)} averages but sigma_rels gives {len(sigmas)} σ_rel"
        )
    description = {
        "step": step,
        "sigma_rels": sigmas,
        "param_dtypes": dict(
            zip(integrity.flat(trees[0]), [d.name for d in param_dtypes], strict=True)
        ),
    }
    stored = [_dtypes.cast_real(t, dtype) for t in trees]
    saves = {ITEM: items.save_args(stored, {META_KEY: description}, compress=mngr.compress)}
    mngr.check_writable()
    later = sorted(s for s in mngr.all_steps() if s >= step)
    if later and not overwrite:
        raise ValueError(
            f"cannot save the snapshot of step {step} in {mngr.directory}: snapshots of steps "
            f"{later} are saved already, from a run this one went back on (resumed from an "
            "earlier step?); they would be synthesized with this run's. Pass overwrite=True "
            f"to delete the snapshots of steps >= {step} first, or write into a new directory"
        )
    if later:
        mngr.wait_until_finished()
        for abandoned in later:
            mngr.delete(abandoned)
    return mngr.save_items(step, saves)


def _is_nnx_ema(averages: Any) -> bool:
    """Whether ``averages`` is an :class:`ema_jax.nnx.EMA` (without importing flax's NNX
    for the other kinds)."""
    nnx_module = sys.modules.get("ema_jax.nnx")
    return nnx_module is not None and isinstance(averages, nnx_module.EMA)


def _nnx_averages(ema: Any) -> list[Params]:
    """Each average of an :class:`ema_jax.nnx.EMA` in full precision (its accumulators),
    as the pure dict of its tracked Variables' paths (``nnx.to_pure_dict``): the tree a
    target ``nnx.state(model, nnx.Param)`` has."""
    from flax import nnx

    state = ema.state
    out = []
    for i in range(num_averages(state)):
        shape = jax.tree.structure(ema.shadow(i))
        out.append(nnx.to_pure_dict(jax.tree.unflatten(shape, accumulators(state, i))))
    return out


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One snapshot on disk, as far as its metadata tells (no array is read)."""

    step: int
    path: str
    sigma_rels: list[float]
    param_dtypes: dict[str, str]  # Orbax's flat key of each leaf -> the params' dtype
    saved: Any  # the item's Orbax metadata; ``saved.tree``: the K trees' shapes and dtypes
    where: str  # "the snapshot of step S in DIRECTORY", for the errors

    def read(self, target: list[Params], checkpointer: Any = None) -> list[Params]:
        """The K averages, onto ``target`` (checked first, checksums verified after), with
        ``checkpointer`` (:func:`ema_jax.checkpoint.items.reader`; ``None``: its own)."""
        return items.read(  # type: ignore[no-any-return]
            self.path, target, ITEM, where=self.where, saved=self.saved, checkpointer=checkpointer
        )


def find(directory: str | os.PathLike[str]) -> list[Snapshot]:
    """Every finished snapshot of ``directory``, by step, from their metadata alone.

    Raises:
      FileNotFoundError: no such directory, or no snapshot in it.
      ValueError: ``directory`` is another kind (a training checkpoint, an export: named,
        with what reads it), or a step there is not a snapshot or is damaged.
    """
    directory = layout.expect(directory, layout.SNAPSHOT, "no snapshot directory at")

    def described(step: int, step_path: str) -> Snapshot:
        path = os.path.join(step_path, ITEM)
        where = f"the snapshot of step {step} in {directory}"
        saved = items.metadata(path, where, ITEM)
        description = items.custom(saved, META_KEY)
        if description is None:
            raise ValueError(f"{path} is not a snapshot written by ema_jax.posthoc.save_snapshot")
        return Snapshot(
            step, path, description["sigma_rels"], description["param_dtypes"], saved, where
        )

    # The metadata files are small: read them concurrently (each read is mostly waiting).
    with concurrent.futures.ThreadPoolExecutor(METADATA_READERS) as pool:
        found = list(pool.map(lambda found: described(*found), layout.steps(directory)))
    if not found:
        raise FileNotFoundError(f"no snapshots in {directory}")
    return found
