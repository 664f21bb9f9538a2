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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ema_jax
from experiments.models import MODELS, make_model


@dataclass(frozen=True)
class Config:
    """One training run. ``ema_decays[i]`` is debiased iff ``ema_debias[i]``."""

    data_dir: str | None = None
    subset: str = "FD001"
    model: str = "cnn_attn"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    cosine: bool = False
    lr_drop_epoch: int = 0  # > 0: lr × lr_drop_factor from this epoch on (Li et al.: 200)
    lr_drop_factor: float = 0.1
    ema_decays: tuple[float, ...] = (0.999,)
    ema_debias: tuple[bool, ...] = (False,)
    seed: int = 0
    refit_all: bool = False  # train on every training engine; no validation split
    window: int = 30  # cycles per input window (experiments.cmapss.prepare)
    max_rul: float = 125.0  # RUL cap of the piecewise-linear target
    smooth: float = 0.0  # causal exponential smoothing of the sensors (0: none)
    members: int = 1  # > 1: a deep ensemble of that many copies of `model`
    min_prefix: int = 0  # > 0: also train on padded windows of the first cycles (cmapss.prepare)
    cycle_feature: bool = False  # the cycle count as an input feature (cmapss.prepare)
    perturb: tuple[float, ...] = field(default=())  # relative sizes for the flatness probe
    perturb_draws: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        for name in ("epochs", "batch_size", "members"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        from experiments import cmapss

        cmapss.check_preprocessing(
            window=self.window, max_rul=self.max_rul, smooth=self.smooth, min_prefix=self.min_prefix
        )
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite float > 0, got {self.lr!r}")
        if not (self.weight_decay >= 0 and np.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay!r}")
        if isinstance(self.lr_drop_epoch, bool) or not isinstance(self.lr_drop_epoch, int):
            raise ValueError(f"lr_drop_epoch must be an int >= 0, got {self.lr_drop_epoch!r}")
        if self.lr_drop_epoch < 0:
            raise ValueError(f"lr_drop_epoch must be an int >= 0, got {self.lr_drop_epoch!r}")
        if self.lr_drop_epoch and self.cosine:
            raise ValueError("lr_drop_epoch and cosine are exclusive schedules: pick one")
        if not 0.0 < self.lr_drop_factor <= 1.0:
            raise ValueError(f"lr_drop_factor must lie in (0, 1], got {self.lr_drop_factor!r}")
        if not self.ema_decays:
            raise ValueError("ema_decays must hold at least one decay in [0, 1)")
        for d in self.ema_decays:
            if not 0.0 <= d < 1.0:
                raise ValueError(f"ema_decays must lie in [0, 1), got {d!r}")
        if len(self.ema_debias) != len(self.ema_decays):
            raise ValueError(
                f"ema_debias needs one bool per decay ({len(self.ema_decays)}), "
                f"got {len(self.ema_debias)}"
            )
        for r in self.perturb:
            if not r > 0:
                raise ValueError(f"perturb sizes must be > 0, got {r!r}")

    @property
    def variants(self) -> list[str]:
        """``["raw", "ema0.999", "ema0.999-debiased", ...]`` in the order of the decays."""
        return ["raw"] + [
            variant_name(d, b) for d, b in zip(self.ema_decays, self.ema_debias, strict=True)
        ]


def variant_name(decay: float, debias: bool) -> str:
    return f"ema{decay:g}" + ("-debiased" if debias else "")


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
    from tqdm.auto import tqdm

    from experiments import cmapss

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


def preprocessing(cfg: Config) -> dict[str, Any]:
    """The keyword arguments of :func:`experiments.cmapss.prepare` that ``cfg`` sets."""
    return {
        "window": cfg.window,
        "max_rul": cfg.max_rul,
        "smooth": cfg.smooth,
        "min_prefix": cfg.min_prefix,
        "cycle_feature": cfg.cycle_feature,
    }


def load_data(cfg: Config) -> Any:
    """The dataset of ``cfg``: the seeded engine-level validation split (20% of the training
    engines), or every training engine with ``refit_all``; preprocessed as
    :func:`preprocessing` says."""
    from experiments import cmapss

    split = {"val_fraction": 0.0} if cfg.refit_all else {}
    return cmapss.load(
        data_dir=cfg.data_dir, subset=cfg.subset, seed=cfg.seed, **split, **preprocessing(cfg)
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.train_rul",
        description="Train a RUL model on C-MAPSS with EMAs of its weights; "
        "report raw and EMA validation/test metrics.",
    )
    p.add_argument(
        "--data-dir", default=None, help="directory with NASA's C-MAPSS files (default: synthetic)"
    )
    p.add_argument("--subset", default="FD001", help="FD001..FD004 (default FD001)")
    p.add_argument("--model", default="cnn_attn", choices=sorted(MODELS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam(W) learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--cosine", action="store_true", help="cosine learning-rate decay to 0")
    p.add_argument(
        "--lr-drop-epoch",
        type=int,
        default=0,
        help="multiply the learning rate by --lr-drop-factor from this epoch on (0: never; "
        "Li et al. 2018 used 200 of 250)",
    )
    p.add_argument("--lr-drop-factor", type=float, default=0.1)
    p.add_argument(
        "--ema-decay",
        type=float,
        nargs="+",
        default=[0.999],
        help="one or more decays β in [0, 1), all kept in the same run",
    )
    p.add_argument(
        "--ema-debias", action="store_true", help="bias-corrected averages (default plain)"
    )
    p.add_argument("--seed", type=int, default=0)
    add_data_options(p)
    p.add_argument(
        "--refit-all",
        action="store_true",
        help="train on ALL training engines (no validation split) for --epochs, a choice made "
        "beforehand on validation; per-epoch columns then monitor training windows and the "
        "'best' rule is the last epoch",
    )
    p.add_argument(
        "--perturb",
        type=float,
        nargs="*",
        default=[],
        help="relative weight-noise sizes for the flatness probe (e.g. 0.01 0.02 0.05)",
    )
    p.add_argument("--out", default="runs/train_rul", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / epoch lines")
    return p.parse_args(argv)


def _arg_type(
    convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str
) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert(text)``, rejected unless ``ok``; the error says
    what was ``expected``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


_int_at_least_1 = _arg_type(int, lambda v: v >= 1, "an integer >= 1")
_positive_float = _arg_type(float, lambda v: bool(np.isfinite(v)) and v > 0, "a finite number > 0")
_int_at_least_0 = _arg_type(int, lambda v: v >= 0, "an integer >= 0")
_smoothing = _arg_type(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def add_data_options(p: argparse.ArgumentParser) -> None:
    """The preprocessing and ensemble options ``train_rul`` and ``sweep`` share."""
    p.add_argument(
        "--window", type=_int_at_least_1, default=30, help="cycles per input window (default 30)"
    )
    p.add_argument(
        "--max-rul",
        type=_positive_float,
        default=125.0,
        help="cap of the piecewise-linear RUL target, also applied to the test labels "
        "(default 125)",
    )
    p.add_argument(
        "--smooth",
        type=_smoothing,
        default=0.0,
        help="causal exponential smoothing of each engine's scaled sensors, "
        "s_t = a*s_(t-1) + (1-a)*x_t with a = SMOOTH in [0, 1) (default 0: none)",
    )
    p.add_argument(
        "--min-prefix",
        type=_int_at_least_0,
        default=0,
        help="also train on the front-padded windows that end at cycles MIN_PREFIX .. WINDOW-1 "
        "of each training engine, as short test engines are padded (default 0: none)",
    )
    p.add_argument(
        "--cycle-feature",
        action="store_true",
        help="add each row's cycle count (min-max scaled on the training engines) as a feature",
    )
    p.add_argument(
        "--members",
        type=_int_at_least_1,
        default=1,
        help="train a deep ensemble of this many independently initialised copies of the "
        "model in one run and predict their mean (default 1: a single model)",
    )


def config_from_args(args: argparse.Namespace, **run_options: Any) -> Config:
    """A :class:`Config` from the data/optimisation options ``train_rul`` and ``sweep`` share
    (same flag names in both CLIs), plus the per-run ``run_options`` (model, decays, seed)."""
    return Config(
        data_dir=args.data_dir,
        subset=args.subset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        cosine=args.cosine,
        lr_drop_epoch=args.lr_drop_epoch,
        lr_drop_factor=args.lr_drop_factor,
        refit_all=args.refit_all,
        window=args.window,
        max_rul=args.max_rul,
        smooth=args.smooth,
        members=args.members,
        min_prefix=args.min_prefix,
        cycle_feature=args.cycle_feature,
        perturb=tuple(args.perturb),
        **run_options,
    )


def cli_config(args: argparse.Namespace, **overrides: Any) -> Config:
    """The :class:`Config` of ``train_rul``'s command line (``overrides`` win)."""
    options: dict[str, Any] = {
        "model": args.model,
        "ema_decays": tuple(args.ema_decay),
        "ema_debias": (args.ema_debias,) * len(args.ema_decay),
        "seed": args.seed,
        "progress": not args.no_progress,
    }
    return config_from_args(args, **{**options, **overrides})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:

    args = parse_args(argv)
    cfg = cli_config(args)
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
    print(
        f"\n{'weights':<22} {'rule':<5} {'epoch':>5} {'val RMSE':>9} {'test RMSE':>10} {'PHM08':>9}"
    )
    for rule in ("last", "best"):
        for name, m in result["test"][rule].items():
            print(
                f"{name:<22} {rule:<5} {m['epoch']:>5d} {m['val_rmse']:>9.2f} "
                f"{m['rmse']:>10.2f} {m['score']:>9.1f}"
            )
    print(f"\nwrote {out}/history.json, history.csv, curves.png, ema_params/")
    return result


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
