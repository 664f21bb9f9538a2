"""Orbax checkpoints for :class:`~ema_jax.EmaTrainState`: exact resume, EMA-only deployment.

A step written by :func:`save` is one Orbax composite with two items::

    <directory>/<step>/state        the whole EmaTrainState: step, params, opt_state,
                                    ema_state (count, weight, accumulators, ...), model_state
    <directory>/<step>/ema_params   state.ema_params: the shadow, params' tree and dtypes

Only array leaves are stored. Static fields (``apply_fn``, ``tx``, ``ema``,
``average_model_state``, ``EmaState.param_dtypes``) come from the *target* given to
:func:`restore`, exactly as an optimizer's learning rate comes from the code: build the
target with the same ``tx`` and ``ema`` (concrete, or abstract via ``jax.eval_shape``, with
``jax.ShapeDtypeStruct(..., sharding=...)`` leaves to restore straight onto a mesh).

Accumulators keep their own dtype (fp32 EMA of bf16 params stays fp32). Before any array is
read, the checkpoint's metadata is compared with the target: a missing or extra path, a
different shape, a different floating dtype, or different ``param_dtypes`` raises
``ValueError`` naming the first differing path. Nothing is silently cast, padded, dropped or
re-initialised.

Everything else is Orbax's: ``CheckpointManager`` (async saves, ``wait_until_finished``,
``latest_step``, ``max_to_keep``), atomic step directories (an interrupted save leaves an
``*.orbax-checkpoint-tmp*`` directory that restore never sees), sharded and multi-process
writes.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import os
import socket
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ema_jax import _checks
from ema_jax.train_state import EmaTrainState
from ema_jax.transform import Params

STATE = "state"
EMA_PARAMS = "ema_params"
_META_KEY = "ema_jax"
LOCK_FILE = ".ema_jax-writer.lock"


def _nnx_ema(state: Any) -> Any:
    """The one ``ema_jax.nnx.EMA`` of an NNX training state (a graph node holding the
    model, the optimizer and the EMA, e.g. ``nnx.Dict(model=..., optimizer=..., ema=...)``),
    or ``None`` for an :class:`EmaTrainState`; a ``TypeError`` for anything else."""
    if isinstance(state, EmaTrainState):
        return None
    from flax import nnx

    from ema_jax.nnx import EMA

    if not isinstance(state, (nnx.Module, nnx.Pytree)):
        raise TypeError(
            "state must be an EmaTrainState or an NNX object holding one ema_jax.nnx.EMA "
            f"(e.g. nnx.Dict(model=..., optimizer=..., ema=...)), got {type(state).__name__}"
        )
    found = [node for _, node in nnx.iter_graph(state) if isinstance(node, EMA)]
    if len(found) != 1:
        raise TypeError(
            f"an NNX training state must hold exactly one ema_jax.nnx.EMA, found {len(found)} "
            f"in {type(state).__name__}"
        )
    return found[0]


def _arrays(state: Any) -> Any:
    """The tree of arrays the ``state`` item holds: the state itself, or ``nnx.state``."""
    if isinstance(state, EmaTrainState):
        return state
    from flax import nnx

    return nnx.state(state)


def _param_dtypes(state: Any) -> tuple[np.dtype, ...]:
    ema = _nnx_ema(state)
    return state.ema_state.param_dtypes if ema is None else ema.param_dtypes  # type: ignore[no-any-return]


def _check_manager(mngr: Any) -> ocp.CheckpointManager:
    if not isinstance(mngr, ocp.CheckpointManager):
        raise TypeError(
            "mngr must be the CheckpointManager made by ema_jax.checkpoint.manager(directory), "
            f"got {type(mngr).__name__}"
            + (
                " (a path: open it with manager(path) first)"
                if isinstance(mngr, (str, os.PathLike))
                else ""
            )
        )
    return mngr


def _handlers(*items: str) -> dict[str, ocp.StandardCheckpointHandler]:
    return {item: ocp.StandardCheckpointHandler() for item in items}


class _WriterLock:
    """One writing run per checkpoint directory: an exclusive ``flock`` on
    ``<directory>/.ema_jax-writer.lock``, which names its holder (host, pid, start time).

    The kernel drops the lock when its holder exits, however it dies (``kill -9``
    included), so a stale file is simply taken over. Two managers of one process conflict
    too (each holds its own open file). Only process 0 of a multi-process run takes it: a
    run's processes together are one writer.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_FILE)
        os.makedirs(directory, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with open(fd, closefd=True) as f:
                    holder = f.read().strip() or "unknown (it has not written its name yet)"
                raise RuntimeError(
                    f"checkpoint directory {directory} is already open for writing by "
                    f"another manager: {holder} (lock {self.path}). One writing run per "
                    "directory: close that manager (or wait for its run to end), write "
                    "elsewhere, or open this one with manager(directory, read_only=True) to "
                    "read"
                ) from None
            try:  # a holder that closed meanwhile removed the file we locked: retry
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Removes the file (still locked, so no one can take it meanwhile), then unlocks.
        A killed holder leaves the file, unlocked: the next manager takes it over."""
        if self._fd is not None:
            os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


class _Manager(ocp.CheckpointManager):
    """Orbax's ``CheckpointManager`` plus the writer lock (released by ``close``) and a
    step list re-read from disk when a save fails (Orbax otherwise forgets intact steps)."""

    def __init__(self, directory: str, *, lock: _WriterLock | None, **kwargs: Any) -> None:
        self._writer_lock = lock
        self.read_only = bool(kwargs["options"].read_only)
        try:
            super().__init__(directory, **kwargs)
        except BaseException:
            self._release()
            raise

    def wait_until_finished(self) -> None:
        try:
            super().wait_until_finished()
        except BaseException:
            self.reload()  # a failed async save: the steps on disk are still there
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._writer_lock is not None:
            self._writer_lock.release()


def manager(
    directory: str | os.PathLike[str],
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
    read_only: bool = False,
    best_metric: str | None = None,
    best_mode: str = "min",
) -> ocp.CheckpointManager:
    """An Orbax ``CheckpointManager`` for :func:`save` / :func:`restore`.

    Args:
      directory: root directory (created if missing); step ``s`` lives in ``directory/s``.
      max_to_keep: keep the newest ``max_to_keep`` steps (``None``: keep all).
      save_interval_steps: :func:`save` writes only steps that are multiples of this.
      async_save: write in a background thread; :func:`save` returns once the arrays are
        copied off the devices. Call ``mngr.wait_until_finished()`` (or ``mngr.close()``)
        before exiting. Left-over temporary directories of interrupted saves are removed
        when the manager is created.

      read_only: open for :func:`restore` only (an evaluator polling a training run's
        directory): no lock is taken and :func:`save` raises.

    One writing run per directory: a manager that can write holds a lock on the directory
    until ``close()`` (or its process ends, ``kill -9`` included); a second one, in this or
    another process, raises ``RuntimeError`` naming the holder. In a multi-process run only
    process 0 takes it. Readers (``read_only=True``, :func:`load_ema_params`) never wait.
      best_metric: keep the best ``max_to_keep`` steps by this metric of
        :func:`save`'s ``metrics`` instead of the newest (Orbax's ``best_fn``); every save
        must then give it. A NaN metric ranks worst. ``load_ema_params(d, step="best")``
        loads the best step.
      best_mode: ``"min"`` (a loss) or ``"max"``: which end of ``best_metric`` is best.

    The manager is a context manager (``with ckpt.manager(d) as mngr: ...`` closes it).
    """
    _checks.integer("max_to_keep", max_to_keep, 1, allow_none=True)
    _checks.integer("save_interval_steps", save_interval_steps, 1)
    if not isinstance(async_save, bool):
        raise TypeError(f"async_save must be a bool, got {async_save!r}")
    _checks.flag("read_only", read_only)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        **_preservation(max_to_keep, best_metric, best_mode),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
    )
    directory = os.path.abspath(directory)
    # Taken before Orbax starts: its clean-up of temporary directories would delete the
    # holder's save in progress.
    lock = None if read_only or jax.process_index() != 0 else _WriterLock(directory)
    return _Manager(
        directory, lock=lock, options=options, item_handlers=_handlers(STATE, EMA_PARAMS)
    )


class _BestMetric:
    """Orbax's ``best_fn``: ``metrics[name]``, NaN mapped to the worst end for ``mode``."""

    def __init__(self, name: str, mode: str) -> None:
        self.name, self.mode = name, mode

    def __call__(self, metrics: Any) -> float:
        value = float(metrics[self.name])
        if np.isnan(value):
            return np.inf if self.mode == "min" else -np.inf
        return value


def _preservation(
    max_to_keep: int | None, best_metric: str | None, best_mode: str
) -> dict[str, Any]:
    """The options that say which steps stay: the newest ``max_to_keep``, or the best by
    ``best_metric`` (Orbax's ``best_fn``; steps saved without the metric are not kept)."""
    if best_metric is None:
        return {"preservation_policy": ocp.checkpoint_managers.LatestN(n=max_to_keep)}
    if not isinstance(best_metric, str) or not best_metric:
        raise TypeError(f"best_metric must be a metric name (a str), got {best_metric!r}")
    if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    return {
        "max_to_keep": max_to_keep,
        "best_fn": _BestMetric(best_metric, best_mode),
        "best_mode": best_mode,
        "keep_checkpoints_without_metrics": False,
    }


def _best_fn(mngr: ocp.CheckpointManager) -> _BestMetric | None:
    """The ``best_fn`` of a :func:`manager` made with ``best_metric`` (Orbax keeps its
    options private), else ``None``."""
    best_fn = getattr(getattr(mngr, "_options", None), "best_fn", None)
    return best_fn if isinstance(best_fn, _BestMetric) else None


def _checked_metrics(metrics: Any, best: _BestMetric | None) -> dict[str, float] | None:
    if metrics is None:
        if best is not None:
            raise ValueError(
                f"this manager keeps the best steps by {best.name!r}: "
                f"save(..., metrics={{{best.name!r}: value}})"
            )
        return None
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        raise TypeError(f"metrics must be a dict of str to numbers, got {metrics!r}")
    checked = {}
    for name, value in metrics.items():
        try:
            checked[name] = float(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metrics[{name!r}] must be a number, got {value!r}") from e
    if best is not None and best.name not in checked:
        raise ValueError(
            f"metrics has no {best.name!r}, the manager's best_metric; got {sorted(checked)}"
        )
    return checked


def _static_metadata(state: Any) -> dict[str, Any]:
    """What the arrays alone do not say: the params' dtypes the shadow casts back to (an
    fp32 accumulator may average bf16 or fp32 params). Everything else static (``tx``,
    ``ema``, ``average_model_state``, whose averaged tree differs anyway) comes from the
    target, like a learning rate comes from the code."""
    return {"param_dtypes": [np.dtype(d).name for d in _param_dtypes(state)]}


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state: Any,
    *,
    force: bool = False,
    overwrite: bool = False,
    checksum_state: bool = False,
    metrics: dict[str, float] | None = None,
) -> bool:
    """Saves ``state`` as step ``step``: items ``"state"`` and ``"ema_params"``. ``state`` is an
    :class:`EmaTrainState`, or an NNX object holding the model, the optimizer and one
    ``ema_jax.nnx.EMA`` (e.g. ``nnx.Dict(model=..., optimizer=..., ema=...)``): its
    ``nnx.state`` is the ``"state"`` item, the EMA's shadow (pure dicts) ``"ema_params"``.

    ``metrics`` (``{name: number}``, e.g. ``{"val_loss_ema": 0.12}``) are stored with the
    step (Orbax's step metrics); a manager made with ``best_metric`` needs that metric and
    ranks the steps by it.

    Returns whether a save was started (``False`` when ``step`` is not due under
    ``save_interval_steps``, or is the latest step already saved; ``force=True`` saves a
    step that is not due). With ``async_save`` the write continues in the background: the
    arrays are already copied, so ``state`` may be donated to the next train step right
    away. In multi-process training every process calls this.

    The ``ema_params`` item carries a checksum of its arrays, verified by
    :func:`load_ema_params`; ``checksum_state=True`` adds one for the ``"state"`` item too,
    verified by :func:`restore` (each costs one read of those arrays at save and at load).

    Raises:
      ValueError: steps after ``step`` are saved already (the run went back with
        ``restore(..., step=)``): saving would leave the abandoned run's steps on disk as
        if current. ``overwrite=True`` deletes the saved steps ``>= step`` first.
      ValueError: a leaf of ``state`` was deleted (donated to a jitted step).
    """
    mngr = _check_manager(mngr)
    step = _checks.integer("step", step, 0)  # type: ignore[assignment]
    ema = _nnx_ema(state)
    tree = _arrays(state)
    _check_alive(tree, "state")
    if ema is None:
        ema_params = state.ema_params
    elif ema.transform.stacked:
        ema_params = tuple(deploy_params(state, ema_index=i) for i in range(len(ema.decay)))
    else:
        ema_params = deploy_params(state)
    _checks.flag("overwrite", overwrite)
    _checks.flag("checksum_state", checksum_state)
    if isinstance(mngr, _Manager) and mngr.read_only:
        raise ValueError(f"the manager of {mngr.directory} is read-only (read_only=True)")
    abandoned = sorted(s for s in mngr.all_steps() if s >= step)
    if abandoned and abandoned[-1] > step and not overwrite:
        raise ValueError(
            f"cannot save step {step} in {mngr.directory}: steps {abandoned} are saved "
            "already, from a run this one went back on (restore(..., step=)); they would "
            f"stay on disk as if current. Pass overwrite=True to delete steps >= {step} "
            "first, or save into a new directory"
        )
    if overwrite:
        mngr.wait_until_finished()
        for abandoned_step in abandoned:
            mngr.delete(abandoned_step)
    meta = _static_metadata(state)
    if checksum_state:
        meta = {**meta, _CHECKSUMS: _checksums(tree)}
    best = _best_fn(mngr)
    checked = _checked_metrics(metrics, best)
    ranking = {} if best is None else {"best_metric": best.name, "mode": best.mode}
    ema_meta = {_META_KEY: {_CHECKSUMS: _checksums(ema_params), **ranking}}
    args = ocp.args.Composite(
        **{
            STATE: ocp.args.StandardSave(tree, custom_metadata={_META_KEY: meta}),
            EMA_PARAMS: ocp.args.StandardSave(ema_params, custom_metadata=ema_meta),
        }
    )
    try:
        return bool(mngr.save(step, args=args, force=force, metrics=checked))
    except BaseException:
        mngr.reload()  # Orbax may have dropped intact steps from its list: re-read the disk
        raise


_CHECKSUMS = "checksums"


def _check_alive(tree: Any, name: str) -> None:
    """A ``ValueError`` naming the first leaf whose buffer was deleted (donated)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and leaf.is_deleted():
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} was deleted (donated to a jitted step, "
                "e.g. make_train_step's): save the state that step returned, not its input"
            )


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """``Σ (2i+1)·u_i mod 2^32`` over the bits ``u`` of ``x`` (as uint32 words, ``i`` their
    position): any change confined to one element changes it (odd multipliers are
    invertible mod 2^32), and so does nearly every other change, swaps included. One
    integer reduction on the devices, whatever the sharding (the same on any mesh)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize < 4:
        unsigned = jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    words = words.ravel()
    odd = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
    return jnp.sum(words * odd, dtype=jnp.uint32)


@jax.jit
def _leaf_checksums(leaves: list[Any]) -> list[jax.Array]:
    return [_leaf_checksum(x) for x in leaves]


def _checksums(tree: Any) -> dict[str, int]:
    """``{"a.b": checksum}`` for every leaf, in Orbax's flat key paths."""
    flat = ocp.tree.to_flat_dict(tree)
    sums = jax.device_get(_leaf_checksums([jnp.asarray(x) for x in flat.values()]))
    return {".".join(k): int(c) for k, c in zip(flat, sums, strict=True)}


def _verify(tree: Any, saved: Any, where: str) -> None:
    """A ``ValueError`` naming the first leaf of ``tree`` whose checksum differs from the
    one written at save (nothing to check for artefacts written without one)."""
    if not saved:
        return
    for path, value in _checksums(tree).items():
        if saved.get(path) != value:
            raise ValueError(
                f"{where} is corrupt: {path} does not match the checksum written at save "
                f"({saved.get(path)} saved, {value} read); its files were changed or damaged "
                "after writing. Restore an earlier step or re-export"
            )


def _resolve_step(mngr: ocp.CheckpointManager, step: int | None) -> int:
    if step is None:
        latest = mngr.latest_step()
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
        return int(latest)
    step = _checks.integer("step", step, 0)  # type: ignore[assignment]
    if step not in mngr.all_steps():
        raise FileNotFoundError(
            f"step {step} is not in {mngr.directory}; available: {sorted(mngr.all_steps())}"
        )
    return step  # type: ignore[return-value]


def _flat(item: str, tree: Any) -> dict[str, Any]:
    """``{"item.a.b": leaf}``, Orbax's flattening (the key paths it writes); typed PRNG keys
    (NNX's RNG state) as the raw key data Orbax stores for them."""
    return {
        ".".join((item, *key)): _as_stored(leaf)
        for key, leaf in ocp.tree.to_flat_dict(tree).items()
    }


def _as_stored(leaf: Any) -> Any:
    if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.eval_shape(jax.random.key_data, leaf)
    return leaf


def _check_matches(item: str, metadata: Any, target: Any) -> None:
    """A ``ValueError`` naming the first path where ``target`` and the checkpoint differ in
    paths, shapes or floating dtypes, before any array is read."""
    problem = _checks.first_difference(
        _flat(item, target),
        _flat(item, metadata.tree),
        expected_name="target",
        got_name="checkpoint",
        compare_dtypes=True,
    )
    if problem is not None:
        raise ValueError(f"checkpoint does not match the target: {problem}")


def _check_static(metadata: Any, target: Any) -> None:
    saved = (metadata.custom_metadata or {}).get(_META_KEY)
    if saved is None:
        raise ValueError("checkpoint has no ema_jax metadata: was it written by ema_jax.save?")
    for name, expected in _static_metadata(target).items():
        if saved.get(name) != expected:
            raise ValueError(
                f"checkpoint does not match the target: ema_state.{name} is {saved.get(name)} "
                f"in the checkpoint, {expected} in the target"
            )


def _fallback() -> jax.sharding.Sharding:
    """Where leaves without a sharding go when the devices they were saved from are gone."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
    """The ``EmaTrainState`` saved at ``step`` (the latest when ``None``), bit for bit.

    ``target`` gives the tree, the static fields and where each leaf goes: a concrete
    state, or an abstract one, e.g. ``jax.eval_shape(make_state)`` with
    ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` leaves (then nothing is allocated
    before the read, and each leaf lands with the target's sharding, on any mesh). Leaves
    without a sharding (plain ``jax.eval_shape``) go to the devices they were saved from, or
    to this process's first device when the checkpoint came from other devices. Leaves take
    the target's types: a fresh target's Python-int ``step`` comes back as a Python int.

    For NNX (see :func:`save`) ``target`` is the training object, concrete or abstract from
    ``nnx.eval_shape``; a new object holding the saved state is returned
    (``nnx.merge(graphdef, restored)``), ``target`` is not changed.

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in the manager's directory.
      ValueError: the checkpoint and the target differ (first differing path named).
    """
    mngr = _check_manager(mngr)
    tree, rebuild = _arrays(target), _rebuild(target)
    mngr.wait_until_finished()
    step = _resolve_step(mngr, step)
    earlier = [s for s in mngr.all_steps() if s < step]
    where = f"step {step} in {mngr.directory}"
    metadata = _read_metadata(lambda: mngr.item_metadata(step)[STATE], where, STATE, earlier)
    _check_matches(STATE, metadata, tree)
    _check_static(metadata, target)
    restore_args = ocp.args.StandardRestore(tree, strict=True, fallback_sharding=_fallback())
    args = ocp.args.Composite(**{STATE: restore_args})
    restored = mngr.restore(step, args=args)[STATE]
    saved = (metadata.custom_metadata or {}).get(_META_KEY, {}).get(_CHECKSUMS)
    _verify(restored, saved, f"the {STATE} item of {where}")
    return rebuild(restored)


def _rebuild(target: Any) -> Any:
    """restored arrays -> the restored state: themselves, or for NNX a new object."""
    if _nnx_ema(target) is None:
        return lambda restored: restored
    from flax import nnx

    return functools.partial(nnx.merge, nnx.graphdef(target))


def _read_metadata(read: Any, where: str, item: str, earlier: list[int] | None) -> Any:
    """``read()``, Orbax's metadata of ``item``; a ``ValueError`` naming the checkpoint and
    the file when that file is missing, truncated or unreadable."""
    try:
        metadata = read()
        problem = None if getattr(metadata, "tree", None) is not None else "missing or empty"
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
        problem = f"unreadable: {type(e).__name__}: {e}"
    if problem is None:
        return metadata
    hint = (
        f"; an earlier step restores: step={max(earlier)} (saved: {sorted(earlier)})"
        if earlier
        else ("; no earlier step is saved" if earlier is not None else "")
    )
    raise ValueError(
        f"{where} is damaged: its {item}/_METADATA file (the tree of the saved arrays) is "
        f"{problem}{hint}"
    )


def _local_target(metadata_tree: Any) -> Any:
    """Abstract arrays for every saved leaf, on this process's first device."""
    sharding = _fallback()
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
        metadata_tree,
    )


def _load_tree(
    path: str,
    target: Params | None,
    item: str,
    where: str | None = None,
    earlier: list[int] | None = None,
) -> Params:
    """Restores the standalone Orbax item at ``path`` (checked against ``target`` first,
    its checksum verified after). ``where`` and ``earlier`` word the errors."""
    where = path if where is None else where
    from flax import nnx

    if isinstance(target, nnx.State):  # Variables: restore their values, keep their types
        values = _load_tree(path, nnx.to_pure_dict(target), item, where, earlier)
        filled = jax.tree.map(lambda x: x, target)  # new Variables: the target is not changed
        nnx.replace_by_pure_dict(filled, values)
        return filled
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no Orbax checkpoint at {path}")
    handler = ocp.StandardCheckpointHandler()
    metadata = _read_metadata(lambda: handler.metadata(epath.Path(path)), where, item, earlier)
    if target is None:
        target = _local_target(metadata.tree)
    else:
        _check_matches(item, metadata, target)
    args = ocp.args.StandardRestore(target, strict=True, fallback_sharding=_fallback())
    with ocp.Checkpointer(handler) as checkpointer:
        restored = checkpointer.restore(path, args=args)
    saved = (metadata.custom_metadata or {}).get(_META_KEY, {}).get(_CHECKSUMS)
    _verify(restored, saved, where)
    return restored


def _best_step(directory: str, latest: Any) -> int:
    """The step that the ``best_metric`` recorded with the latest step ranks best."""
    handler = ocp.StandardCheckpointHandler()
    metadata = handler.metadata(epath.Path(os.fspath(latest.path / EMA_PARAMS)))
    ranking = (metadata.custom_metadata or {}).get(_META_KEY) or {}
    if "best_metric" not in ranking:  # the item's metadata always holds its checksums
        raise ValueError(f'step="best": {directory} was not written by a manager with best_metric')
    best_fn = _BestMetric(ranking["best_metric"], ranking["mode"])
    options = ocp.CheckpointManagerOptions(
        read_only=True,
        save_interval_steps=0,
        create=False,
        best_fn=best_fn,
        best_mode=ranking["mode"],
    )
    with ocp.CheckpointManager(directory, options=options) as reader:
        best = reader.best_step()
    if best is None:
        raise FileNotFoundError(f"no checkpoint with metrics in {directory}")
    return int(best)


def load_ema_params(
    directory: str | os.PathLike[str],
    step: int | str | None = None,
    target: Params | None = None,
) -> Params:
    """The ``ema_params`` saved at ``step`` (latest when ``None``; ``"best"``: the best step
    of a :func:`manager` made with ``best_metric``), for evaluation or deploy.

    Opens only ``directory/<step>/ema_params`` (about a fifth of an Adam checkpoint): the
    ``"state"`` item (optimizer state, accumulators) is never read. ``target`` (a
    params-like tree of arrays or ``jax.ShapeDtypeStruct`` with shardings) gives the tree
    type and placement, and is checked first (paths, shapes, floating dtypes); without it
    the saved tree (dicts; tuples come back as lists) lands on this process's first device.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint in {directory}")
    name_format = ocp.path.step.standard_name_format()  # the manager's step naming
    if step is None or step == "best":
        found = ocp.path.step.latest_step_metadata(directory, name_format)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        if step == "best":
            found = name_format.find_step(directory, _best_step(directory, found))
    else:
        _checks.integer("step", step, 0)
        try:
            found = name_format.find_step(directory, step)
        except ValueError as e:
            raise FileNotFoundError(f"step {step} is not in {directory}") from e
    all_steps = ocp.path.step.checkpoint_steps(directory)
    earlier = [s for s in all_steps if s < found.step]
    where = f"step {found.step} in {directory}"
    return _load_tree(os.fspath(found.path / EMA_PARAMS), target, EMA_PARAMS, where, earlier)


def deploy_params(state: Any, *, dtype: Any = None, ema_index: int | None = None) -> Params:
    """The params-shaped tree that :func:`export_ema_params` writes.

    ``dtype=None``: ``state.ema_params`` (the params' dtypes). Otherwise the floating leaves
    are cast to ``dtype`` straight from the accumulators, so ``dtype=jnp.float32`` keeps the
    full fp32 average of bf16 params. ``ema_index`` picks one of several decays (default:
    the first, as in :meth:`EmaTrainState.select_params`). For an NNX training state (see
    :func:`save`): the averaged Variables' values as a pure dict (``nnx.to_pure_dict``).
    """
    ema = _nnx_ema(state)
    if ema is not None:
        from flax import nnx

        from ema_jax import transform

        if dtype is None:
            return nnx.to_pure_dict(ema.shadow(ema_index))
        leaves = transform.accumulators(ema.state, ema_index)
        averages = nnx.to_pure_dict(jax.tree.unflatten(ema.variables, leaves))
    elif dtype is None:
        return state.select_params(True, ema_index)
    else:
        averages = state.accumulators(ema_index)
    dtype = _checks.floating_dtype("dtype", dtype)
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, averages
    )


def export_ema_params(
    path: str | os.PathLike[str],
    state: Any,
    *,
    dtype: Any = None,
    ema_index: int | None = None,
    force: bool = False,
) -> None:
    """Writes the EMA weights alone, as a standalone Orbax checkpoint at ``path``.

    The artefact is a params-shaped tree (see :func:`deploy_params` for ``dtype`` and
    ``ema_index``), with no optimizer or EMA state: load it with :func:`load_exported` (or
    any Orbax ``StandardCheckpointer``). Blocks until written; ``force=True`` overwrites an
    existing ``path`` (else ``ValueError``). A checksum of the arrays is written with
    them and verified by :func:`load_exported`. In multi-process training every process
    calls this.
    """
    _check_alive(_arrays(state), "state")
    export_params(path, deploy_params(state, dtype=dtype, ema_index=ema_index), force=force)


def export_params(path: str | os.PathLike[str], params: Params, *, force: bool = False) -> None:
    """Writes a params tree as the standalone artefact :func:`load_exported` reads (what
    :func:`export_ema_params` writes; e.g. a synthesized post-hoc EMA), with a checksum of
    its arrays that :func:`load_exported` verifies. Blocks until written; ``force=True``
    overwrites an existing ``path`` (else ``ValueError``)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not _checks.flag("force", force):
        raise ValueError(f"{path} already exists: pass force=True to overwrite it")
    _check_alive(params, "params")
    meta = {_META_KEY: {_CHECKSUMS: _checksums(params)}}
    args = ocp.args.StandardSave(params, custom_metadata=meta)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:  # blocking
        checkpointer.save(path, args=args, force=force)


def load_exported(path: str | os.PathLike[str], target: Params | None = None) -> Params:
    """The params written by :func:`export_ema_params`. For NNX, ``target`` may be an
    ``nnx.State`` (e.g. ``nnx.state(nnx.eval_shape(make_model), nnx.Param)``): the result is
    that State with the exported values (``nnx.update(model, it)`` or ``nnx.merge``).

    ``target`` as in :func:`load_ema_params`; a target whose paths, shapes or floating
    dtypes differ from the artefact raises ``ValueError`` naming the first differing path.
    """
    return _load_tree(os.path.abspath(path), target, "params")


__all__ = [
    "EMA_PARAMS",
    "STATE",
    "deploy_params",
    "export_ema_params",
    "export_params",
    "load_ema_params",
    "load_exported",
    "manager",
    "restore",
    "save",
]
