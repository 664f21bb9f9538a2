"""β sweep: raw weights vs EMA β ∈ {0.9, 0.99, 0.999, 0.9999} × {plain, debiased}, several seeds.

    python -m experiments.sweep --data-dir ../shared/data/cmapss --seeds 5

All eight averages are kept in ONE training run per (model, seed) (``ema_jax.ema`` with a
tuple of decays and a per-decay ``debias`` tuple), so every EMA variant is paired with the
raw weights of the same run. Each finished run is saved as ``<runs>/<model>/seed<k>.json``
(the sweep resumes from those files); the test split is read once per run, after training.

Selection uses validation only: within a run by the rule (``last`` / ``best``, see
:mod:`experiments.selection`), across configurations by the mean validation RMSE over
seeds. Intervals are 95% t-intervals over seeds: ``mean ± t_{0.975, n-1}·s/√n``; the
EMA−raw differences are paired by seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from experiments import extras
from experiments.cli import ConfigFlags
from experiments.config import COUNT, MODEL, Config
from experiments.runs import (
    DECAYS,
    REFIT_SUFFIX,
    RULES,
    SWEEP_DEBIAS,
    SWEEP_DECAYS,
    check_same_config,
    load_runs,
    run_name,
    run_path,
    stored_config,
    summarise,
)
from experiments.stats import fmt, mean_ci

PROG = "python -m experiments.sweep"
FLAGS = ConfigFlags(defaults={"perturb": (0.01, 0.02, 0.05)}).without(
    "model", "ema_decays", "ema_debias", "seed", "progress"
)
"""The :class:`Config` flags of the sweep: it sets the decays itself, and the model and
seed from ``--models`` and ``--seeds``; it probes flatness unless told ``--perturb``."""


def run_command(model: str, results: list[dict[str, Any]]) -> str:
    """The sweep command that reproduces ``model``'s runs: their stored config's flags
    (:meth:`ConfigFlags.argv`), the model and the number of seeds."""
    name = model.removesuffix(REFIT_SUFFIX)
    words = ["--models", name, "--seeds", str(len(results)), *FLAGS.argv(stored_config(results))]
    return f"{PROG} " + shlex.join(words)


def markdown(runs: dict[str, list[dict[str, Any]]], command: str) -> str:
    """The results tables (one per model and rule) and, per rule, the validation-chosen best."""
    lines = [
        "# RUL β sweep: raw vs EMA weights",
        "",
        f"Table written by: `{command}`",
        "",
        "Mean ± 95% t-interval over seeds. Δ = EMA − raw, paired by seed (negative = EMA "
        "better). Test RMSE/score: last window of each test unit; PHM08 score summed over "
        "units. `last` = weights after the final epoch; `best` = per variant, the epoch "
        "with the lowest validation RMSE.",
        "",
    ]
    # per rule: (mean val RMSE, model, variant, row) of the lowest; rules are not compared
    # with each other: under `best` the val RMSE is the minimum of the curve it selects on.
    best: dict[str, tuple[float, str, str, dict[str, Any]]] = {}
    best_last: dict[str, tuple[float, str]] = {}  # per model: best `last` variant on val
    for model, results in runs.items():
        cfg = stored_config(results)
        schedule = ""
        if cfg.lr_drop_epoch:
            schedule = f" (× {cfg.lr_drop_factor:g} from epoch {cfg.lr_drop_epoch})"
        elif cfg.cosine:
            schedule = " (cosine decay)"
        lines += [
            f"## {model}: {len(results)} seeds, {cfg.epochs} epochs, batch "
            f"{cfg.batch_size}, Adam lr {cfg.lr:g}{schedule}{cfg.data_description()}",
            "",
            f"Runs: `{run_command(model, results)}`",
        ]
        if cfg.refit_all:
            lines += [
                "",
                "Retrained on all 100 training engines with the configuration chosen on "
                "validation; its `val RMSE` column monitors training windows (no validation "
                "engines are left) and was used for nothing; `best` = `last`.",
            ]
        for rule in RULES:
            lines += [
                "",
                f"### rule `{rule}`",
                "",
                "| weights | val RMSE | test RMSE | PHM08 score | Δ test RMSE | Δ RMSE % "
                "| Δ score |",
                "|---|---|---|---|---|---|---|",
            ]
            for row in summarise(results, rule):
                raw = row["variant"] == "raw"
                dash = "—"
                lines.append(
                    f"| {row['variant']} | {fmt(row['val_rmse'])} | {fmt(row['rmse'])} | "
                    f"{fmt(row['score'], 0)} | {dash if raw else fmt(row['d_rmse'])} | "
                    f"{dash if raw else fmt(row['d_rmse_pct'], 1)} | "
                    f"{dash if raw else fmt(row['d_score'], 0)} |"
                )
                val = float(np.mean(row["val_rmse"]))
                if cfg.refit_all:  # no validation engines: nothing to select on
                    continue
                if rule not in best or val < best[rule][0]:
                    best[rule] = (val, model, row["variant"], row)
                if rule == "last" and (model not in best_last or val < best_last[model][0]):
                    best_last[model] = (val, row["variant"])
        lines.append("")
    if best:
        lines += [
            "## Best configuration per rule (chosen on mean validation RMSE only)",
            "",
            "The two rules are not ranked against each other: under `best` the validation "
            "RMSE is the minimum of the very curve the epoch is chosen on, so it is lower by "
            "construction (an optimistic estimate); under `last` it is the final epoch's.",
            "",
        ]
        for rule, (_, model, variant, row) in best.items():
            lines += [
                f"- rule `{rule}`: `{model}`, weights `{variant}`: validation RMSE "
                f"{fmt(row['val_rmse'])}, **test RMSE {fmt(row['rmse'])}**, PHM08 "
                f"{fmt(row['score'], 0)} (n = {len(row['rmse'])} seeds; per seed: "
                + ", ".join(f"{v:.2f}" for v in row["rmse"])
                + ")."
            ]
        lines.append("")
    for model, (val, variant) in best_last.items():
        refit = runs.get(run_name(model, True))
        if not refit:
            continue
        row = {r["variant"]: r for r in summarise(refit, "last")}[variant]
        epochs = refit[0]["config"]["epochs"]
        lines += [
            f"## `{model}` retrained on all training engines ({run_name(model, True)})",
            "",
            f"The variant with the lowest mean validation RMSE under rule `last` "
            f"(`{variant}`, {val:.2f}), retrained with the same configuration for {epochs} "
            f"epochs on all training engines and deployed after the last epoch: **test RMSE "
            f"{fmt(row['rmse'])}**, PHM08 {fmt(row['score'], 0)}"
            + (
                ""
                if variant == "raw"
                else f", Δ vs raw weights of the same runs {fmt(row['d_rmse'])} "
                f"({fmt(row['d_rmse_pct'], 1)} %)"
            )
            + f" (n = {len(row['rmse'])} seeds; per seed: "
            + ", ".join(f"{v:.2f}" for v in row["rmse"])
            + ").",
            "",
        ]
    lines += per_seed_tables(runs, {m: v for m, (_, v) in best_last.items()})
    return "\n".join(lines)


def per_seed_tables(runs: dict[str, list[dict[str, Any]]], chosen: dict[str, str]) -> list[str]:
    """Per model, rule ``last``, one row per seed: raw and the variant that validation chose
    (``chosen[model]``; a refit run shows its split model's choice)."""
    lines: list[str] = []
    for model, results in runs.items():
        variant = chosen.get(model.removesuffix(REFIT_SUFFIX))
        if variant is None or variant == "raw":
            continue
        lines += [
            f"## Per seed: `{model}`, rule `last`, raw vs `{variant}`",
            "",
            "| seed | raw val RMSE | raw test RMSE | EMA val RMSE | EMA test RMSE | Δ test |",
            "|---|---|---|---|---|---|",
        ]
        for r in results:
            raw, ema = r["test"]["last"]["raw"], r["test"]["last"][variant]
            lines.append(
                f"| {r['config']['seed']} | {raw['val_rmse']:.2f} | {raw['rmse']:.2f} | "
                f"{ema['val_rmse']:.2f} | {ema['rmse']:.2f} | {ema['rmse'] - raw['rmse']:+.2f} |"
            )
        lines.append("")
    return lines


def plot(runs: dict[str, list[dict[str, Any]]], path: Path, rule: str = "last") -> None:
    """Left: test RMSE vs β (plain / debiased; raw as a band), per model. Right: mean
    validation RMSE per epoch, raw vs EMA β = 0.99 (plain) and 0.999 (debiased), per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for i, (model, results) in enumerate(runs.items()):
        color = f"C{i}"
        rows = {r["variant"]: r for r in summarise(results, rule)}
        m, h = mean_ci(rows["raw"]["rmse"])
        ax0.axhspan(m - h, m + h, color=color, alpha=0.12)
        ax0.axhline(m, color=color, lw=0.8, ls=":")
        for debias, marker, ls in ((False, "o", "-"), (True, "s", "--")):
            names = [f"ema{d:g}" + ("-debiased" if debias else "") for d in DECAYS]
            mc = [mean_ci(rows[n]["rmse"]) for n in names if n in rows]
            if len(mc) != len(DECAYS):
                continue
            ax0.errorbar(
                [1 - d for d in DECAYS],
                [a for a, _ in mc],
                yerr=[b for _, b in mc],
                color=color,
                marker=marker,
                ls=ls,
                capsize=2,
                label=f"{model} {'debiased' if debias else 'plain'}",
            )
        epochs = [r["epoch"] for r in results[0]["rows"]]
        for name, ls in (("raw", ":"), ("ema0.99", "-"), ("ema0.999-debiased", "--")):
            key = f"val_rmse_{name}"
            if key in results[0]["rows"][0]:
                curve = np.mean([[r[key] for r in res["rows"]] for res in results], axis=0)
                ax1.plot(epochs, curve, color=color, ls=ls, label=f"{model} {name}")
    ax0.set(xscale="log", xlabel="1 − β  (band: raw, 95% CI)", ylabel=f"test RMSE ({rule})")
    raw_means = [mean_ci(summarise(res, rule)[0]["rmse"])[0] for res in runs.values()]
    if raw_means:  # off-scale points (a plain β too slow for the run's length) are clipped
        ax0.set_ylim(0.85 * min(raw_means), 1.5 * max(raw_means))
    ax0.invert_xaxis()
    ax0.legend(fontsize=6)
    ax1.set(xlabel="epoch", ylabel="validation RMSE, mean over seeds")
    lows = [line.get_ydata().min() for line in ax1.get_lines()]
    if lows:
        ax1.set_ylim(min(lows) * 0.95, min(lows) * 1.5)
    ax1.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train_missing(base: Config, models: Sequence[str], seeds: int, runs_dir: Path) -> None:
    """Train and store every run of ``base`` for ``models`` × seeds ``0..seeds-1`` that
    ``runs_dir`` does not hold yet; a stored run is reused only if made with ``base``.

    The one place the sweep needs JAX: :mod:`experiments.training` is imported here, so
    that a report (``--report-only``) renders without it.
    """
    from experiments.training import load_data, run

    for seed in range(seeds):
        ds = None  # one dataset per seed (its validation split), shared by the models
        for model in models:
            cfg = replace(base, model=model, seed=seed)
            path = run_path(runs_dir, cfg)
            if path.exists():
                check_same_config(path, cfg)
                continue
            if ds is None:
                ds = load_data(cfg)
            result, _ = run(cfg, ds)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))
            # Validation only on the console: test figures go to the report, so nobody
            # picks a configuration by watching them scroll past.
            last = result["test"]["last"]
            shown = [v for v in ("raw", "ema0.999", "bema") if v in last]  # --bema: no β
            print(
                f"{model} seed {seed}: val RMSE "
                + "  ".join(f"{v} {last[v]['val_rmse']:.2f}" for v in shown)
                + f"  ({result['epoch_seconds']:.1f} s/epoch)",
                flush=True,
            )


def parser() -> argparse.ArgumentParser:
    """The sweep's command line: its own flags and :data:`FLAGS`."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["cnn_attn", "dcnn"],
        choices=MODEL.choices,
        metavar="MODEL",
        help=f"models to train, of {', '.join(MODEL.choices or ())} (default: cnn_attn dcnn)",
    )
    p.add_argument("--seeds", type=COUNT.parse, default=5, help="seeds 0..N-1 (default: 5)")
    FLAGS.add_to(p)
    p.add_argument(
        "--runs",
        default="runs/sweep",
        help=f"per-run JSON directory, resumable; runs of --refit-all go to "
        f"<runs>/<model>{REFIT_SUFFIX}/ (default: runs/sweep)",
    )
    p.add_argument("--out", default="experiments/results", help="table and plot directory")
    p.add_argument(
        "--name",
        default=None,
        help="basename of the table and plot (default: the --runs directory's name, so that "
        "sweeps into different --runs never overwrite each other's report)",
    )
    p.add_argument("--report-only", action="store_true", help="only rebuild table and plot")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    extras.require(PROG)
    args, base = FLAGS.parse(
        parser(), argv, ema_decays=SWEEP_DECAYS, ema_debias=SWEEP_DEBIAS, progress=False
    )
    runs_dir = Path(args.runs)
    if not args.report_only:
        train_missing(base, args.models, args.seeds, runs_dir)
    wanted = {run_name(m, args.refit_all) for m in args.models}
    if args.report_only:
        wanted |= {run_name(m, True) for m in args.models}
    runs = {m: r for m, r in load_runs(runs_dir).items() if m in wanted}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    typed = list(sys.argv[1:] if argv is None else argv)
    command = " ".join([PROG, *typed])
    name = args.name or runs_dir.resolve().name
    (out / f"{name}.md").write_text(markdown(runs, command))
    split = {m: r for m, r in runs.items() if not r[0]["config"].get("refit_all")}
    plot(split or runs, out / f"{name}.png")  # refit runs have no validation curves
    print(f"wrote {out / (name + '.md')} and {out / (name + '.png')}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
