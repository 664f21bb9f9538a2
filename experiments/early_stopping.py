"""Early stopping on the raw weights vs on the EMA: the study's chosen configuration on FD001.

    python -m experiments.early_stopping --data-dir ../shared/data/cmapss --seeds 10 \\
        --patience 10 --runs runs/early_stopping

One ``train_rul`` run per seed carries both stoppers (``--early-stopping P --monitor
val_loss val_loss_ema[0]``): training only ever uses the raw params, so the two monitors
cannot interact, and the run goes on until both have stopped. Each stopper's best weights
are evaluated once on the test split. The pairing is by construction: same
initialisation, data order, dropout masks and validation engines. "Epochs trained" of a
stopper is the epoch it stopped at (what a run with that stopper alone would have trained).

Runs are stored per seed (``<runs>/seed<k>.json``) and reused; ``--report-only`` writes
``experiments/results/early_stopping.{md,json}`` from the stored runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from experiments import extras
from experiments.cli import ConfigFlags
from experiments.config import Config
from experiments.runs import check_same_config, load_seeds
from experiments.stats import differences, fmt, mean_ci, percent_differences

MONITORS = ("val_loss", "val_loss_ema[0]")
LABELS = {"val_loss": "raw + early stopping", "val_loss_ema[0]": "EMA + early stopping"}
RESULTS = Path(__file__).parent / "results"
PROG = "python -m experiments.early_stopping"
FLAGS = ConfigFlags(("data_dir",))
"""The one :class:`~experiments.config.Config` flag the study takes; it sets the others."""


def chosen(data_dir: str | None, patience: int, epochs: int) -> Config:
    """The study's chosen configuration (experiments/README.md, "Headline"): ``cnn_gru`` on
    40-cycle windows plus the cycle count, AdamW (weight decay 0.1), batch 512, lr 10⁻³ then
    10⁻⁴ from epoch 100, the bias-corrected EMA β = 0.999; plus the two stoppers."""
    return Config(
        data_dir=data_dir,
        model="cnn_gru",
        epochs=epochs,
        batch_size=512,
        lr=1e-3,
        weight_decay=0.1,
        lr_drop_epoch=100,
        lr_drop_factor=0.1,
        ema_decays=(0.999,),
        ema_debias=(True,),
        window=40,
        cycle_feature=True,
        early_stopping=patience,
        monitors=MONITORS,
        progress=False,
    )


def train_missing(base: Config, seeds: int, runs: Path) -> None:
    """Train and store each seed ``0..seeds-1`` that ``runs`` does not hold yet."""
    from experiments.training import load_data, run

    for seed in range(seeds):
        cfg = replace(base, seed=seed)
        path = runs / f"seed{seed}.json"
        if path.exists():
            check_same_config(path, cfg)
            continue
        result, _ = run(cfg, load_data(cfg))
        runs.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        stops = result["early_stopping"]
        print(
            f"seed {seed}: "
            + "  ".join(
                f"{m} best {s['best_epoch']} stop {s['stopped_epoch']}" for m, s in stops.items()
            )
            + f"  ({result['epoch_seconds']:.1f} s/epoch)",
            flush=True,
        )


def per_seed(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per seed: its run's configuration and, per monitor, the test RMSE, PHM08,
    validation RMSE, best epoch and epochs trained (the stopped epoch; the run's length if it
    never stopped)."""
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "seed": r["config"]["seed"],
            "config": r["config"],
            "epochs_run": len(r["rows"]),
        }
        for m in MONITORS:
            stop, test = r["early_stopping"][m], r["test"]["early"][m]
            row[m] = {
                "test_rmse": test["rmse"],
                "phm08": test["score"],
                "val_rmse": test["val_rmse"],
                "best_epoch": stop["best_epoch"],
                "epochs_trained": stop["stopped_epoch"] or stop["epochs_trained"],
                "stopped": stop["stopped_epoch"] is not None,
            }
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], cfg: Config, command: str, requested: int) -> str:
    raw, ema = MONITORS
    n = len(rows)

    def col(m: str, key: str) -> list[float]:
        return [float(r[m][key]) for r in rows]

    diff = differences(col(ema, "test_rmse"), col(raw, "test_rmse"))
    rel = percent_differences(col(ema, "test_rmse"), col(raw, "test_rmse"))
    d_epochs = differences(col(ema, "epochs_trained"), col(raw, "epochs_trained"))
    lines = [
        "# Early stopping: raw weights vs the EMA (FD001, the chosen configuration)",
        "",
        f"`cnn_gru`, window 40 + cycle feature, AdamW (wd 0.1), batch 512, lr 1e-3 (1e-4 from "
        f"epoch 100), at most {cfg.epochs} epochs; EMA β = 0.999 bias-corrected; "
        f"`ema_jax.EarlyStopping(patience={cfg.early_stopping})` (Keras's rule) on the "
        f"validation loss of the raw weights (`val_loss`) and of the EMA (`val_loss_ema[0]`); "
        f"{n} seeds. One run per seed carries both stoppers (training uses only the raw params, "
        "so they cannot interact) until both have stopped; each stopper's best weights are read "
        "once on the test split. Differences are paired by seed (same initialisation, data "
        "order, dropout and validation engines); mean ± 95 % t-interval.",
        "",
        *(
            [
                f"**Partial: {n} of the {requested} requested seeds** (seeds "
                f"{', '.join(str(r['seed']) for r in rows)}); the command below trains the rest "
                "(stored seeds are reused).",
                "",
            ]
            if n < requested
            else []
        ),
        "| weights | test RMSE | PHM08 | val RMSE | best epoch | epochs trained |",
        "|---|---|---|---|---|---|",
    ]
    for m in MONITORS:
        lines.append(
            f"| {LABELS[m]} | {fmt(col(m, 'test_rmse'))} | {fmt(col(m, 'phm08'), 0)} | "
            f"{fmt(col(m, 'val_rmse'))} | {fmt(col(m, 'best_epoch'), 1)} | "
            f"{fmt(col(m, 'epochs_trained'), 1)} |"
        )
    mean, half = mean_ci(diff)
    mean_rel, half_rel = mean_ci(rel)
    lines += [
        "",
        f"**EMA − raw, paired**: test RMSE {mean:+.2f} ± {half:.2f} "
        f"({mean_rel:+.1f} ± {half_rel:.1f} %); "
        f"EMA lower in {sum(d < 0 for d in diff)} of {n} seeds; epochs trained "
        f"{fmt(d_epochs, 1)}.",
        f"Stoppers that hit the {cfg.epochs}-epoch cap without stopping: raw "
        f"{sum(not r[raw]['stopped'] for r in rows)}, "
        f"EMA {sum(not r[ema]['stopped'] for r in rows)}.",
        "",
        "| seed | raw: test RMSE | best / trained | EMA: test RMSE | best / trained | Δ |",
        "|---|---|---|---|---|---|",
    ]
    for r, d in zip(rows, diff, strict=True):
        lines.append(
            f"| {r['seed']} | {r[raw]['test_rmse']:.2f} | {r[raw]['best_epoch']} / "
            f"{r[raw]['epochs_trained']} | {r[ema]['test_rmse']:.2f} | {r[ema]['best_epoch']} / "
            f"{r[ema]['epochs_trained']} | {d:+.2f} |"
        )
    lines += ["", "Runs:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    FLAGS.add_to(p)
    p.add_argument("--seeds", type=int, default=10, help="seeds 0..SEEDS-1 (default: 10)")
    p.add_argument("--patience", type=int, default=10, help="EarlyStopping patience (default: 10)")
    p.add_argument("--epochs", type=int, default=150, help="at most this many (default: 150)")
    p.add_argument("--runs", default="runs/early_stopping", help="where the runs are stored")
    p.add_argument("--report-only", action="store_true", help="only write the report")
    p.add_argument("--name", default="early_stopping", help="results/<NAME>.{md,json}")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    extras.require(PROG)
    args, given = FLAGS.parse(parser(), argv)  # a bad --data-dir: one line, exit 2
    cfg = chosen(args.data_dir, args.patience, args.epochs)
    runs = Path(args.runs)
    if not args.report_only:
        train_missing(cfg, args.seeds, runs)
    results = load_seeds(runs, range(args.seeds))
    if not results:
        raise SystemExit(f"no runs in {runs}")
    rows = per_seed(results)
    command = (
        f"{' '.join([PROG, *FLAGS.argv(given)])} --seeds {args.seeds} --patience "
        f"{args.patience} --epochs {args.epochs} --runs {args.runs}"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, cfg, command, args.seeds))
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "seeds": rows}))
    print(f"wrote {RESULTS / args.name}.md, .json ({len(rows)} seeds)")


if __name__ == "__main__":
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
