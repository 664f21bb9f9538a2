"""Post-hoc EMA on C-MAPSS: record two power-function EMAs in one run, choose σ_rel after it.

    python -m experiments.posthoc_study --data-dir ../shared/data/cmapss --seeds 5 <config flags>

Per seed, one ``train_rul`` run of the given configuration whose state also tracks the
power-function EMAs of σ_rel 0.05 and 0.10 (``ema_jax.posthoc.SIGMA_RELS``), written as
Orbax snapshots every ``--snapshot-every`` epochs into ``<runs>/seed<s>/posthoc`` (their own
directory, all kept). After training, ``ema_jax.posthoc.synthesize_from`` gives the EMA of
every σ_rel of ``--sigma-grid`` in one pass over the snapshots; the one with the lowest
validation RMSE is chosen (validation only) and scored on test once, with raw and the
directly tracked EMAs of the same run (``last`` rule). Then seed 0's configuration is timed
with and without recording (``--timing-rounds``, alternating, training steps and snapshot
writes only: the ratio is the recording cost), unless ``<runs>/timing.json`` exists.

A script of its own, not a ``train_rul`` flag: the recorded averages and the snapshot
callback change the run's variants and outputs, which every ``train_rul`` report reads.
It reuses :mod:`experiments.training`'s data, model, optimizer and scoring as they are.

Writes ``<runs>/seed<s>.json`` (resumable: finished seeds are skipped) and, from them,
``<out>/<name>.md``, ``.json`` and ``.png`` (validation RMSE against σ_rel).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import jax
import numpy as np

import ema_jax
from ema_jax import posthoc, schedules
from experiments import cmapss, extras, training
from experiments.cli import ConfigFlags
from experiments.config import Config
from experiments.history import epoch_row, history_rows, summary, variant_weights
from experiments.runs import load_seeds
from experiments.stats import differences, fmt

FLAGS = ConfigFlags().without("seed", "refit_all", "members")
GRID = tuple(round(0.02 + 0.01 * i, 2) for i in range(24))  # 0.02 … 0.25
RECORDED = tuple(f"pf{s:g}" for s in posthoc.SIGMA_RELS)
PROG = "python -m experiments.posthoc_study"


def recording_state(cfg: Config, ds: Any, key: jax.Array, record: bool) -> tuple[Any, Any]:
    """``training.build``'s scoring and state; with ``record`` the EMA also tracks the
    power-function averages of ``posthoc.SIGMA_RELS`` (last in the state, one pass)."""
    scoring, state = training.build(cfg, ds, key)
    if not record:
        return scoring, state
    pfs = tuple(schedules.power_function(sigma_rel=s) for s in posthoc.SIGMA_RELS)
    tx = ema_jax.ema((*cfg.ema_decays, *pfs), debias=(*cfg.ema_debias, *(False,) * len(pfs)))
    return scoring, state.replace(ema=tx, ema_state=tx.init(state.params))


def recorded_averages(state: Any, cfg: Config) -> list[Any]:
    """The power-function averages of a recording state, one params tree per σ_rel."""
    first = len(cfg.ema_decays)
    return [state.accumulators(first + i) for i in range(len(posthoc.SIGMA_RELS))]


def rmse_of(scoring: training.Scoring, params: Any, x: np.ndarray, y: np.ndarray) -> float:
    return cmapss.rmse(np.asarray(_predict(scoring)(params, x)), np.asarray(y))


_PREDICT: dict[int, Any] = {}


def _predict(scoring: training.Scoring) -> Any:
    return _PREDICT.setdefault(id(scoring), jax.jit(scoring.predict))


def time_recording(cfg: Config, ds: Any, every: int, rounds: int, directory: Path) -> dict:
    """Seconds of ``every`` training epochs without and with recording (its two extra
    averages and one snapshot), alternating ``rounds`` times; no evaluation."""
    keys = training.run_keys(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    runs: dict[bool, list[Any]] = {}
    for record in (False, True):
        scoring, state = recording_state(cfg, ds, keys.init, record)
        step = ema_jax.make_train_step(scoring.train_loss)
        x, y = next(training.batches(ds.x_train, ds.y_train, cfg.batch_size, rng))
        state, _ = step(state, (x, y), keys.dropout)  # compile
        runs[record] = [state, step]
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    with posthoc.snapshot_manager(directory) as mngr:
        for _ in range(rounds):
            for record in (False, True):
                state, step = runs[record]
                start = time.perf_counter()
                for _ in range(every):
                    for batch in training.batches(ds.x_train, ds.y_train, cfg.batch_size, rng):
                        state, metrics = step(state, batch, keys.dropout)
                    jax.block_until_ready(metrics)
                if record:
                    posthoc.save_snapshot(mngr, int(state.step), recorded_averages(state, cfg))
                    mngr.wait_until_finished()
                seconds["with" if record else "without"].append(time.perf_counter() - start)
                runs[record][0] = state
    ratios = [w / o for w, o in zip(seconds["with"], seconds["without"], strict=True)]
    return {"epochs_per_round": every, "seconds": seconds, "ratio": float(np.median(ratios))}


def run_seed(cfg: Config, ds: Any, out: Path, every: int, grid: Sequence[float]) -> dict:
    """One recording run, the σ_rel grid synthesized and the validation-chosen one tested."""
    keys = training.run_keys(cfg.seed)
    scoring, state = recording_state(cfg, ds, keys.init, record=True)
    snapdir = out / "posthoc"
    rng = np.random.default_rng(cfg.seed)
    variants = [*cfg.variants, *RECORDED]
    save_seconds: list[float] = []
    with posthoc.snapshot_manager(snapdir) as mngr:

        def snapshot(epoch: int, record: dict, state: Any) -> None:
            if (epoch + 1) % every == 0:
                start = time.perf_counter()
                posthoc.save_snapshot(mngr, int(state.step), recorded_averages(state, cfg))
                save_seconds.append(time.perf_counter() - start)
            if cfg.progress:
                row = epoch_row(epoch, record, variants)
                print(f"seed {cfg.seed} epoch {epoch + 1}  {summary(row, variants)}")

        history, state = ema_jax.train_with_ema(
            state,
            scoring.train_loss,
            lambda epoch: training.batches(ds.x_train, ds.y_train, cfg.batch_size, rng),
            list(training.batches(ds.x_val, ds.y_val, 4096, None)),
            epochs=cfg.epochs,
            metric_fn=scoring.metrics,
            rng=keys.dropout,
            callback=snapshot,
        )
        mngr.wait_until_finished()
    rows = history_rows(history, variants)
    final = dict(zip(variants, variant_weights(state), strict=True))
    start = time.perf_counter()  # the whole grid in one pass: each snapshot read once
    grid_params = jax.block_until_ready(posthoc.synthesize_from(snapdir, list(grid)))
    grid_seconds = time.perf_counter() - start
    synth = {
        sigma: (params, rmse_of(scoring, params, ds.x_val, ds.y_val))
        for sigma, params in zip(grid, grid_params, strict=True)
    }
    chosen = min(grid, key=lambda s: synth[s][1])
    direct = [v for v in cfg.variants if v != "raw"]
    best_direct = min(direct, key=lambda v: rows[-1][f"val_rmse_{v}"])
    weights = {**final, "posthoc": synth[chosen][0]}
    # The test split is read once, after every choice was made on validation.
    test = {name: rmse_of(scoring, p, ds.x_test, ds.y_test) for name, p in weights.items()}
    val = {name: rows[-1][f"val_rmse_{name}"] for name in variants}
    val["posthoc"] = synth[chosen][1]
    return {
        "config": asdict(cfg),
        "steps_per_epoch": len(ds.x_train) // cfg.batch_size,
        "snapshots": len(save_seconds),
        "snapshot_every_epochs": every,
        "save_seconds": save_seconds,
        "epoch_seconds": float(np.median(history["seconds"][1:])),
        "grid": [{"sigma_rel": s, "val_rmse": synth[s][1]} for s in grid],
        "chosen_sigma_rel": chosen,
        "best_direct": best_direct,
        "val_rmse": val,
        "test_rmse": test,
        "grid_seconds": grid_seconds,
    }


def report(runs: list[dict], timing: dict | None, out: Path, name: str, command: str) -> str:
    """The markdown report, its JSON and the plot of validation RMSE against σ_rel."""
    seeds = [r["config"]["seed"] for r in runs]
    names = [*[v for v in runs[0]["test_rmse"] if v not in ("posthoc",)], "posthoc"]
    lines = [
        f"# Post-hoc EMA on C-MAPSS {runs[0]['config']['subset']}",
        "",
        f"Written by `python -m experiments.posthoc_study ... --report-only`; runs: `{command}`.",
        "",
        f"{len(runs)} seeds ({', '.join(map(str, seeds))}); one run per seed records the "
        f"power-function EMAs σ_rel {', '.join(map(str, posthoc.SIGMA_RELS))} every "
        f"{runs[0]['snapshot_every_epochs']} epochs ({runs[0]['snapshots']} snapshots, "
        f"{runs[0]['steps_per_epoch']} steps/epoch); σ_rel is chosen on validation from "
        f"{len(runs[0]['grid'])} values {runs[0]['grid'][0]['sigma_rel']}…"
        f"{runs[0]['grid'][-1]['sigma_rel']}. Rule `last` (final step). Mean ± 95 % t-interval.",
        "",
        "| weights | val RMSE | test RMSE | test − raw, paired |",
        "|---|---|---|---|",
    ]
    raw = [r["test_rmse"]["raw"] for r in runs]
    for v in names:
        test = [r["test_rmse"][v] for r in runs]
        delta = "—" if v == "raw" else fmt(differences(test, raw))
        label = "**post-hoc, chosen σ_rel**" if v == "posthoc" else v
        lines.append(
            f"| {label} | {fmt([r['val_rmse'][v] for r in runs])} | {fmt(test)} | {delta} |"
        )
    chosen = [r["chosen_sigma_rel"] for r in runs]
    best = [r["test_rmse"][r["best_direct"]] for r in runs]
    ph = [r["test_rmse"]["posthoc"] for r in runs]
    lines += [
        "",
        f"Chosen σ_rel per seed: {', '.join(f'{c:g}' for c in chosen)}. Best directly tracked "
        f"EMA on validation per seed: {', '.join(r['best_direct'] for r in runs)}; post-hoc − "
        f"that EMA on test, paired: {fmt(differences(ph, best))}.",
        "",
        f"Per seed test RMSE, post-hoc: {', '.join(f'{x:.2f}' for x in ph)}; raw: "
        f"{', '.join(f'{x:.2f}' for x in raw)}.",
        "",
        "## Cost",
        "",
    ]
    saves = [np.mean(r["save_seconds"]) for r in runs]
    lines.append(synthesis_cost(runs))
    lines.append(
        f"- Snapshot write (async `save_snapshot` call, in the run): {fmt(saves, 3)} s; "
        f"training epoch (train + evaluation of every average): "
        f"{fmt([r['epoch_seconds'] for r in runs])} s."
    )
    if timing is not None:
        lines.append(
            f"- Recording overhead (seed 0, training steps only, {timing['epochs_per_round']} "
            f"epochs + one snapshot per round, alternating {len(timing['seconds']['with'])} "
            f"rounds): with / without = **{timing['ratio']:.3f}** (rounds: "
            + ", ".join(
                f"{w:.1f}/{o:.1f} s"
                for w, o in zip(
                    timing["seconds"]["with"], timing["seconds"]["without"], strict=True
                )
            )
            + ")."
        )
    lines += ["", f"![validation RMSE against σ_rel]({name}.png)", ""]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"runs": runs, "timing": timing}, indent=1))
    plot(runs, out / f"{name}.png")
    return text


def synthesis_cost(runs: list[dict]) -> str:
    """The report's line on the synthesis time: the grid in one pass (``grid_seconds``), and
    one pass per σ_rel for runs recorded before (``synthesis_seconds``, one per σ_rel), each
    naming its seeds when the runs mix the two."""
    n, size = runs[0]["snapshots"], len(runs[0]["grid"])
    one_pass = [r for r in runs if "grid_seconds" in r]
    per_width = [r for r in runs if "grid_seconds" not in r]
    mixed = bool(one_pass and per_width)

    def seeds(group: list[dict]) -> str:
        return f" (seeds {', '.join(str(r['config']['seed']) for r in group)})" if mixed else ""

    parts = []
    if one_pass:
        parts.append(
            f"`synthesize_from` of the grid of {size} σ_rel in one pass, each of the {n} "
            f"snapshots read once{seeds(one_pass)}: "
            f"{fmt([r['grid_seconds'] for r in one_pass], 2)} s"
        )
    if per_width:
        per_sigma = [np.mean(r["synthesis_seconds"]) for r in per_width]
        parts.append(
            f"`synthesize_from`, {n} snapshots read one by one, once per σ_rel"
            f"{seeds(per_width)}: {fmt(per_sigma, 3)} s per σ_rel; the grid of {size}: "
            f"{fmt([sum(r['synthesis_seconds']) for r in per_width], 1)} s"
        )
    return "- Synthesis (" + "; ".join(parts) + ")."


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = [g["sigma_rel"] for g in runs[0]["grid"]]
    curves = np.array([[g["val_rmse"] for g in r["grid"]] for r in runs])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
    for c in curves:
        ax.plot(sigmas, c, color="C0", lw=0.7, alpha=0.4)
    ax.plot(sigmas, curves.mean(0), color="C0", lw=2, label="post-hoc EMA (mean over seeds)")
    for i, v in enumerate(v for v in runs[0]["val_rmse"] if v != "posthoc"):
        mean = np.mean([r["val_rmse"][v] for r in runs])
        ax.axhline(mean, ls="--", lw=1, color=f"C{i + 1}", label=f"{v} (tracked)")
    ax.set(xlabel="σ_rel", ylabel="validation RMSE (cycles)")
    ax.set_ylim(curves.min() * 0.97, np.percentile(curves, 90) * 1.05)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    FLAGS.add_to(p)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: 5)")
    p.add_argument("--snapshot-every", type=int, default=5, help="epochs between snapshots")
    p.add_argument("--sigma-grid", type=float, nargs="+", default=GRID, help="σ_rel to try")
    p.add_argument("--timing-rounds", type=int, default=6, help="timing rounds (0: none)")
    p.add_argument("--runs", default="runs/posthoc", help="per-seed outputs (resumable)")
    p.add_argument("--out", default="experiments/results", help="report directory")
    p.add_argument("--name", default="posthoc", help="report file name")
    p.add_argument("--report-only", action="store_true", help="only write the report")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    extras.require(PROG)
    args, base = FLAGS.parse(parser(), argv, seed=0)
    runs_dir = Path(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    timing_path = runs_dir / "timing.json"
    for seed in range(args.seeds):
        path = runs_dir / f"seed{seed}.json"
        if args.report_only or path.exists():
            continue
        cfg = replace(base, seed=seed)
        ds = training.load_data(cfg)
        result = run_seed(cfg, ds, runs_dir / f"seed{seed}", args.snapshot_every, args.sigma_grid)
        path.write_text(json.dumps(result, indent=1))
        print(f"seed {seed}: chosen σ_rel {result['chosen_sigma_rel']}, test {result['test_rmse']}")
    if args.timing_rounds and not args.report_only and not timing_path.exists():
        cfg = replace(base, seed=0)
        measured = time_recording(
            cfg,
            training.load_data(cfg),
            args.snapshot_every,
            args.timing_rounds,
            runs_dir / "timing_snapshots",
        )
        timing_path.write_text(json.dumps(measured, indent=1))
    runs = load_seeds(runs_dir, range(args.seeds))
    if not runs:
        raise SystemExit(f"no finished seeds in {runs_dir}")
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
    command = " ".join(["python -m experiments.posthoc_study", *FLAGS.argv(base)])
    text = report(runs, timing, Path(args.out), args.name, command)
    print(text)
    return text


if __name__ == "__main__":
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
