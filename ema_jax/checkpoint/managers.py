"""The checkpoint manager: Orbax's ``CheckpointManager``, held (not subclassed), with the
writer lock, the step list re-read after a failed save, and the best-metric policy kept by
ema_jax (:class:`BestMetric`), which :func:`best_step` applies to any directory."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from ema_jax import _checks
from ema_jax.checkpoint import layout
from ema_jax.checkpoint.lock import WriterLock

#: The item Orbax writes a step's metrics into (``<step>/metrics/metrics``, JSON).
METRICS = "metrics"


class BestMetric:
    """Which steps are best: ``metrics[name]``, lowest (``mode="min"``) or highest
    (``"max"``) first; a NaN ranks worst. Also Orbax's ``best_fn`` for pruning."""

    def __init__(self, name: str, mode: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"best_metric must be a metric name (a str), got {name!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {mode!r}")
        self.name, self.mode = name, mode

    def __call__(self, metrics: Mapping[str, Any]) -> float:
        value = float(metrics[self.name])
        if math.isnan(value):
            return math.inf if self.mode == "min" else -math.inf
        return value

    def rank(self, metrics: Mapping[str, Any]) -> float:
        """Larger is better, whatever the mode."""
        value = self(metrics)
        return value if self.mode == "max" else -value

    def checked(self, metrics: Any) -> dict[str, float] | None:
        """``metrics`` as ``{name: float}``, refused when it lacks this metric."""
        if metrics is None:
            raise ValueError(
                f"this manager keeps the best steps by {self.name!r}: "
                f"save(..., metrics={{{self.name!r}: value}})"
            )
        checked = checked_metrics(metrics)
        if self.name not in checked:
            raise ValueError(
                f"metrics has no {self.name!r}, the manager's best_metric; got {sorted(checked)}"
            )
        return checked

    def recorded(self) -> dict[str, str]:
        """What a step records of this policy (in its ``ema_params`` metadata), so that
        :func:`best_step` ranks a directory without the manager that wrote it."""
        return {"best_metric": self.name, "mode": self.mode}


def checked_metrics(metrics: Any) -> dict[str, float]:
    """``metrics`` as ``{name: float}``; a ``TypeError`` naming what is not a number."""
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        raise TypeError(f"metrics must be a dict of str to numbers, got {metrics!r}")
    checked = {}
    for name, value in metrics.items():
        try:
            checked[name] = float(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metrics[{name!r}] must be a number, got {value!r}") from e
    return checked


class Manager:
    """An Orbax ``CheckpointManager`` (:attr:`orbax`) with ema_jax's guarantees.

    * a writer holds the directory's :class:`~ema_jax.checkpoint.lock.WriterLock` until
      :meth:`close` (``read_only`` managers and processes other than 0 take none);
    * a save that fails (at once or in the background) re-reads the steps on disk, so the
      intact ones stay listed and restorable;
    * :attr:`best` is the best-metric policy, kept here rather than read back from Orbax.

    Every other attribute is the Orbax manager's (``all_steps``, ``latest_step``,
    ``metrics``, ``delete``, ``reload``, ``directory``, ...). A context manager.
    """

    def __init__(
        self,
        orbax: ocp.CheckpointManager,
        *,
        lock: WriterLock | None = None,
        best: BestMetric | None = None,
        read_only: bool = False,
    ) -> None:
        self.orbax = orbax
        self.best = best
        self.read_only = read_only
        self._lock = lock

    def __getattr__(self, name: str) -> Any:  # only for names not found on Manager
        if name == "orbax":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.orbax, name)

    def save_items(
        self,
        step: int,
        items: Mapping[str, ocp.args.StandardSave],
        *,
        force: bool = False,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Orbax's save of ``items`` as step ``step``: whether a save was started."""
        self.check_writable()
        args = ocp.args.Composite(**items)
        try:
            return bool(self.orbax.save(step, args=args, force=force, metrics=metrics))
        except BaseException:
            self.orbax.reload()  # Orbax may have dropped intact steps from its list
            raise

    def check_writable(self) -> None:
        """A ``ValueError`` when this manager was opened with ``read_only=True``."""
        if self.read_only:
            raise ValueError(f"the manager of {self.directory} is read-only (read_only=True)")

    def wait_until_finished(self) -> None:
        """Waits for the save in progress; when it failed, re-reads the steps on disk."""
        try:
            self.orbax.wait_until_finished()
        except BaseException:
            self.orbax.reload()
            raise

    def close(self) -> None:
        """Finishes the saves in progress and releases the directory."""
        try:
            self.orbax.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_manager(
    directory: str | os.PathLike[str],
    items: tuple[str, ...],
    *,
    max_to_keep: int | None = None,
    save_interval_steps: int = 1,
    async_save: bool = True,
    read_only: bool = False,
    best: BestMetric | None = None,
) -> Manager:
    """A :class:`Manager` of ``directory`` whose steps hold ``items`` (standard items)."""
    _checks.integer("max_to_keep", max_to_keep, 1, allow_none=True)
    _checks.integer("save_interval_steps", save_interval_steps, 1)
    _checks.flag("async_save", async_save)
    _checks.flag("read_only", read_only)
    if best is None:
        kept: dict[str, Any] = {
            "preservation_policy": ocp.checkpoint_managers.LatestN(n=max_to_keep)
        }
    else:  # Orbax's best_fn; steps saved without the metric are not kept
        kept = {
            "max_to_keep": max_to_keep,
            "best_fn": best,
            "best_mode": best.mode,
            "keep_checkpoints_without_metrics": False,
        }
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        **kept,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
    )
    directory = os.path.abspath(directory)
    # Taken before Orbax starts: its clean-up of temporary directories would delete the
    # holder's save in progress.
    lock = None if read_only or jax.process_index() != 0 else WriterLock(directory)
    handlers = {item: ocp.StandardCheckpointHandler() for item in items}
    try:
        orbax = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Manager(orbax, lock=lock, best=best, read_only=read_only)


def as_manager(mngr: Any) -> Manager:
    """``mngr`` as a :class:`Manager`: itself, or a plain Orbax manager held as one (no
    lock, no best metric); a ``TypeError`` for anything else."""
    if isinstance(mngr, Manager):
        return mngr
    if isinstance(mngr, ocp.CheckpointManager):
        return Manager(mngr)
    raise TypeError(
        "mngr must be the CheckpointManager made by ema_jax.checkpoint.manager(directory), "
        f"got {type(mngr).__name__}"
        + (
            " (a path: open it with manager(path) first)"
            if isinstance(mngr, (str, os.PathLike))
            else ""
        )
    )


def best_step(directory: str, recorded: Mapping[str, Any] | None) -> int:
    """The best step of ``directory`` by the policy a step ``recorded``
    (:meth:`BestMetric.recorded`), from the metrics Orbax wrote with each step; of equal
    values the latest. Reads only those small JSON files: no manager is opened."""
    if not recorded or "best_metric" not in recorded:
        raise ValueError(f'step="best": {directory} was not written by a manager with best_metric')
    policy = BestMetric(recorded["best_metric"], recorded["mode"])
    ranked = []
    for step, path in layout.steps(directory):
        try:
            with open(os.path.join(path, METRICS, METRICS)) as f:
                metrics = json.load(f)
        except FileNotFoundError:
            continue
        if isinstance(metrics, dict) and policy.name in metrics:
            ranked.append((policy.rank(metrics), step))
    if not ranked:
        raise FileNotFoundError(f"no checkpoint with metrics in {directory}")
    return max(ranked)[1]
