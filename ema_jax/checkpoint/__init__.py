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

The modules: :mod:`~ema_jax.checkpoint.lock` (one writer per directory),
:mod:`~ema_jax.checkpoint.managers` (the manager and the best-metric policy),
:mod:`~ema_jax.checkpoint.layout` (item names, what a directory holds),
:mod:`~ema_jax.checkpoint.integrity` (checks, checksums, damage messages),
:mod:`~ema_jax.checkpoint.items` (the one write and read of an item),
:mod:`~ema_jax.checkpoint.atomic` (an export replaced without a moment of neither),
:mod:`~ema_jax.checkpoint.adapters` (Linen and NNX training states),
:mod:`~ema_jax.checkpoint.training` and :mod:`~ema_jax.checkpoint.export` (the functions
below).
"""

from ema_jax.checkpoint.export import deploy_params, export_ema_params, export_params, load_exported
from ema_jax.checkpoint.layout import EMA_PARAMS, STATE
from ema_jax.checkpoint.lock import LOCK_FILE
from ema_jax.checkpoint.managers import Manager
from ema_jax.checkpoint.training import load_ema_params, manager, restore, save

__all__ = [
    "EMA_PARAMS",
    "LOCK_FILE",
    "STATE",
    "Manager",
    "deploy_params",
    "export_ema_params",
    "export_params",
    "load_ema_params",
    "load_exported",
    "manager",
    "restore",
    "save",
]
