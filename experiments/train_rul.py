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
  on the host when they improve).

The test split is read once, after training, for both rules and every variant.

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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import ema_jax
from experiments import cmapss
from experiments.cli import ConfigFlags
from experiments.config import Config
from experiments.models import make_model

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


def run(cfg: Config, ds: Any) -> tuple[dict[str, Any], ema_jax.EmaTrainState]:
    """Train ``cfg`` on the dataset ``ds`` (an ``experiments.cmapss`` dataset).

    Returns ``(result, state)``: ``result`` has ``rows`` (one dict per epoch), ``test``
    (``{rule: {variant: {"rmse", "score", "val_rmse", "epoch"}}}``), ``perturb``
    (``{variant: {size: increase}}``, when asked) and ``epoch_seconds``.
    """
    max_rul = float(ds.max_rul)
    model = make_model(cfg.model, members=cfg.members)
    key = jax.random.key(cfg.seed)
    init_key, dropout_key, probe_key = jax.random.split(key, 3)
    params = model.init(init_key, jnp.asarray(ds.x_train[:1]))["params"]
    state = ema_jax.EmaTrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optimizer(cfg, steps_per_epoch=len(ds.x_train) // cfg.batch_size),
        ema=ema_jax.ema(tuple(cfg.ema_decays), debias=tuple(cfg.ema_debias)),
    )

    def loss_fn(params: Any, batch: Any, rng: jax.Array) -> jax.Array:
        x, y = batch
        # [B], or [members, B] for an ensemble: then the mean of the members' own losses
        pred = model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
        return jnp.mean((pred - y / max_rul) ** 2)

    def metric_fn(params: Any, batch: Any) -> dict[str, jax.Array]:
        x, y = batch
        pred = cast(jax.Array, model.apply({"params": params}, x))
        return {
            "loss": jnp.mean((pred - y / max_rul) ** 2),
            "mse": jnp.mean((pred * max_rul - y) ** 2),
        }

    if cfg.refit_all:  # no validation engines: monitor every 8th training window
        val = list(batches(ds.x_train[::8], ds.y_train[::8], 4096, None))
    else:
        val = list(batches(ds.x_val, ds.y_val, 4096, None))
    variants = cfg.variants
    best: dict[str, tuple[float, int, Any]] = {}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=cfg.epochs, desc=f"{cfg.model} seed {cfg.seed}", disable=not cfg.progress)
    clock = [time.perf_counter()]

    def callback(epoch: int, record: dict[str, Any], state: ema_jax.EmaTrainState) -> None:
        now = time.perf_counter()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "seconds": now - clock[0],
            "train_loss": record["train_loss"],
        }
        clock[0] = now
        losses = [record["val_loss"], *record["val_loss_ema"]]
        mses = [record["val_mse"], *record["val_mse_ema"]]
        candidates = [state.params, *state.ema_params]
        for name, loss, mse, params in zip(variants, losses, mses, candidates, strict=True):
            rmse = float(np.sqrt(mse))
            row[f"val_loss_{name}"] = loss
            row[f"val_rmse_{name}"] = rmse
            if cfg.refit_all:  # no selection: "best" is the final epoch
                if epoch + 1 == cfg.epochs:
                    best[name] = (rmse, epoch + 1, jax.device_get(params))
            elif name not in best or rmse < best[name][0]:
                best[name] = (rmse, epoch + 1, jax.device_get(params))
        rows.append(row)
        first = variants[1]
        summary = (
            f"train {row['train_loss']:.4f}  val RMSE raw {row['val_rmse_raw']:.2f}  "
            f"{first} {row[f'val_rmse_{first}']:.2f}"
        )
        bar.set_postfix_str(summary)
        bar.update(1)
        if cfg.progress:
            bar.write(f"epoch {epoch + 1:3d}  {summary}  ({row['seconds']:.1f}s)")

    rng = np.random.default_rng(cfg.seed)
    history, state = ema_jax.train_with_ema(
        state,
        loss_fn,
        lambda epoch: batches(ds.x_train, ds.y_train, cfg.batch_size, rng),
        val,
        epochs=cfg.epochs,
        metric_fn=metric_fn,
        rng=dropout_key,
        callback=callback,
    )
    bar.close()

    predict = jax.jit(lambda p, x: cast(jax.Array, model.apply({"params": p}, x)) * max_rul)
    last = dict(zip(variants, [state.params, *state.ema_params], strict=True))
    x_test, y_test = jnp.asarray(ds.x_test), np.asarray(ds.y_test)
    test: dict[str, dict[str, Any]] = {"last": {}, "best": {}}
    for name in variants:
        for rule, params, epoch, val_rmse in (
            ("last", last[name], cfg.epochs, rows[-1][f"val_rmse_{name}"]),
            ("best", best[name][2], best[name][1], best[name][0]),
        ):
            pred = np.asarray(predict(params, x_test))
            test[rule][name] = {
                "rmse": cmapss.rmse(pred, y_test),
                "score": cmapss.phm08_score(pred, y_test),
                "val_rmse": float(val_rmse),
                "epoch": int(epoch),
            }

    result: dict[str, Any] = {"config": asdict(cfg), "rows": rows, "test": test}
    if cfg.perturb:
        x_probe, y_probe = (
            (ds.x_train[::8], ds.y_train[::8]) if cfg.refit_all else (ds.x_val, ds.y_val)
        )
        data = (jnp.asarray(x_probe), jnp.asarray(y_probe))

        def val_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
            pred = cast(jax.Array, model.apply({"params": params}, x))
            return jnp.mean((pred - y / max_rul) ** 2)

        result["perturb"] = {
            name: perturbed_losses(
                val_loss, last[name], cfg.perturb, probe_key, cfg.perturb_draws, data
            )
            for name in variants
        }
    # epoch 1 includes compilation; the rest is the steady-state cost
    result["epoch_seconds"] = float(np.median([r["seconds"] for r in rows[1:]] or [0.0]))
    del history
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, cfg = FLAGS.parse(parser(), argv)
    ds = load_data(cfg)
    print(
        f"data: {cfg.data_dir or 'synthetic default'} {cfg.subset}  train {len(ds.x_train)}  "
        f"val {len(ds.x_val)}  test {len(ds.x_test)} windows, {len(ds.features)} features"
    )
    result, state = run(cfg, ds)
    out = Path(args.out)
    write_history(result, out)
    plot_curves(result, out / "curves.png")
    export_ema(state, cfg.variants, out / "ema_params")
    print("\n" + results_table(result["test"]))
    print(f"\nwrote {out}/history.json, history.csv, curves.png, ema_params/")
    return result


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
