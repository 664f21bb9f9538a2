"""ema_jax: exponential moving averages of JAX/Flax model weights.

tx = ema_jax.ema(0.999)                      # a pure init / update pair over params
                                             # (or ema_jax.bema(): the EMA without the lag)
state = ema_jax.EmaTrainState.create(apply_fn=..., params=..., tx=optax.adam(1e-3), ema=tx)
state = state.apply_gradients(grads=grads)   # optimizer step, then EMA update
state.ema_params                             # the weights to evaluate and deploy

``ema_jax.checkpoint`` (Orbax), ``ema_jax.nnx`` and ``ema_jax.posthoc`` are imported on first
use, so ``import ema_jax`` stays light.
"""

import importlib
from typing import Any

from ema_jax import monitors, schedules
from ema_jax.accumulation import optimizer_stepped
from ema_jax.bema_rule import BemaState, BemaTransform, bema
from ema_jax.early_stopping import EarlyStopping, EarlyStoppingState
from ema_jax.loop import DataError, TrainResult, train_with_ema
from ema_jax.steps import (
    evaluate_dataset,
    make_eval_step,
    make_paired_eval_step,
    make_train_step,
)
from ema_jax.train_state import EmaTrainState
from ema_jax.transform import (
    Decay,
    EmaState,
    EmaTransform,
    accumulators,
    ema,
    num_averages,
    shadow,
    shadows,
)
from ema_jax.window import (
    decay_for_window,
    effective_window,
    gamma_to_sigma_rel,
    half_life,
    scale_decay,
    sigma_rel_to_gamma,
)

__version__ = "0.1.0"

__all__ = [
    "BemaState",
    "BemaTransform",
    "DataError",
    "Decay",
    "EarlyStopping",
    "EarlyStoppingState",
    "EmaState",
    "EmaTrainState",
    "EmaTransform",
    "TrainResult",
    "accumulators",
    "bema",
    "checkpoint",
    "decay_for_window",
    "effective_window",
    "ema",
    "evaluate_dataset",
    "gamma_to_sigma_rel",
    "half_life",
    "make_eval_step",
    "make_paired_eval_step",
    "make_train_step",
    "monitors",
    "nnx",
    "num_averages",
    "optimizer_stepped",
    "posthoc",
    "scale_decay",
    "schedules",
    "shadow",
    "shadows",
    "sigma_rel_to_gamma",
    "train_with_ema",
]


def __getattr__(name: str) -> Any:
    """``ema_jax.checkpoint`` (Orbax, tensorstore), ``ema_jax.nnx`` and ``ema_jax.posthoc``
    load on first use."""
    if name in ("checkpoint", "nnx", "posthoc"):
        return importlib.import_module(f"ema_jax.{name}")
    raise AttributeError(f"module 'ema_jax' has no attribute {name!r}")
