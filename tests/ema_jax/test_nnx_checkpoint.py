"""ema_jax.checkpoint with an NNX training state: what the NNX adapter adds to a save and a
restore (the EMA's paths, RNG state under the state's checksum)."""

from __future__ import annotations

import nnx_worker
import numpy as np
import optax
import pytest
from flax import nnx

import ema_jax.nnx
from ema_jax import checkpoint


class EncDec(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.enc = nnx.Linear(3, 3, rngs=rngs)
        self.dec = nnx.Linear(3, 3, rngs=rngs)


def _train_state(part: str) -> nnx.Dict:
    """An EMA over the layer ``part`` alone: 'enc' and 'dec' have the same shapes."""
    model = EncDec(nnx.Rngs(0))
    return nnx.Dict(
        model=model,
        optimizer=nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param),
        ema=ema_jax.nnx.EMA(model, 0.9, only=nnx.All(nnx.Param, nnx.PathContains(part))),
    )


@pytest.mark.parametrize("abstract", [False, True], ids=["concrete target", "abstract target"])
def test_restore_refuses_an_ema_over_other_variables(tmp_path, abstract):
    """A checkpoint of an EMA over ``enc`` is refused by a target whose EMA averages
    ``dec`` (same shapes, other paths), naming the paths, before anything is read; the
    matching target restores."""
    with checkpoint.manager(tmp_path / "ckpt") as mngr:
        assert checkpoint.save(mngr, 0, _train_state("enc"))
        mngr.wait_until_finished()
        other = nnx.eval_shape(lambda: _train_state("dec")) if abstract else _train_state("dec")
        with pytest.raises(
            ValueError,
            match=r"checkpoint does not match the target: step 0 in .* holds the EMA of other "
            r"Variables than the target's ema_jax\.nnx\.EMA \(from the checkpoint's paths to "
            r"the target's\): renamed \(or replaced\): 'enc/bias' -> 'dec/bias', 'enc/kernel' "
            r"-> 'dec/kernel'",
        ):
            checkpoint.restore(mngr, other)
        restored = checkpoint.restore(mngr, _train_state("enc"))
    assert restored["ema"].tracked_paths == ("enc/bias", "enc/kernel")


def test_checksum_state_covers_a_model_with_rng_state(tmp_path):
    """``save(..., checksum_state=True)`` of a model with Dropout RNG state (typed PRNG
    keys) writes and verifies the state's checksum; the restore is bit for bit."""
    state = nnx_worker.train(nnx_worker.make(), range(2))
    with checkpoint.manager(tmp_path / "ckpt") as mngr:
        assert checkpoint.save(mngr, 2, state, checksum_state=True)
        mngr.wait_until_finished()
        restored = checkpoint.restore(mngr, nnx.eval_shape(nnx_worker.make))
    for got, want in zip(nnx_worker.leaves(restored), nnx_worker.leaves(state), strict=True):
        np.testing.assert_array_equal(got, want)
