"""NNX training for the checkpoint tests: run in the test process and, as ``python
nnx_worker.py DIR``, in a fresh one that resumes from DIR's checkpoint and loads DIR's
export, writing what it got to DIR/resumed.npz (see test_nnx.py)."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ema_jax.nnx
from ema_jax import checkpoint


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(3, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.lin(x)))))[:, 0]


def make() -> nnx.Dict:
    model = Net(nnx.Rngs(0, dropout=1))
    return nnx.Dict(
        model=model,
        optimizer=nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param),
        ema=ema_jax.nnx.EMA(model, (0.9, 0.99), debias=(True, False)),
    )


def batch(i: int):
    rng = np.random.default_rng(i)
    return jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), jnp.asarray(rng.normal(size=16))


@nnx.jit(donate_argnums=0)
def train_step(train, x, y):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(train["model"])
    train["optimizer"].update(train["model"], grads)
    train["ema"].update(train["model"])


def train(state: nnx.Dict, steps: range) -> nnx.Dict:
    for i in steps:
        train_step(state, *batch(i))
    return state


def leaves(state: nnx.Dict) -> list[np.ndarray]:
    """Every array of the state, RNG keys as their key data."""
    key = jax.dtypes.prng_key
    return [
        np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, key) else x)
        for x in jax.tree.leaves(nnx.state(state))
    ]


def infer(model: Net) -> np.ndarray:
    model.eval()
    return np.asarray(model(batch(99)[0]))


if __name__ == "__main__":
    directory = sys.argv[1]
    with checkpoint.manager(f"{directory}/ckpt", read_only=True) as mngr:
        state = checkpoint.restore(mngr, nnx.eval_shape(make))
    state = train(state, range(3, 6))
    abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(0, dropout=1)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    exported = checkpoint.load_exported(f"{directory}/export", params)
    deployed = nnx.merge(
        graphdef, exported, nnx.state(Net(nnx.Rngs(0, dropout=1)), nnx.Not(nnx.Param))
    )
    np.savez(f"{directory}/resumed.npz", *leaves(state), inference=infer(deployed))
