"""Train a RUL model on C-MAPSS with EMAs of its weights; evaluate raw and EMA weights.

    python -m experiments.train_rul --out runs/demo                       # synthetic default
    python -m experiments.train_rul --data-dir ../shared/data/cmapss --out runs/fd001

One training run keeps every requested average at once (``ema_jax.ema`` with a tuple of
decays), so "raw" and each EMA variant see the same data order, dropout masks and
initialisation: their differences are paired by construction.

Loss: MSE of the normalised RUL (``RUL / max_rul``); reported RMSE is in cycles.

Model selection uses validation only, with two documented rules, both reported:

* ``last``: the weights at the end of training (no selection; the deployment the seed
  describes: train N epochs, ship the EMA weights);
* ``best``: per variant, the epoch with the lowest validation RMSE (its weights are kept
  on the host when they improve);
* ``early`` (with ``--early-stopping PATIENCE``): per ``--monitor``, the best weights of an
  ``ema_jax.EarlyStopping`` on that value; the run ends once every monitor has stopped
  (training uses the raw params only, so one run carries them all, paired).

The test split is read once, after training, for every rule and variant.

``--refit-all`` is the second stage of the usual protocol: choose the model, epoch count
and EMA variant on the validation split, then retrain that choice on *all* training
engines (no validation engines left) for that many epochs and deploy the final weights.
Nothing is selected in such a run: the per-epoch "validation" columns then monitor a
fixed subsample of the training windows (dropout off), and the ``best`` rule is the
final epoch, identical to ``last``.

Outputs in ``--out``: ``history.json`` (config, per-epoch rows, final results),
``history.csv`` (per-epoch rows), ``curves.png`` (raw vs EMA), ``ema_params/`` (the EMA
weights, Orbax).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import ema_jax
from experiments import cmapss
from experiments.cli import ConfigFlags
from experiments.config import Config, variant_name
from experiments.models import make_model

Callback = Callable[[int, dict[str, Any], ema_jax.EmaTrainState], None]
"""What ``ema_jax.train_with_ema`` calls after each epoch: ``(epoch, record, state)``."""

FLAGS = ConfigFlags()
"""``train_rul`` sets every :class:`Config` field from its command line."""


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


@functools.partial(jax.jit, static_argnames="loss")
def _perturbed_increase(
    loss: Callable[..., jax.Array], params: Any, data: Any, key: jax.Array, r: jax.Array
) -> jax.Array:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noise = [
        r * jnp.sqrt(jnp.mean(p**2)) * jax.random.normal(k, p.shape, p.dtype)
        for p, k in zip(leaves, keys, strict=True)
    ]
    plus = jax.tree.unflatten(treedef, [p + e for p, e in zip(leaves, noise, strict=True)])
    minus = jax.tree.unflatten(treedef, [p - e for p, e in zip(leaves, noise, strict=True)])
    return 0.5 * (loss(plus, *data) + loss(minus, *data)) - loss(params, *data)


def perturbed_losses(
    loss: Callable[..., jax.Array],
    params: Any,
    sizes: Sequence[float],
    key: jax.Array,
    draws: int,
    data: tuple[Any, ...] = (),
) -> dict[str, float]:
    """Mean increase of ``loss(params, *data)`` under Gaussian weight noise, per size ``r``.

    For each leaf ``θ_l``, ``ε_l ~ N(0, (r·rms(θ_l))²)`` i.i.d.; each of the ``draws`` draws is
    used antithetically, ``½(L(θ + ε) + L(θ − ε)) − L(θ)``, which cancels the first-order
    term (exactly ``½εᵀHε`` for a quadratic loss). Returns ``{f"{r:g}": mean increase}``;
    flatter minima give smaller increases at the same relative size. ``loss`` is a static
    argument of one jitted function: pass the same function object to reuse the compilation.
    """
    out = {}
    for r in sizes:
        values = [
            _perturbed_increase(loss, params, data, jax.random.fold_in(key, k), jnp.float32(r))
            for k in range(draws)
        ]
        out[f"{r:g}"] = float(np.mean(jax.device_get(values)))
    return out


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
    state: :func:`optimizer` and one average per decay of ``cfg``, all in one state."""
    model = make_model(cfg.model, members=cfg.members)
    params = model.init(key, jnp.asarray(ds.x_train[:1]))["params"]
    state = ema_jax.EmaTrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optimizer(cfg, steps_per_epoch=len(ds.x_train) // cfg.batch_size),
        ema=ema_jax.ema(cfg.ema_decays, debias=cfg.ema_debias),
    )
    return Scoring(model, float(ds.max_rul)), state


def monitor_windows(cfg: Config, ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """The windows of the per-epoch validation columns and of the flatness probe: the
    validation engines', or, with ``refit_all`` (none left), every 8th training window."""
    if cfg.refit_all:
        return ds.x_train[::8], ds.y_train[::8]
    return ds.x_val, ds.y_val


def variant_weights(state: ema_jax.EmaTrainState) -> list[Any]:
    """The raw weights, then each average, in the order of ``Config.variants``."""
    return [state.params, *state.ema_params]


def epoch_row(epoch: int, record: Mapping[str, Any], variants: Sequence[str]) -> dict[str, Any]:
    """One row of ``history.csv`` from one epoch's record of ``train_with_ema``: ``epoch``
    (from 1), ``seconds``, ``train_loss``, then per variant ``val_loss_<variant>`` and
    ``val_rmse_<variant>`` (cycles)."""
    row = {"epoch": epoch + 1, "seconds": record["seconds"], "train_loss": record["train_loss"]}
    losses = [record["val_loss"], *record["val_loss_ema"]]
    mses = [record["val_mse"], *record["val_mse_ema"]]
    for name, loss, mse in zip(variants, losses, mses, strict=True):
        row[f"val_loss_{name}"] = loss
        row[f"val_rmse_{name}"] = float(np.sqrt(mse))
    return row


def history_rows(history: Mapping[str, list[Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """:func:`epoch_row` of every epoch of the ``history`` that ``train_with_ema`` returns."""
    epochs = len(history["train_loss"])
    return [epoch_row(e, {k: v[e] for k, v in history.items()}, variants) for e in range(epochs)]


@dataclass(frozen=True)
class Choice:
    """The weights a selection rule deploys for one variant, and the epoch and validation
    RMSE it chose them at."""

    params: Any
    epoch: int
    val_rmse: float


class KeepBest:
    """A ``train_with_ema`` callback (the loop's extension point) for the ``best`` rule:
    per variant, the epoch with the lowest validation RMSE so far, as a :class:`Choice`
    in :attr:`best`. The weights are copied to the host: the train step donates the state,
    so its arrays do not outlive the next step."""

    def __init__(self, variants: Sequence[str]) -> None:
        self.variants = list(variants)
        self.best: dict[str, Choice] = {}

    def __call__(self, epoch: int, record: dict[str, Any], state: ema_jax.EmaTrainState) -> None:
        row = epoch_row(epoch, record, self.variants)
        for name, params in zip(self.variants, variant_weights(state), strict=True):
            rmse = row[f"val_rmse_{name}"]
            if name not in self.best or rmse < self.best[name].val_rmse:
                self.best[name] = Choice(jax.device_get(params), epoch + 1, rmse)


def summary(row: Mapping[str, Any], variants: Sequence[str]) -> str:
    """``train 0.0123  val RMSE raw 14.21  ema0.99 13.90  ...``: every variant, not only
    the first average (issue #19)."""
    rmses = "  ".join(f"{name} {row[f'val_rmse_{name}']:.2f}" for name in variants)
    return f"train {row['train_loss']:.4f}  val RMSE {rmses}"


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
) -> tuple[dict[str, list[Any]], ema_jax.EmaTrainState, dict[str, Choice], dict[str, Any]]:
    """``cfg.epochs`` epochs of ``ema_jax.train_with_ema`` (dropout from ``key``; the data
    reshuffled every epoch by ``cfg.seed``), validated on :func:`monitor_windows`; fewer
    with ``cfg.early_stopping``, once every monitor's stopper has stopped.

    Returns the loop's ``history`` and final state, the ``best`` rule's choices
    (:class:`KeepBest`; none with ``refit_all``: nothing is selected without validation),
    and ``{monitor: (its ema_jax.monitors type, EarlyStoppingState)}``, keyed by the
    ``--monitor`` strings (empty without ``cfg.early_stopping``).
    """
    rng = np.random.default_rng(cfg.seed)
    keep_best = KeepBest(cfg.variants)
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
        )
    stopping = {
        name: (monitor, result.stopping[monitor])
        for name, monitor in watched.items()
        if monitor in result.stopping
    }
    return result.history, result.state, keep_best.best, stopping


def early_choices(
    cfg: Config,
    history: Mapping[str, list[Any]],
    rows: Sequence[Mapping[str, Any]],
    stopping: Mapping[str, tuple[ema_jax.monitors.Monitor, ema_jax.EarlyStoppingState]],
) -> tuple[dict[str, Choice], dict[str, dict[str, Any]]]:
    """The ``early`` rule: per monitor, its stopper's best weights as a :class:`Choice`, and
    what ``history.json`` records of it: ``variant`` (whose weights), ``best_epoch`` and
    ``stopped_epoch`` (from 1, like the rows; ``None``: never stopped), ``epochs_trained``
    (the run's, shared by all monitors), ``best_metric``, ``patience``."""
    choices, record = {}, {}
    for name, (monitor, es) in stopping.items():
        best = es.best_epoch
        if best is None:  # every monitored value was NaN: nothing to choose
            continue
        if isinstance(monitor, ema_jax.monitors.BestAverage):
            variant = cfg.variants[1 + int(history[f"{monitor.key}_index"][best])]
        elif isinstance(monitor, ema_jax.monitors.Average):
            variant = cfg.variants[1 + monitor.index]
        else:
            variant = "raw"
        val_rmse = rows[best][f"val_rmse_{variant}"]
        choices[name] = Choice(es.best_weights, best + 1, val_rmse)
        record[name] = {
            "variant": variant,
            "best_epoch": best + 1,
            "stopped_epoch": None if es.stopped_epoch is None else es.stopped_epoch + 1,
            "epochs_trained": len(rows),
            "best_metric": es.best_metric,
            "patience": cfg.early_stopping,
        }
    return choices, record


def evaluate(
    scoring: Scoring, ds: Any, choices: Mapping[str, Mapping[str, Choice]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{rule: {variant: {"rmse", "score", "val_rmse", "epoch"}}}``: test RMSE and PHM08
    score of each rule's weights. The only reader of the test split, after training."""
    predict = jax.jit(scoring.predict)
    x_test, y_test = jnp.asarray(ds.x_test), np.asarray(ds.y_test)
    test: dict[str, dict[str, dict[str, Any]]] = {}
    for rule, chosen in choices.items():
        test[rule] = {}
        for name, choice in chosen.items():
            pred = np.asarray(predict(choice.params, x_test))
            test[rule][name] = {
                "rmse": cmapss.rmse(pred, y_test),
                "score": cmapss.phm08_score(pred, y_test),
                "val_rmse": float(choice.val_rmse),
                "epoch": int(choice.epoch),
            }
    return test


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
    last = {n: Choice(final[n], len(rows), rows[-1][f"val_rmse_{n}"]) for n in cfg.variants}
    choices = {"last": last, "best": last if cfg.refit_all else best}
    result: dict[str, Any] = {"config": asdict(cfg), "rows": rows}
    if stopping:
        choices["early"], result["early_stopping"] = early_choices(cfg, history, rows, stopping)
    result["test"] = evaluate(scoring, ds, choices)
    if cfg.perturb:
        result["perturb"] = probe(cfg, ds, scoring, final, keys.probe)
    result["epoch_seconds"] = float(np.median([r["seconds"] for r in rows[1:]] or [0.0]))
    return result, state


def write_history(result: dict[str, Any], out: Path) -> None:
    """``history.json`` (everything) and ``history.csv`` (the per-epoch rows)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(result, indent=1))
    rows = result["rows"]
    with open(out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(result: dict[str, Any], path: Path, variants: Sequence[str] | None = None) -> None:
    """Training loss and validation RMSE per epoch, raw vs each EMA variant (or only
    ``variants``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    epochs = [r["epoch"] for r in rows]
    if variants is None:
        variants = ["raw"] + [
            k[len("val_rmse_") :] for k in rows[0] if k.startswith("val_rmse_ema")
        ]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    ax0.plot(epochs, [r["train_loss"] for r in rows], color="k")
    ax0.set(xlabel="epoch", ylabel="train loss (normalised MSE)", yscale="log")
    for name in variants:
        style = {"color": "k", "lw": 1.0, "alpha": 0.6} if name == "raw" else {"lw": 1.4}
        ax1.plot(epochs, [r[f"val_rmse_{name}"] for r in rows], label=name, **style)
    ax1.set(xlabel="epoch", ylabel="validation RMSE (cycles)")
    lo = min(r[f"val_rmse_{n}"] for r in rows for n in variants)
    ax1.set_ylim(lo * 0.95, lo * 1.6)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def export_ema(state: ema_jax.EmaTrainState, variants: Sequence[str], path: Path) -> list[Path]:
    """Each EMA variant's weights, ``<path>/<variant>``, by ``ema_jax.checkpoint``.

    Standalone Orbax checkpoints of the params tree; read one back with
    ``ema_jax.checkpoint.load_exported(path / variant)``.
    """
    from ema_jax import checkpoint

    written = []
    for index, name in enumerate(variants[1:]):
        target = path / name
        checkpoint.export_ema_params(target, state, ema_index=index, force=True)
        written.append(target)
    return written


def load_data(cfg: Config) -> Any:
    """The dataset of ``cfg``: the seeded engine-level validation split (20% of the training
    engines), or every training engine with ``refit_all``; preprocessed as
    ``cfg.preprocessing()`` says."""
    split = {"val_fraction": 0.0} if cfg.refit_all else {}
    return cmapss.load(
        data_dir=cfg.data_dir, subset=cfg.subset, seed=cfg.seed, **split, **cfg.preprocessing()
    )


def parser() -> argparse.ArgumentParser:
    """``train_rul``'s command line: every :class:`Config` flag, and ``--out``."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.train_rul",
        description="Train a RUL model on C-MAPSS with EMAs of its weights; "
        "report raw and EMA validation/test metrics.",
    )
    FLAGS.add_to(p)
    p.add_argument(
        "--out", default="runs/train_rul", help="output directory (default: runs/train_rul)"
    )
    return p


def results_table(test: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The final table: per rule and variant, the epoch, validation and test RMSE, PHM08."""
    lines = [
        f"{'weights':<22} {'rule':<5} {'epoch':>5} {'val RMSE':>9} {'test RMSE':>10} {'PHM08':>9}"
    ]
    for rule, variants in test.items():
        for name, m in variants.items():
            lines.append(
                f"{name:<22} {rule:<5} {m['epoch']:>5d} {m['val_rmse']:>9.2f} "
                f"{m['rmse']:>10.2f} {m['score']:>9.1f}"
            )
    return "\n".join(lines)


def initial_weight_notes(cfg: Config, steps: int) -> list[str]:
    """A note for each plain average that, after ``steps`` updates, still gives the initial
    weights a share ``β^steps`` of more than 10 %: a run shorter than its window."""
    return [
        f"note: {variant_name(decay, False)} is a plain average (--no-ema-debias) and this run "
        f"has {steps} steps, so {decay**steps:.0%} of its weight stays on the initial weights; "
        "the debiased default has no such share"
        for decay, debias in zip(cfg.ema_decays, cfg.ema_debias, strict=True)
        if not debias and decay**steps > 0.1
    ]


def verdict(test: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """One line: under rule ``last``, the average with the lowest validation RMSE against the
    raw weights, on validation and test."""
    last = test["last"]
    raw = last["raw"]
    name = min((n for n in last if n != "raw"), key=lambda n: last[n]["val_rmse"])
    ema = last[name]
    lower = [s for s, k in (("validation", "val_rmse"), ("test", "rmse")) if ema[k] < raw[k]]
    outcome = {0: "not lower", 2: "lower on both"}.get(len(lower)) or f"lower on {lower[0]} only"
    return (
        f"final weights: {name} (the average with the lowest validation RMSE) "
        f"val {ema['val_rmse']:.2f} / test {ema['rmse']:.2f} against raw "
        f"{raw['val_rmse']:.2f} / {raw['rmse']:.2f}: the EMA is {outcome}"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, cfg = FLAGS.parse(parser(), argv)
    ds = load_data(cfg)
    print(
        f"data: {cfg.data_dir or 'synthetic default'} {cfg.subset}  train {len(ds.x_train)}  "
        f"val {len(ds.x_val)}  test {len(ds.x_test)} windows, {len(ds.features)} features"
    )
    for note in initial_weight_notes(cfg, cfg.epochs * (len(ds.x_train) // cfg.batch_size)):
        print(note)
    result, state = run(cfg, ds)
    out = Path(args.out)
    write_history(result, out)
    plot_curves(result, out / "curves.png")
    export_ema(state, cfg.variants, out / "ema_params")
    print("\n" + results_table(result["test"]))
    print("\n" + verdict(result["test"]))
    print(f"wrote {out}/history.json, history.csv, curves.png, ema_params/")
    return result


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
