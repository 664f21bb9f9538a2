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

import os
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


def _check_state(state: Any) -> EmaTrainState:
    if not isinstance(state, EmaTrainState):
        raise TypeError(f"state must be an EmaTrainState, got {type(state).__name__}")
    return state


def _handlers(*items: str) -> dict[str, ocp.StandardCheckpointHandler]:
    return {item: ocp.StandardCheckpointHandler() for item in items}


def manager(
    directory: str | os.PathLike[str],
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    async_save: bool = True,
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
    if best_metric is not None:
        return _best_manager(
            directory, max_to_keep, save_interval_steps, async_save, best_metric, best_mode
        )
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=_handlers(STATE, EMA_PARAMS)
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


def _best_manager(
    directory: str | os.PathLike[str],
    max_to_keep: int | None,
    save_interval_steps: int,
    async_save: bool,
    best_metric: str,
    best_mode: str,
) -> ocp.CheckpointManager:
    """:func:`manager` keeping the best ``max_to_keep`` steps by ``best_metric``."""
    if not isinstance(best_metric, str) or not best_metric:
        raise TypeError(f"best_metric must be a metric name (a str), got {best_metric!r}")
    if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        max_to_keep=max_to_keep,
        best_fn=_BestMetric(best_metric, best_mode),
        best_mode=best_mode,
        keep_checkpoints_without_metrics=False,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=_handlers(STATE, EMA_PARAMS)
    )


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


def _static_metadata(state: EmaTrainState) -> dict[str, Any]:
    """What the arrays alone do not say: the params' dtypes the shadow casts back to (an
    fp32 accumulator may average bf16 or fp32 params). Everything else static (``tx``,
    ``ema``, ``average_model_state``, whose averaged tree differs anyway) comes from the
    target, like a learning rate comes from the code."""
    return {"param_dtypes": [np.dtype(d).name for d in state.ema_state.param_dtypes]}


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state: EmaTrainState,
    *,
    force: bool = False,
    metrics: dict[str, float] | None = None,
) -> bool:
    """Saves ``state`` as step ``step``: items ``"state"`` and ``"ema_params"``.

    ``metrics`` (``{name: number}``, e.g. ``{"val_loss_ema": 0.12}``) are stored with the
    step (Orbax's step metrics); a manager made with ``best_metric`` needs that metric and
    ranks the steps by it.

    Returns whether a save was started (``False`` when ``step`` is not due under
    ``save_interval_steps``; ``force=True`` saves anyway). With ``async_save`` the write
    continues in the background: the arrays are already copied, so ``state`` may be donated
    to the next train step right away. In multi-process training every process calls this.
    """
    step = _checks.integer("step", step, 0)  # type: ignore[assignment]
    state = _check_state(state)
    best = _best_fn(mngr)
    checked = _checked_metrics(metrics, best)
    ranking = {} if best is None else {_META_KEY: {"best_metric": best.name, "mode": best.mode}}
    args = ocp.args.Composite(
        **{
            STATE: ocp.args.StandardSave(
                state, custom_metadata={_META_KEY: _static_metadata(state)}
            ),
            EMA_PARAMS: ocp.args.StandardSave(state.ema_params, custom_metadata=ranking),
        }
    )
    return bool(mngr.save(step, args=args, force=force, metrics=checked))


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
    """``{"item.a.b": leaf}``, Orbax's flattening (the key paths it writes)."""
    return {".".join((item, *key)): leaf for key, leaf in ocp.tree.to_flat_dict(tree).items()}


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


def _check_static(metadata: Any, target: EmaTrainState) -> None:
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


def restore(
    mngr: ocp.CheckpointManager, target: EmaTrainState, step: int | None = None
) -> EmaTrainState:
    """The ``EmaTrainState`` saved at ``step`` (the latest when ``None``), bit for bit.

    ``target`` gives the tree, the static fields and where each leaf goes: a concrete
    state, or an abstract one, e.g. ``jax.eval_shape(make_state)`` with
    ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` leaves (then nothing is allocated
    before the read, and each leaf lands with the target's sharding, on any mesh). Leaves
    without a sharding (plain ``jax.eval_shape``) go to the devices they were saved from, or
    to this process's first device when the checkpoint came from other devices. Leaves take
    the target's types: a fresh target's Python-int ``step`` comes back as a Python int.

    Raises:
      FileNotFoundError: no checkpoint (or not that step) in the manager's directory.
      ValueError: the checkpoint and the target differ (first differing path named).
    """
    target = _check_state(target)
    mngr.wait_until_finished()
    step = _resolve_step(mngr, step)
    metadata = mngr.item_metadata(step)[STATE]
    _check_matches(STATE, metadata, target)
    _check_static(metadata, target)
    restore_args = ocp.args.StandardRestore(target, strict=True, fallback_sharding=_fallback())
    args = ocp.args.Composite(**{STATE: restore_args})
    return mngr.restore(step, args=args)[STATE]  # type: ignore[no-any-return]


def _local_target(metadata_tree: Any) -> Any:
    """Abstract arrays for every saved leaf, on this process's first device."""
    sharding = _fallback()
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
        metadata_tree,
    )


def _load_tree(path: str, target: Params | None, item: str) -> Params:
    """Restores the standalone Orbax item at ``path`` (checked against ``target`` first)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no Orbax checkpoint at {path}")
    handler = ocp.StandardCheckpointHandler()
    metadata = handler.metadata(epath.Path(path))
    if target is None:
        target = _local_target(metadata.tree)
    else:
        _check_matches(item, metadata, target)
    args = ocp.args.StandardRestore(target, strict=True, fallback_sharding=_fallback())
    with ocp.Checkpointer(handler) as checkpointer:
        return checkpointer.restore(path, args=args)


def _best_step(directory: str, latest: Any) -> int:
    """The step that the ``best_metric`` recorded with the latest step ranks best."""
    handler = ocp.StandardCheckpointHandler()
    metadata = handler.metadata(epath.Path(os.fspath(latest.path / EMA_PARAMS)))
    ranking = (metadata.custom_metadata or {}).get(_META_KEY)
    if not ranking:
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
    return _load_tree(os.fspath(found.path / EMA_PARAMS), target, EMA_PARAMS)


def deploy_params(
    state: EmaTrainState, *, dtype: Any = None, ema_index: int | None = None
) -> Params:
    """The params-shaped tree that :func:`export_ema_params` writes.

    ``dtype=None``: ``state.ema_params`` (the params' dtypes). Otherwise the floating leaves
    are cast to ``dtype`` straight from the accumulators, so ``dtype=jnp.float32`` keeps the
    full fp32 average of bf16 params. ``ema_index`` picks one of several decays (default:
    the first, as in :meth:`EmaTrainState.select_params`).
    """
    state = _check_state(state)
    if dtype is None:
        return state.select_params(True, ema_index)
    dtype = _checks.floating_dtype("dtype", dtype)
    averages = state.accumulators(ema_index)
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, averages
    )


def export_ema_params(
    path: str | os.PathLike[str],
    state: EmaTrainState,
    *,
    dtype: Any = None,
    ema_index: int | None = None,
    force: bool = False,
) -> None:
    """Writes the EMA weights alone, as a standalone Orbax checkpoint at ``path``.

    The artefact is a params-shaped tree (see :func:`deploy_params` for ``dtype`` and
    ``ema_index``), with no optimizer or EMA state: load it with :func:`load_exported` (or
    any Orbax ``StandardCheckpointer``). Blocks until written; ``force=True`` overwrites an
    existing ``path``. In multi-process training every process calls this.
    """
    tree = deploy_params(state, dtype=dtype, ema_index=ema_index)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), tree, force=force)
        checkpointer.wait_until_finished()


def load_exported(path: str | os.PathLike[str], target: Params | None = None) -> Params:
    """The params written by :func:`export_ema_params`.

    ``target`` as in :func:`load_ema_params`; a target whose paths, shapes or floating
    dtypes differ from the artefact raises ``ValueError`` naming the first differing path.
    """
    return _load_tree(os.path.abspath(path), target, "params")


__all__ = [
    "EMA_PARAMS",
    "STATE",
    "deploy_params",
    "export_ema_params",
    "load_ema_params",
    "load_exported",
    "manager",
    "restore",
    "save",
]
