"""ema_jax.nnx.EMA keeps its average by the tracked Variables' paths: a model whose selected
Variables have other paths, shapes or kinds of dtype is refused naming the model path, in
``update`` and ``switch`` (eagerly and under ``nnx.jit``) and in ``apply_to``; so is a
checkpoint of an EMA over other Variables (see also test_nnx_checkpoint.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ema_jax.nnx


class EncDec(nnx.Module):
    """Two layers of the same shapes: only their names tell them apart."""

    def __init__(self, rngs: nnx.Rngs, enc: str = "enc", dec: str = "dec", width: int = 2):
        setattr(self, enc, nnx.Linear(2, width, rngs=rngs))
        setattr(self, dec, nnx.Linear(2, 2, rngs=rngs))


class WithExtra(EncDec):
    def __init__(self, rngs: nnx.Rngs):
        super().__init__(rngs)
        self.extra = nnx.Linear(2, 2, rngs=rngs)


class EncOnly(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.enc = nnx.Linear(2, 2, rngs=rngs)


class Scale(nnx.Module):
    def __init__(self, dtype=jnp.float32):
        self.w = nnx.Param(jnp.ones(3, dtype))


def _update(averager, model):
    averager.update(model)


@nnx.jit
def _jitted_update(averager, model):
    averager.update(model)


def _apply_to(averager, model):
    averager.apply_to(model)


def _switch(averager, model):
    averager.switch(model)


@nnx.jit
def _jitted_switch(averager, model):
    averager.switch(model)


WAYS = {
    "update": _update,
    "jitted update": _jitted_update,
    "apply_to": _apply_to,
    "switch": _switch,
    "jitted switch": _jitted_switch,
}

# (the model the EMA was built from, the model given later, what the error names)
MISMATCHES = {
    "other names, same shapes": (
        lambda: EncDec(nnx.Rngs(0)),
        lambda: EncDec(nnx.Rngs(0), "encoder", "decoder"),
        r"renamed \(or replaced\): 'dec/bias' -> 'decoder/bias', 'dec/kernel' -> "
        r"'decoder/kernel', 'enc/bias' -> 'encoder/bias', 'enc/kernel' -> 'encoder/kernel'",
    ),
    "one layer renamed": (
        lambda: EncDec(nnx.Rngs(0)),
        lambda: EncDec(nnx.Rngs(0), enc="encoder"),
        r"renamed \(or replaced\): 'enc/bias' -> 'encoder/bias', 'enc/kernel' -> "
        r"'encoder/kernel'\.",
    ),
    "a layer added": (
        lambda: EncDec(nnx.Rngs(0)),
        lambda: WithExtra(nnx.Rngs(0)),
        r"\): added: 'extra/bias', 'extra/kernel'\.",
    ),
    "a layer missing": (
        lambda: EncDec(nnx.Rngs(0)),
        lambda: EncOnly(nnx.Rngs(0)),
        r"\): missing: 'dec/bias', 'dec/kernel'\.",
    ),
    "a shape changed": (
        lambda: EncDec(nnx.Rngs(0)),
        lambda: EncDec(nnx.Rngs(0), width=3),
        r"'enc/bias' has shape \(3,\) in the model, \(2,\) in the EMA",
    ),
    "a dtype of another kind": (
        lambda: Scale(),
        lambda: Scale(jnp.int32),
        r"'w' has dtype int32 in the model, float32 in the EMA \(integer vs real",
    ),
}


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", MISMATCHES)
def test_a_model_with_other_variables_is_refused_naming_the_path(case, way):
    """Built from one model, given another whose selected Variables differ by path, shape
    or kind of dtype: ``update`` and ``switch`` (eager or jitted) and ``apply_to`` raise
    naming the model paths and what changed, and the average is left as it was."""
    built, other, match = MISMATCHES[case]
    model = built()
    averager = ema_jax.nnx.EMA(model, 0.5)
    averager.update(model)  # apply_to needs an update first
    before = [a[...] for a in averager.accumulators]
    with pytest.raises(ValueError, match=match):
        WAYS[way](averager, other())
    for old, new in zip(before, averager.accumulators, strict=True):
        np.testing.assert_array_equal(old, new[...])
    assert int(averager.count[...]) == 1


def test_the_tracked_paths_are_the_model_paths_in_the_state_order():
    """``tracked_paths`` names each accumulator's Variable by its model path, in the order
    of ``nnx.state(model, only)`` (the state's lists, saved checkpoints)."""
    model = EncDec(nnx.Rngs(0))
    averager = ema_jax.nnx.EMA(model, 0.5)
    assert averager.tracked_paths == ("dec/bias", "dec/kernel", "enc/bias", "enc/kernel")
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, (keys, variable), accumulator in zip(
        averager.tracked_paths, flat, averager.accumulators, strict=True
    ):
        assert path == "/".join(keys)
        np.testing.assert_array_equal(variable[...], accumulator[...])


def test_the_same_paths_in_a_new_model_object_are_averaged():
    """A new model object with the same paths (e.g. rebuilt after a restore) is accepted:
    the check is by path, not by object."""
    averager = ema_jax.nnx.EMA(EncDec(nnx.Rngs(0)), 0.5)
    other = EncDec(nnx.Rngs(1))
    averager.update(other)
    want = 0.5 * EncDec(nnx.Rngs(0)).enc.kernel[...] + 0.5 * other.enc.kernel[...]
    np.testing.assert_allclose(averager.params["enc"]["kernel"], want, rtol=1e-6)


def test_a_variable_holding_no_array_is_refused_naming_its_path():
    """A selected Variable holding neither an array nor a number is refused at
    construction, naming its model path and the fix (Python numbers are accepted)."""

    class Tagged(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(2))
            self.tag = nnx.Variable("encoder")

    with pytest.raises(TypeError, match=r"Variable at 'tag' holds a str, not an array or a"):
        ema_jax.nnx.EMA(Tagged(), 0.5, only=nnx.Variable)


def test_the_path_check_runs_when_tracing_not_on_every_jitted_step():
    """Under ``nnx.jit`` the model's Variables are selected and checked once, when the step
    is traced: the filter is not called again on later steps (no per-step host work)."""
    calls = []

    def only_params(path, variable):
        calls.append(path)
        return isinstance(variable, nnx.Param)

    model = EncDec(nnx.Rngs(0))
    averager = ema_jax.nnx.EMA(model, 0.5, only=only_params)
    _jitted_update(averager, model)
    traced = len(calls)
    for _ in range(5):
        _jitted_update(averager, model)
    assert traced > 0 and len(calls) == traced
    assert int(averager.count[...]) == 6
