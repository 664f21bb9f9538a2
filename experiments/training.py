"""One training run of the study: data, model, optimizer, the epoch loop, and ``run``.

One run keeps every requested average at once (``ema_jax.ema`` with a tuple of decays), so
"raw" and each EMA variant see the same data order, dropout masks and initialisation: their
differences are paired by construction. Loss: MSE of the normalised RUL (``RUL / max_rul``);
reported RMSEs are in cycles. :func:`run` trains, applies the selection rules of
:mod:`experiments.selection`, reads the test split once and, when asked, probes flatness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ema_jax
from experiments import cmapss, selection
from experiments.config import Config
from experiments.flatness import perturbed_losses
from experiments.history import epoch_row, history_rows, summary, variant_weights
from experiments.models import make_model

Callback = Callable[[int, dict[str, Any], ema_jax.EmaTrainState], None]
"""What ``ema_jax.train_with_ema`` calls after each epoch: ``(epoch, record, state)``."""


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches of ``(x, y)``: shuffled full batches when ``rng`` is given (the last
    partial batch is dropped, so the jitted step compiles once), else every sample in
    order."""
    if rng is None:
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW (``weight_decay`` decoupled; 0 gives Adam), constant learning rate or, with
    ``cosine``, ``lr·½(1 + cos(π·t/T))`` over the ``T = epochs·steps_per_epoch`` steps, or,
    with ``lr_drop_epoch = E > 0``, ``lr`` for the first E epochs and ``lr·lr_drop_factor``
    after (Li et al. 2018: 10⁻³ for 200 epochs, then 10⁻⁴)."""
    lr: float | optax.Schedule = cfg.lr
    if cfg.lr_drop_epoch:
        boundary = cfg.lr_drop_epoch * steps_per_epoch
        lr = optax.piecewise_constant_schedule(cfg.lr, {boundary: cfg.lr_drop_factor})
    elif cfg.cosine:
        lr = optax.cosine_decay_schedule(cfg.lr, max(1, cfg.epochs * steps_per_epoch))
    return optax.adamw(lr, weight_decay=cfg.weight_decay)


class Keys(NamedTuple):
    """A run's random streams, split from ``jax.random.key(seed)`` in this order."""

    init: jax.Array
    dropout: jax.Array
    probe: jax.Array  # the flatness probe's weight noise


def run_keys(seed: int) -> Keys:
    return Keys(*jax.random.split(jax.random.key(seed), 3))


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean((a - b) ** 2)


@dataclass(frozen=True, eq=False)
class Scoring:
    """The functions of one run's model. It predicts the normalised RUL ``RUL / max_rul``;
    losses are MSEs of that, reported RMSEs are in cycles.

    ``eq=False`` hashes it by identity, so a bound method is a stable static argument of a
    jitted function (:func:`perturbed_losses` compiles once per run).
    """

    model: nn.Module
    max_rul: float

    def _normalised(self, params: Any, x: jax.Array, **apply: Any) -> jax.Array:
        return cast(jax.Array, self.model.apply({"params": params}, x, **apply))

    def train_loss(self, params: Any, batch: Any, rng: jax.Array) -> jax.Array:
        """The training loss, dropout on. An ensemble predicts ``[members, B]`` in
        training, so this is then the mean of the members' own losses."""
        x, y = batch
        pred = self._normalised(params, x, train=True, rngs={"dropout": rng})
        return _mse(pred, y / self.max_rul)

    def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        """The loss without dropout (the flatness probe's)."""
        return _mse(self._normalised(params, x), y / self.max_rul)

    def metrics(self, params: Any, batch: Any) -> dict[str, jax.Array]:
        """Validation metrics of one batch: ``loss`` and ``mse`` (in cycles²)."""
        x, y = batch
        pred = self._normalised(params, x)
        return {"loss": _mse(pred, y / self.max_rul), "mse": _mse(pred * self.max_rul, y)}

    def predict(self, params: Any, x: jax.Array) -> jax.Array:
        """The RUL in cycles."""
        return self._normalised(params, x) * self.max_rul


def build(cfg: Config, ds: Any, key: jax.Array) -> tuple[Scoring, ema_jax.EmaTrainState]:
    """The model of ``cfg`` initialised from ``key``, its :class:`Scoring`, and the train
    state: :func:`optimizer` and one average per decay of ``cfg``, all in one state (or
    BEMA, with ``cfg.bema``)."""
    model = make_model(cfg.model, members=cfg.members)
    params = model.init(key, jnp.asarray(ds.x_train[:1]))["params"]
    state = ema_jax.EmaTrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optimizer(cfg, steps_per_epoch=len(ds.x_train) // cfg.batch_size),
        ema=(
            ema_jax.bema(start_step=cfg.bema_start_step)
            if cfg.bema
            else ema_jax.ema(cfg.ema_decays, debias=cfg.ema_debias)
        ),
    )
    return Scoring(model, float(ds.max_rul)), state


def load_data(cfg: Config) -> Any:
    """The dataset of ``cfg``: the seeded engine-level validation split (20% of the training
    engines), or every training engine with ``refit_all``; preprocessed as
    ``cfg.preprocessing()`` says."""
    split = {"val_fraction": 0.0} if cfg.refit_all else {}
    return cmapss.load(
        data_dir=cfg.data_dir, subset=cfg.subset, seed=cfg.seed, **split, **cfg.preprocessing()
    )


def data_problem(cfg: Config, ds: Any) -> str | None:
    """Why ``ds`` (:func:`load_data` of ``cfg``) cannot train ``cfg``, as an argparse
    message naming the flag to change; ``None`` when it can. Checked before training: no
    full batch of ``--batch-size`` windows (so no train step), or no validation window."""
    windows = len(ds.x_train)
    made_by = f" that --window {cfg.window} leaves" if cfg.window != 30 else ""
    if windows == 0:
        return f"argument --window: {cfg.window} cycles leave no training window"
    if cfg.batch_size > windows:
        return (
            f"argument --batch-size: {cfg.batch_size} is more than the {windows} training "
            f"windows{made_by}, so an epoch would have no full batch: use --batch-size <= "
            f"{windows}" + (" or a shorter --window" if made_by else "")
        )
    if len(monitor_windows(cfg, ds)[0]) == 0:
        return f"argument --window: {cfg.window} cycles leave no validation window"
    return None


def monitor_windows(cfg: Config, ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """The windows of the per-epoch validation columns and of the flatness probe: the
    validation engines', or, with ``refit_all`` (none left), every 8th training window."""
    if cfg.refit_all:
        return ds.x_train[::8], ds.y_train[::8]
    return ds.x_val, ds.y_val


def show_progress(bar: Any, variants: Sequence[str]) -> Callback:
    """A ``train_with_ema`` callback: per epoch, :func:`summary` in the tqdm ``bar`` and a
    line above it."""

    def show(epoch: int, record: dict[str, Any], state: ema_jax.EmaTrainState) -> None:
        row = epoch_row(epoch, record, variants)
        text = summary(row, variants)
        bar.set_postfix_str(text)
        bar.update(1)
        bar.write(f"epoch {row['epoch']:3d}  {text}  ({row['seconds']:.1f}s)")

    return show


def _each(callbacks: Sequence[Callback]) -> Callback:
    def call(epoch: int, record: dict[str, Any], state: ema_jax.EmaTrainState) -> None:
        for callback in callbacks:
            callback(epoch, record, state)

    return call


def train(
    cfg: Config, ds: Any, scoring: Scoring, state: ema_jax.EmaTrainState, key: jax.Array
) -> tuple[
    dict[str, list[Any]], ema_jax.EmaTrainState, dict[str, selection.Choice], dict[str, Any]
]:
    """``cfg.epochs`` epochs of ``ema_jax.train_with_ema`` (dropout from ``key``; the data
    reshuffled every epoch by ``cfg.seed``), validated on :func:`monitor_windows`; fewer
    with ``cfg.early_stopping``, once every monitor's stopper has stopped.

    Returns the loop's ``history`` and final state, the ``best`` rule's choices
    (:class:`KeepBest`; none with ``refit_all``: nothing is selected without validation),
    and ``{monitor: (its ema_jax.monitors type, EarlyStoppingState)}``, keyed by the
    ``--monitor`` strings (empty without ``cfg.early_stopping``).
    """
    from tqdm.auto import tqdm  # an experiment extra: imported where used (experiments.extras)

    rng = np.random.default_rng(cfg.seed)
    keep_best = selection.KeepBest(cfg.variants)
    callbacks: list[Callback] = [] if cfg.refit_all else [keep_best]
    desc = f"{cfg.model} seed {cfg.seed}"
    with tqdm(total=cfg.epochs, desc=desc, disable=not cfg.progress) as bar:
        if cfg.progress:
            callbacks.append(show_progress(bar, cfg.variants))
        stopper = None
        if cfg.early_stopping is not None:
            stopper = ema_jax.EarlyStopping(patience=cfg.early_stopping)
        watched = {name: ema_jax.monitors.parse(name) for name in cfg.monitors}
        result = ema_jax.train_with_ema(
            state,
            scoring.train_loss,
            lambda epoch: batches(ds.x_train, ds.y_train, cfg.batch_size, rng),
            list(batches(*monitor_windows(cfg, ds), 4096, None)),
            epochs=cfg.epochs,
            metric_fn=scoring.metrics,
            rng=key,
            callback=_each(callbacks),
            early_stopping=stopper,
            monitor=tuple(watched.values()),
            switch_every=cfg.switch_every if cfg.switch_ema else None,
        )
    stopping = {
        name: (monitor, result.stopping[monitor])
        for name, monitor in watched.items()
        if monitor in result.stopping
    }
    return result.history, result.state, keep_best.best, stopping


def probe(
    cfg: Config, ds: Any, scoring: Scoring, weights: Mapping[str, Any], key: jax.Array
) -> dict[str, dict[str, float]]:
    """``{variant: {size: increase}}``: the flatness probe (:func:`perturbed_losses`) of
    each variant's ``weights`` on :func:`monitor_windows`, the same noise for all."""
    data = tuple(jnp.asarray(a) for a in monitor_windows(cfg, ds))
    return {
        name: perturbed_losses(scoring.loss, params, cfg.perturb, key, cfg.perturb_draws, data)
        for name, params in weights.items()
    }


def run(cfg: Config, ds: Any) -> tuple[dict[str, Any], ema_jax.EmaTrainState]:
    """Train ``cfg`` on the dataset ``ds`` (an ``experiments.cmapss`` dataset).

    Returns ``(result, state)``: ``result`` has ``config``, ``rows`` (one dict per epoch),
    ``test`` (:func:`evaluate` of both rules, and of rule ``early``, keyed by monitor, with
    ``cfg.early_stopping``), ``early_stopping`` (:func:`early_choices`' record, when on),
    ``perturb`` (:func:`probe` of the final weights, when asked) and ``epoch_seconds``
    (median epoch after the first, which includes compilation).
    """
    keys = run_keys(cfg.seed)
    scoring, state = build(cfg, ds, keys.init)
    history, state, best, stopping = train(cfg, ds, scoring, state, keys.dropout)
    rows = history_rows(history, cfg.variants)
    final = dict(zip(cfg.variants, variant_weights(state), strict=True))
    last = {
        n: selection.Choice(final[n], len(rows), rows[-1][f"val_rmse_{n}"]) for n in cfg.variants
    }
    choices = {"last": last, "best": last if cfg.refit_all else best}
    result: dict[str, Any] = {"config": asdict(cfg), "rows": rows}
    if stopping:
        choices["early"], result["early_stopping"] = selection.early_choices(
            cfg, history, rows, stopping
        )
    result["test"] = selection.evaluate(scoring, ds, choices)
    if cfg.perturb:
        result["perturb"] = probe(cfg, ds, scoring, final, keys.probe)
    result["epoch_seconds"] = float(np.median([r["seconds"] for r in rows[1:]] or [0.0]))
    return result, state


__all__ = [
    "Callback",
    "Keys",
    "Scoring",
    "batches",
    "build",
    "data_problem",
    "load_data",
    "monitor_windows",
    "optimizer",
    "probe",
    "run",
    "run_keys",
    "show_progress",
    "train",
]
