"""The seed's four claims about weight EMA, each measured (mean ± 95% t-interval over seeds).

    python -m experiments.claims --runs runs/sweep --data-dir ../shared/data/cmapss

1. "EMA reduces RMSE by 2–5%": paired by seed, ``100·(RMSE_ema − RMSE_raw)/RMSE_raw`` on the
   test split, for every β (selection rules as in :mod:`experiments.selection`).
2. "EMA smooths mini-batch noise": over the last ``k`` epochs, the std of the validation
   loss and the roughness ``Σ_e (L_e − L_{e−1})²``, raw vs EMA, as paired ratios EMA/raw.
3. "EMA lands in flatter minima": the mean validation-loss increase under Gaussian weight
   noise of relative size r (``ε_l ~ N(0, (r·rms θ_l)²)`` per leaf), EMA vs raw (paired
   ratio), from the final weights of every sweep run.
4. "Almost no additional cost": wall time per training epoch without EMA (a plain Flax
   ``TrainState``), with one EMA and with the sweep's eight EMAs, in one process,
   alternating epoch by epoch so load changes hit all three alike.

Claims 1–3 read the sweep's per-run files; claim 4 trains for a few epochs itself. Sections
5 and 6 pair the other studies' results with the sweep's runs (post-hoc EMA, early stopping:
:mod:`experiments.selection_claim`; BEMA, Switch EMA, BatchNorm statistics:
:mod:`experiments.methods_claim`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import cmapss, extras, methods_claim, selection_claim
from experiments.cli import ConfigFlags
from experiments.config import COUNT, MODEL
from experiments.runs import DECAYS, RULES, SWEEP_DEBIAS, SWEEP_DECAYS, load_runs, summarise
from experiments.stats import fmt, ratios

PROG = "python -m experiments.claims"

FLAGS = ConfigFlags(("data_dir", "subset", "batch_size", "window", "cycle_feature"))
"""The :class:`~experiments.config.Config` flags of the timing claim's data and batches."""


def noise(result: dict[str, Any], variant: str, k: int) -> tuple[float, float]:
    """``(std, roughness)`` of ``variant``'s validation loss over the last ``k`` epochs."""
    losses = np.array([r[f"val_loss_{variant}"] for r in result["rows"][-k:]])
    return float(losses.std(ddof=1)), float(np.sum(np.diff(losses) ** 2))


def claim_rmse(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        '## 1. "2–5% RMSE reduction" (test RMSE, EMA − raw, paired by seed)',
        "",
        "| model | rule | raw test RMSE | " + " | ".join(f"β={d:g}" for d in DECAYS) + " |",
        "|---|---|---|" + "---|" * len(DECAYS),
    ]
    for model, results in runs.items():
        refit = results[0]["config"].get("refit_all")
        for rule in ("last",) if refit else RULES:  # a refit selects nothing: best = last
            rows = {r["variant"]: r for r in summarise(results, rule)}
            for debias in (False, True):
                cells = [
                    fmt(rows[f"ema{d:g}" + ("-debiased" if debias else "")]["d_rmse_pct"], 1) + " %"
                    for d in DECAYS
                ]
                tag = f"{rule}, {'debiased' if debias else 'plain'}"
                lines.append(
                    f"| {model} | {tag} | {fmt(rows['raw']['rmse'])} | " + " | ".join(cells) + " |"
                )
    lines.append("")
    return lines


def claim_noise(runs: dict[str, list[dict[str, Any]]], k: int) -> list[str]:
    lines = [
        f"## 2. Noise: validation loss over the last {k} epochs, ratio EMA / raw (< 1 = smoother)",
        "",
        "| model | measure | " + " | ".join(f"β={d:g}" for d in DECAYS) + " |",
        "|---|---|" + "---|" * len(DECAYS),
    ]
    for model, results in runs.items():
        for idx, measure in ((0, "std"), (1, "Σ squared epoch diffs")):
            for suffix in ("", "-debiased"):
                cells = []
                for d in DECAYS:
                    raw = [noise(r, "raw", k)[idx] for r in results]
                    ema = [noise(r, f"ema{d:g}{suffix}", k)[idx] for r in results]
                    cells.append(fmt(ratios(ema, raw), 2))
                kind = "debiased" if suffix else "plain"
                lines.append(f"| {model} | {measure} ({kind}) | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def claim_flatness(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "## 3. Flatness: mean validation-loss increase under relative weight noise r, "
        "final weights",
        "",
        "Increase in normalised MSE (×1e-3); ratio = EMA / raw, paired by seed (< 1 = flatter).",
        "",
        "| model | r | raw increase | " + " | ".join(f"β={d:g} ratio" for d in DECAYS) + " |",
        "|---|---|---|" + "---|" * len(DECAYS),
    ]
    for model, results in runs.items():
        if "perturb" not in results[0]:
            continue
        for size in results[0]["perturb"]["raw"]:
            raw = [r["perturb"]["raw"][size] for r in results]
            for suffix in ("", "-debiased"):
                cells = [
                    fmt(ratios([r["perturb"][f"ema{d:g}{suffix}"][size] for r in results], raw), 2)
                    for d in DECAYS
                ]
                kind = "debiased" if suffix else "plain"
                lines.append(
                    f"| {model} | {size} ({kind}) | {fmt([1e3 * v for v in raw], 2)} | "
                    + " | ".join(cells)
                    + " |"
                )
    lines.append("")
    return lines


def time_epochs(ds: Any, model_name: str, rounds: int, batch_size: int) -> dict[str, list[float]]:
    """Seconds per training epoch (no evaluation) for no EMA, 1 EMA and the sweep's 8 EMAs,
    alternating; the first (compiling) epoch of each is discarded."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    import ema_jax
    from experiments.models import make_model
    from experiments.training import Scoring, batches

    model = make_model(model_name)
    params = model.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))["params"]
    loss_fn = Scoring(model, float(ds.max_rul)).train_loss

    @jax.jit
    def plain_step(state: Any, batch: Any, rng: jax.Array) -> tuple[Any, dict[str, Any]]:
        rng = jax.random.fold_in(rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, rng)
        return state.apply_gradients(grads=grads), {"loss": loss}

    def fresh(ema: Any) -> Any:
        p = jax.tree.map(jnp.array, params)
        if ema is None:
            return train_state.TrainState.create(
                apply_fn=model.apply, params=p, tx=optax.adam(1e-3)
            )
        return ema_jax.EmaTrainState.create(
            apply_fn=model.apply, params=p, tx=optax.adam(1e-3), ema=ema
        )

    setups: dict[str, tuple[Any, Any]] = {
        "no EMA": (fresh(None), plain_step),
        "1 EMA (β=0.999)": (fresh(ema_jax.ema(0.999)), ema_jax.make_train_step(loss_fn)),
        "8 EMAs (sweep)": (
            fresh(ema_jax.ema(SWEEP_DECAYS, debias=SWEEP_DEBIAS)),
            ema_jax.make_train_step(loss_fn),
        ),
    }
    states = {name: s for name, (s, _) in setups.items()}
    times: dict[str, list[float]] = {name: [] for name in setups}
    rng = jax.random.key(1)
    data_rng = np.random.default_rng(0)
    for r in range(rounds + 1):
        order = list(setups) if r % 2 == 0 else list(reversed(setups))
        epoch = list(batches(ds.x_train, ds.y_train, batch_size, data_rng))
        for name in order:
            step = setups[name][1]
            state = states[name]
            start = time.perf_counter()
            for batch in epoch:
                state, metrics = step(state, batch, rng)
            jax.block_until_ready(metrics["loss"])
            states[name] = state
            if r > 0:
                times[name].append(time.perf_counter() - start)
    return times


def claim_cost(times: dict[str, list[float]], model_name: str, batch_size: int) -> list[str]:
    base = times["no EMA"]
    lines = [
        f"## 4. Cost: seconds per training epoch ({model_name}, batch {batch_size}, "
        f"{len(base)} alternating rounds)",
        "",
        "| setup | s / epoch | ratio to no EMA (paired by round) |",
        "|---|---|---|",
    ]
    for name, t in times.items():
        ratio = "—" if name == "no EMA" else fmt(ratios(t, base), 3)
        lines.append(f"| {name} | {fmt(t, 3)} | {ratio} |")
    lines.append("")
    return lines


def parser() -> argparse.ArgumentParser:
    """The claims' command line: their own flags and :data:`FLAGS`."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", default="runs/sweep", help="the sweep's per-run JSON directory")
    FLAGS.add_to(p)
    p.add_argument(
        "--last-k", type=COUNT.parse, default=10, help="epochs for the noise claim (default: 10)"
    )
    p.add_argument(
        "--timing-model",
        default="cnn_attn",
        choices=MODEL.choices,
        help="the model the cost claim times (default: cnn_attn)",
    )
    p.add_argument(
        "--timing-rounds", type=COUNT.parse, default=6, help="alternating rounds (default: 6)"
    )
    p.add_argument(
        "--posthoc",
        default=None,
        help="posthoc_study's JSON (e.g. experiments/results/posthoc.json) for claim 5 "
        "(default: none)",
    )
    p.add_argument(
        "--early-stopping-results",
        default=None,
        help="early_stopping's JSON (e.g. experiments/results/early_stopping.json) for claim 5 "
        "(default: none)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=[],
        metavar="DIR",
        help="claim 6: directories of runs of the sweep's configuration with --bema or "
        "--switch-ema (a sweep's --runs or train_rul's --out parents; default: none)",
    )
    p.add_argument(
        "--batch-norm-results",
        default=None,
        help="claim 6: batch_norm_study's JSON (e.g. experiments/results/batch_norm.json) "
        "(default: none)",
    )
    p.add_argument(
        "--out",
        default="experiments/results/claims.md",
        help="the report (default: experiments/results/claims.md)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    extras.require(PROG)
    p = parser()
    args, cfg = FLAGS.parse(p, argv)

    every = load_runs(Path(args.runs))
    # runs retrained on all engines (--refit-all) have no validation curves: claims 2-3 need them
    runs = {m: r for m, r in every.items() if not r[0]["config"].get("refit_all")}
    try:  # read before the timing claim trains, so that a wrong input fails at once
        selection = selection_claim.claim_selection(
            runs,
            Path(args.posthoc) if args.posthoc else None,
            Path(args.early_stopping_results) if args.early_stopping_results else None,
        )
        methods = methods_claim.claim_methods(
            every,
            [Path(d) for d in args.methods],
            Path(args.batch_norm_results) if args.batch_norm_results else None,
        )
    except ValueError as err:
        p.error(str(err))
    lines = ["# The seed's claims, measured", ""]
    if every:
        n = {m: len(r) for m, r in every.items()}
        lines += [f"Sweep runs read from `{args.runs}`: {n}.", ""]
        lines += claim_rmse(every) + claim_noise(runs, args.last_k) + claim_flatness(runs)
    ds = cmapss.load(data_dir=cfg.data_dir, subset=cfg.subset, seed=0, **cfg.preprocessing())
    times = time_epochs(ds, args.timing_model, args.timing_rounds, cfg.batch_size)
    lines += claim_cost(times, args.timing_model, cfg.batch_size) + selection + methods
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(json.dumps({k: [round(x, 4) for x in v] for k, v in times.items()}))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
