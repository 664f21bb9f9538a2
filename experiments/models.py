"""Flax models for Remaining-Useful-Life regression on windows ``x: [B, T, F] -> RUL: [B]``.

All models predict the *normalised* RUL ``ŷ ≈ RUL / max_rul`` (targets in [0, 1]); the
training code multiplies by ``max_rul`` to report cycles.

Normalisation is LayerNorm, not BatchNorm (except ``cnn_gru_bn``, the model of the BatchNorm
study, ``experiments.batch_norm_study``), because this project averages weights:

* an EMA of BatchNorm's scale/shift is paired with running statistics that were collected
  under *different* (raw, earlier) weights, so the averaged network sees mis-matched
  activation statistics unless the statistics are re-estimated after averaging;
* BatchNorm makes a sample's output depend on its batch (batch size, composition) in
  training, which adds noise that has nothing to do with the weight EMA under study;
* LayerNorm normalises each window by its own statistics: no running state, identical in
  training and evaluation, so raw and EMA weights are evaluated by exactly the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.config import COUNT, MODEL, MODEL_SPECS


class DCNN(nn.Module):
    """1-D CNN over time in the spirit of Li, Ding & Sun (2018), "DCNN" for C-MAPSS.

    ``num_conv`` convolutions over the time axis (``filters`` channels, ``kernel`` taps,
    'SAME' padding, tanh, then LayerNorm over channels when ``layer_norm``), a 1-channel
    convolution (kernel 3) that fuses the feature maps, flatten, dropout, ``Dense(hidden)``
    + tanh, ``Dense(1)``; Xavier-normal kernels, zero biases. Li et al. used 4×(10 filters,
    kernel 10), a 1×3 fusion layer, dropout 0.5, 100 hidden units and no normalisation
    layer (``layer_norm=False``, registered as ``dcnn_li``); LayerNorm is our optional
    addition (see the module docstring).
    """

    filters: int = 10
    kernel: int = 10
    num_conv: int = 4
    hidden: int = 100
    dropout: float = 0.5
    layer_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        init = nn.initializers.glorot_normal()
        for _ in range(self.num_conv):
            x = nn.Conv(self.filters, (self.kernel,), padding="SAME", kernel_init=init)(x)
            x = jnp.tanh(x)
            if self.layer_norm:
                x = nn.LayerNorm()(x)
        x = jnp.tanh(nn.Conv(1, (3,), padding="SAME", kernel_init=init)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = jnp.tanh(nn.Dense(self.hidden, kernel_init=init)(x))
        return nn.Dense(1, kernel_init=init)(x)[:, 0]


class CNNAttention(nn.Module):
    """A convolutional stem, a pre-LN self-attention block, attention pooling, a dense head.

    ``h = LN(GELU(Conv_k(x)))`` twice (``width`` channels, ``kernel`` taps) plus a learned
    position embedding; one transformer block ``h += MHA(LN(h))``, ``h += MLP(LN(h))``;
    pooling ``z = Σ_t softmax_t(w·h_t)·h_t`` concatenated with the last step ``h_T``
    (the most recent cycle matters most for RUL); dropout; ``Dense(width)`` + GELU;
    ``Dense(1)``.
    """

    width: int = 32
    kernel: int = 5
    heads: int = 4
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        drop = nn.Dropout(self.dropout, deterministic=not train)
        for _ in range(2):
            x = nn.Conv(self.width, (self.kernel,), padding="SAME")(x)
            x = nn.LayerNorm()(nn.gelu(x))
        pos = self.param("pos", nn.initializers.normal(0.02), (x.shape[1], self.width))
        h = x + pos
        a = nn.MultiHeadDotProductAttention(num_heads=self.heads, deterministic=True)(
            nn.LayerNorm()(h)
        )
        h = h + drop(a)
        m = nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(h))))
        h = nn.LayerNorm()(h + drop(m))
        scores = nn.Dense(1)(h)[..., 0]
        pooled = jnp.einsum("bt,btc->bc", jax.nn.softmax(scores, axis=-1), h)
        z = drop(jnp.concatenate([pooled, h[:, -1]], axis=-1))
        z = nn.gelu(nn.Dense(self.width)(z))
        return nn.Dense(1)(z)[:, 0]


class RNN(nn.Module):
    """Stacked recurrent layers over time, a dense head on the last step's output.

    ``len(units)`` layers of ``cell`` ("gru": :class:`flax.linen.GRUCell`, "lstm":
    :class:`flax.linen.OptimizedLSTMCell`), ``units[i]`` features each, scanning the window
    from its oldest to its newest cycle; dropout after every layer; the last step's output
    (which has seen the whole window) goes through ``Dense(hidden)`` + ReLU, dropout and
    ``Dense(1)``. The usual LSTM/GRU baselines for C-MAPSS (Zheng et al. 2017: 2 LSTM layers,
    64/64 units, then dense layers) have this shape. No normalisation layer: the gates bound
    the states, and nothing in it is batch-dependent.
    """

    cell: str = "gru"
    units: tuple[int, ...] = (64, 32)
    hidden: int = 32
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cells = {"gru": nn.GRUCell, "lstm": nn.OptimizedLSTMCell}
        if self.cell not in cells:
            raise ValueError(f"cell must be one of {sorted(cells)}, got {self.cell!r}")
        drop = nn.Dropout(self.dropout, deterministic=not train)
        for features in self.units:
            x = drop(nn.RNN(cells[self.cell](features=features))(x))
        z = drop(nn.relu(nn.Dense(self.hidden)(x[:, -1])))
        return nn.Dense(1)(z)[:, 0]


class CNNGRU(nn.Module):
    """A convolutional stem (``num_conv`` × ``Conv(filters, kernel)`` + tanh, as in the DCNN)
    followed by one GRU layer over the convolved sequence and the RNN's dense head.

    ``batch_norm``: a BatchNorm after each convolution (statistics over batch and time); it
    normalises with the batch's statistics, and updates its running ones (``batch_stats``),
    when ``train`` or ``batch_stats=True`` (which leaves dropout off: BatchNorm
    recalibration)."""

    filters: int = 16
    kernel: int = 5
    num_conv: int = 2
    units: int = 64
    hidden: int = 32
    dropout: float = 0.2
    batch_norm: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, batch_stats: bool = False
    ) -> jax.Array:
        init = nn.initializers.glorot_normal()
        drop = nn.Dropout(self.dropout, deterministic=not train)
        for _ in range(self.num_conv):
            x = nn.Conv(self.filters, (self.kernel,), padding="SAME", kernel_init=init)(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not (train or batch_stats), momentum=0.99)(x)
            x = jnp.tanh(x)
        x = drop(nn.RNN(nn.GRUCell(features=self.units))(x))
        z = drop(nn.relu(nn.Dense(self.hidden)(x[:, -1])))
        return nn.Dense(1)(z)[:, 0]


class Ensemble(nn.Module):
    """``members`` independently initialised copies of the registered model ``model``.

    Evaluation returns the members' mean prediction ``[B]`` (a deep ensemble). Training
    returns every member's prediction ``[members, B]``, so the MSE loss of the training code,
    ``mean((ŷ − y)²)`` broadcast over the members, is the mean of the members' own losses:
    each member is trained as if alone (its own initialisation and dropout masks; the
    mini-batches are shared), and no member's gradient depends on another member.
    The parameters are ``{"member0": ..., "member1": ...}``; an EMA of them is the ensemble
    of the members' EMAs.
    """

    model: str = "dcnn_li"
    members: int = 5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        preds = jnp.stack(
            [MODELS[self.model](name=f"member{i}")(x, train=train) for i in range(self.members)]
        )
        return preds if train else jnp.mean(preds, axis=0)


_CLASSES: dict[str, Callable[..., nn.Module]] = {
    cls.__name__: cls for cls in (DCNN, CNNAttention, RNN, CNNGRU)
}
# The registered models, built from experiments.config.MODEL_SPECS (the JAX-free list of
# names a configuration is checked against): name -> constructor with that name's options.
MODELS: dict[str, Callable[..., nn.Module]] = {
    name: functools.partial(_CLASSES[cls], **options)
    for name, (cls, options) in MODEL_SPECS.items()
}


def make_model(name: str, members: int = 1) -> nn.Module:
    """The model registered under ``name`` (one of :data:`MODELS`), default settings; with
    ``members > 1``, an :class:`Ensemble` of that many independently initialised copies."""
    MODEL.check("model", name)
    COUNT.check("members", members)
    if members == 1:
        return MODELS[name]()
    return Ensemble(model=name, members=members)
