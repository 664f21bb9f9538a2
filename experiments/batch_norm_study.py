"""BatchNorm statistics for the EMA's weights: recalibrated vs averaged, on FD001.

    python -m experiments.batch_norm_study --data-dir ../shared/data/cmapss --runs runs/batch_norm

The chosen configuration of the study (``chosen``: experiments/README.md, "Headline"),
retrained on all training engines (refit), with ``cnn_gru_bn``: ``cnn_gru`` with a BatchNorm
after each convolution. One run per seed keeps the bias-corrected EMA β = 0.999 of the params
*and* of the BatchNorm statistics (``average_model_state=True``), so every variant below is
read off the same trajectory and their differences are paired by construction:

* ``raw``: the last params with their running statistics;
* ``ema + raw statistics``: the EMA's params with the raw weights' running statistics;
* ``ema + averaged statistics``: the EMA of the statistics (``average_model_state``);
* ``ema + recalibrated``: statistics recomputed for the EMA's params over the training
  windows (``ema_jax.batch_stats.recompute_linen_batch_stats``, torch's ``update_bn``).

``--seeds`` lists the seeds (default ``0 1 … 9``; unlike the sweep's count). Runs are stored
per seed (``<runs>/seed<k>.json``) and reused; the report,
``experiments/results/batch_norm.{md,json}``, covers the stored runs of the seeds given, and
``--report-only`` writes it without training.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from experiments import extras
from experiments.cli import ConfigFlags
from experiments.config import Config
from experiments.early_stopping import chosen
from experiments.stats import differences, fmt, mean_ci, percent_differences

VARIANTS = ("raw", "ema + raw statistics", "ema + averaged statistics", "ema + recalibrated")
RESULTS = Path(__file__).parent / "results"
PROG = "python -m experiments.batch_norm_study"
FLAGS = ConfigFlags(("data_dir",))
"""The one :class:`~experiments.config.Config` flag the study takes; it sets the others."""


def config(data_dir: str | None, epochs: int, seed: int) -> Config:
    """The chosen configuration (without its stoppers) on ``cnn_gru_bn``, refit."""
    base = chosen(data_dir, patience=0, epochs=epochs)
    return replace(
        base, model="cnn_gru_bn", refit_all=True, early_stopping=None, seed=seed, progress=False
    )


def run(cfg: Config) -> dict[str, Any]:
    """Train ``cfg`` and return the test RMSE and PHM08 of every variant."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ema_jax
    from ema_jax.batch_stats import recompute_linen_batch_stats
    from experiments import cmapss
    from experiments.models import make_model
    from experiments.training import batches, load_data, optimizer, run_keys

    ds = load_data(cfg)
    keys = run_keys(cfg.seed)
    model = make_model(cfg.model)
    variables = model.init(keys.init, jnp.asarray(ds.x_train[:1]))
    scale = float(ds.max_rul)
    state = ema_jax.EmaTrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optimizer(cfg, steps_per_epoch=len(ds.x_train) // cfg.batch_size),
        ema=ema_jax.ema(cfg.ema_decays[0], debias=True),
        model_state={"batch_stats": variables["batch_stats"]},
        average_model_state=True,
    )

    def loss_fn(params: Any, model_state: Any, batch: Any, rng: jax.Array) -> Any:
        x, y = batch
        pred, new_state = model.apply(
            {"params": params, **model_state},
            x,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        return jnp.mean((pred - y / scale) ** 2), new_state

    def metric_fn(params: Any, model_state: Any, batch: Any) -> Any:
        x, y = batch
        pred = model.apply({"params": params, **model_state}, x)
        return {"loss": jnp.mean((pred - y / scale) ** 2)}

    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    result = ema_jax.train_with_ema(
        state,
        loss_fn,
        lambda epoch: batches(ds.x_train, ds.y_train, cfg.batch_size, rng),
        list(batches(ds.x_train[::8], ds.y_train[::8], 4096, None)),
        epochs=cfg.epochs,
        metric_fn=metric_fn,
        rng=keys.dropout,
        with_model_state=True,
    )
    seconds = time.perf_counter() - start
    state = result.state

    def forward(params: Any, model_state: Any, x: Any) -> Any:
        return model.apply(
            {"params": params, **model_state}, x, batch_stats=True, mutable=["batch_stats"]
        )[1]

    recalibrated = recompute_linen_batch_stats(
        state, forward, [x for x, _ in batches(ds.x_train, ds.y_train, cfg.batch_size, None)]
    )
    ema_params = state.select_params(True)
    weights = {
        "raw": (state.params, state.model_state),
        "ema + raw statistics": (ema_params, state.model_state),
        "ema + averaged statistics": (ema_params, state.select_model_state(True)),
        "ema + recalibrated": (ema_params, recalibrated),
    }

    def predict(params: Any, model_state: Any, x: Any) -> Any:
        return model.apply({"params": params, **model_state}, x) * scale  # type: ignore[operator]

    x_test, y_test = jnp.asarray(ds.x_test), np.asarray(ds.y_test)
    test = {}
    for name, (params, model_state) in weights.items():
        pred = np.asarray(jax.jit(predict)(params, model_state, x_test))
        test[name] = {"rmse": cmapss.rmse(pred, y_test), "score": cmapss.phm08_score(pred, y_test)}
    return {"config": asdict(cfg), "test": test, "seconds": seconds}


def markdown(results: Sequence[dict[str, Any]], command: str) -> str:
    """The report: per variant mean ± 95 % t-interval, paired differences, per seed."""
    n = len(results)
    rmse = {v: [r["test"][v]["rmse"] for r in results] for v in VARIANTS}
    score = {v: [r["test"][v]["score"] for r in results] for v in VARIANTS}
    lines = [
        "# BatchNorm statistics for the EMA's weights (FD001, `cnn_gru_bn`, refit)",
        "",
        f"{n} seeds ({', '.join(str(r['config']['seed']) for r in results)}); the chosen "
        "configuration with a BatchNorm after each convolution, trained on all training "
        f"engines for {results[0]['config']['epochs']} epochs; EMA β = 0.999 bias-corrected, "
        "of the params and of the "
        "statistics. Mean ± 95 % t-interval over seeds; differences paired by seed (one run "
        "gives every row).",
        "",
        "| weights | test RMSE | PHM08 | Δ vs raw | Δ % | lower than raw |",
        "|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        diff = differences(rmse[v], rmse["raw"])
        cells = ["—", "—", "—"]
        if v != "raw":
            mean, half = mean_ci(diff)
            rel, rel_half = mean_ci(percent_differences(rmse[v], rmse["raw"]))
            lower = sum(d < 0 for d in diff)
            cells = [f"{mean:+.2f} ± {half:.2f}", f"{rel:+.1f} ± {rel_half:.1f}", f"{lower} of {n}"]
        lines.append(f"| {v} | {fmt(rmse[v])} | {fmt(score[v], 0)} | " + " | ".join(cells) + " |")
    recal = differences(rmse["ema + recalibrated"], rmse["ema + averaged statistics"])
    mean, half = mean_ci(recal)
    lines += [
        "",
        f"**Recalibrated − averaged statistics, paired**: {mean:+.2f} ± {half:.2f} test RMSE; "
        f"recalibration lower in {sum(d < 0 for d in recal)} of {n} seeds.",
        "",
        "| seed | " + " | ".join(VARIANTS) + " | seconds |",
        "|---|" + "---|" * (len(VARIANTS) + 1),
    ]
    for r in results:
        row = " | ".join(f"{r['test'][v]['rmse']:.2f}" for v in VARIANTS)
        lines.append(f"| {r['config']['seed']} | {row} | {r['seconds']:.0f} |")
    lines += ["", "Runs:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    FLAGS.add_to(p)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(range(10)),
        help="the seeds, a list (default: 0 1 ... 9)",
    )
    p.add_argument("--epochs", type=int, default=150, help="training epochs (default: 150)")
    p.add_argument("--runs", default="runs/batch_norm", help="where the runs are stored")
    p.add_argument("--report-only", action="store_true", help="only write the report")
    p.add_argument("--name", default="batch_norm", help="results/<NAME>.{md,json}")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    extras.require(PROG)
    args, given = FLAGS.parse(parser(), argv)  # a bad --data-dir: one line, exit 2
    runs = Path(args.runs)
    results = []
    for seed in args.seeds:
        path = runs / f"seed{seed}.json"
        if not path.exists() and not args.report_only:
            result = run(config(args.data_dir, args.epochs, seed))
            runs.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))
            rmses = "  ".join(f"{v} {result['test'][v]['rmse']:.2f}" for v in VARIANTS)
            print(f"seed {seed}: {rmses}  ({result['seconds']:.0f} s)", flush=True)
        if path.exists():
            results.append(json.loads(path.read_text()))
    if not results:
        raise SystemExit(f"no runs in {runs}")
    command = (
        f"{' '.join([PROG, *FLAGS.argv(given)])} --seeds {' '.join(map(str, args.seeds))} "
        f"--epochs {args.epochs} --runs {args.runs}"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(markdown(results, command))
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "runs": results}))
    print(f"wrote {RESULTS / args.name}.md, .json ({len(results)} seeds)")


if __name__ == "__main__":
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
