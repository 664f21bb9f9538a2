"""Misuse of the step factories: a clear error naming the argument or the metric."""

from __future__ import annotations

import jax.numpy as jnp
import optax
import pytest

import ema_jax


def _train_state() -> ema_jax.EmaTrainState:
    return ema_jax.EmaTrainState.create(
        apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1), ema=ema_jax.ema(0.9)
    )


def _loss_not_a_pair() -> None:
    scalar_loss = ema_jax.make_train_step(lambda p, b: jnp.sum(p["w"] * b), has_aux=True)
    scalar_loss(_train_state(), jnp.ones(2))


def _vector_metric() -> None:
    vector_metric = ema_jax.make_paired_eval_step(lambda p, b: p["w"] * b)
    ema_jax.evaluate_dataset(vector_metric, _train_state(), [jnp.ones((2,))])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (_loss_not_a_pair, TypeError, r"has_aux=True, loss_fn must return a pair"),
        (_vector_metric, ValueError, r"metric \['loss'\] of the \w+ params has shape \(2,\)"),
    ],
    ids=["has_aux without a pair", "non-scalar metric"],
)
def test_misuse_raises_naming_it(call, error, match):
    """``has_aux=True`` with a loss that is not a pair, and a non-scalar metric in
    ``evaluate_dataset``, each raise naming it."""
    with pytest.raises(error, match=match):
        call()
