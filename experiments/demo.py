"""Small demo: a Flax MLP on a noisy synthetic regression, raw vs EMA validation loss."""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ema_jax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(1)(x)[..., 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    w = rng.normal(size=8)
    x = rng.normal(size=(4096, 8)).astype(np.float32)
    y = (np.sin(x @ w) + 0.3 * rng.normal(size=4096)).astype(np.float32)
    train = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 3072, 64)]
    val = [(x[3072:], np.sin(x[3072:] @ w).astype(np.float32))]

    model = MLP()
    params = model.init(jax.random.key(args.seed), x[:1])["params"]
    state = ema_jax.EmaTrainState.create(
        apply_fn=model.apply, params=params, tx=optax.sgd(0.1), ema=ema_jax.ema(args.ema_decay)
    )

    def loss_fn(params, batch):
        return jnp.mean((model.apply({"params": params}, batch[0]) - batch[1]) ** 2)

    def show(epoch, record, state):
        print(
            f"epoch {epoch + 1:2d}  train {record['train_loss']:.4f}  "
            f"val raw {record['val_loss']:.4f}  val EMA {record['val_loss_ema']:.4f}"
        )

    ema_jax.train_with_ema(state, loss_fn, train, val, epochs=args.epochs, callback=show)


if __name__ == "__main__":
    main()
