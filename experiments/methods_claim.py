"""Section 6 of :mod:`experiments.claims`: the other averages on the headline configuration.

Each method's deployed weights (test RMSE, rule ``last``) against two references of the same
seeds, paired by seed: the raw weights and the tracked EMA 0.999 debiased.

- **BEMA and Switch EMA** (``--methods``): runs of the sweep's configuration with ``--bema``
  or ``--switch-ema``, a sweep's (``<model>/seed<k>.json``) or ``train_rul``'s
  (``seed<k>/history.json``). The references are the sweep's runs of the same configuration
  and seeds: BEMA leaves training as it is (its raw weights are the sweep's), Switch EMA
  changes it, so the sweep's runs are the only reference both share.
- **BatchNorm statistics** (``--batch-norm-results``, :mod:`experiments.batch_norm_study`): a
  different model, ``cnn_gru_bn``, so its references are its own runs' raw weights and its
  EMA with averaged statistics (``average_model_state=True``), from the same trajectory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from experiments.config import Config
from experiments.runs import load_runs
from experiments.stats import differences, fmt

HEADLINE_EMA = "ema0.999-debiased"
"""The tracked EMA every method is compared with (the headline's deployed weights)."""

METHOD_FIELDS = frozenset(
    {
        "data_dir",
        "seed",
        "ema_decays",
        "ema_debias",
        "bema",
        "bema_start_step",
        "switch_ema",
        "switch_every",
        "monitors",
        "perturb",
        "perturb_draws",
        "progress",
    }
)
"""The :class:`Config` fields a method's runs may set apart from the sweep's: the averages,
the seed and what is only measured or shown. Every other field is the protocol, and must
match for the pairing to mean anything."""

BATCH_NORM_ROWS = ("raw", "ema + raw statistics", "ema + averaged statistics", "ema + recalibrated")


def load_method_runs(directory: Path) -> list[dict[str, Any]]:
    """The runs under ``directory``: ``train_rul``'s outputs (``seed<k>/history.json``) and
    a sweep's runs (``<model>/seed<k>.json``)."""
    if not directory.is_dir():
        raise ValueError(f"--methods {directory}: no such directory")
    files = sorted(directory.glob("seed*/history.json"), key=lambda p: int(p.parent.name[4:]))
    runs = [json.loads(f.read_text()) for f in files]
    for results in load_runs(directory).values():
        runs += results
    if not runs:
        raise ValueError(
            f"--methods {directory}: no runs there (expected <model>/seed<k>.json from "
            "experiments.sweep or seed<k>/history.json from experiments.train_rul)"
        )
    return runs


def method_label(cfg: Config) -> str:
    """What the run averaged with, in words."""
    if cfg.bema:
        burn_in = f"θ₀ at step {cfg.bema_start_step}" if cfg.bema_start_step else "no burn-in"
        return f"BEMA (TRL's defaults, {burn_in})"
    if cfg.switch_ema:
        every = "every epoch" if cfg.switch_every == 1 else f"every {cfg.switch_every} epochs"
        debiased = " debiased" if cfg.ema_debias[0] else ""
        return f"Switch EMA {every}, its EMA {cfg.ema_decays[0]:g}{debiased}"
    raise ValueError(
        f"--methods: a run of seed {cfg.seed} uses neither --bema nor --switch-ema: "
        "the sweep's own runs belong in --runs"
    )


def protocol_differences(method: Config, sweep: Config) -> list[str]:
    """``"name=... there, ... in the sweep"`` for each protocol field that differs."""
    return [
        f"{f.name}={getattr(method, f.name)!r} there, {getattr(sweep, f.name)!r} in the sweep"
        for f in fields(Config)
        if f.name not in METHOD_FIELDS and getattr(method, f.name) != getattr(sweep, f.name)
    ]


def _row(name: str, test: Sequence[float], raw: Sequence[float], ema: Sequence[float]) -> str:
    d_raw, d_ema = differences(test, raw), differences(test, ema)
    n = len(test)
    return (
        f"| {name} | {n} | {fmt(test)} | {fmt(d_raw)} | {sum(d < 0 for d in d_raw)} of {n} | "
        f"{fmt(d_ema)} | {sum(d < 0 for d in d_ema)} of {n} |"
    )


def _method_rows(
    sweep: dict[str, list[dict[str, Any]]], directory: Path, runs: list[dict[str, Any]]
) -> list[str]:
    cfg = Config.from_json(runs[0]["config"])
    name = f"{cfg.model}-refit" if cfg.refit_all else cfg.model
    reference = {r["config"]["seed"]: r for r in sweep.get(name, [])}
    if not reference:
        raise ValueError(f"--methods {directory}: --runs has no {name} runs to pair with")
    differ = protocol_differences(cfg, Config.from_json(next(iter(reference.values()))["config"]))
    if differ:
        raise ValueError(f"--methods {directory}: not the sweep's protocol: {'; '.join(differ)}")
    mine = [r for r in runs if r["config"]["seed"] in reference]
    if not mine:
        return []
    averaged = cfg.variants[1]  # the run's average ("bema", or Switch EMA's tracked EMA)
    last = [reference[r["config"]["seed"]]["test"]["last"] for r in mine]
    return [
        _row(
            f"{name}, {method_label(cfg)}",
            [r["test"]["last"][averaged]["rmse"] for r in mine],
            [t["raw"]["rmse"] for t in last],
            [t[HEADLINE_EMA]["rmse"] for t in last],
        )
    ]


def _batch_norm_rows(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"--batch-norm-results {path}: no such file")
    stored = json.loads(path.read_text())["runs"]
    model = stored[0]["config"]["model"] + ("-refit" if stored[0]["config"]["refit_all"] else "")
    raw = [r["test"]["raw"]["rmse"] for r in stored]
    ema = [r["test"]["ema + averaged statistics"]["rmse"] for r in stored]
    return [
        _row(f"{model}, {label}", [r["test"][label]["rmse"] for r in stored], raw, ema)
        for label in BATCH_NORM_ROWS
    ]


def claim_methods(
    sweep: dict[str, list[dict[str, Any]]], methods: Sequence[Path], batch_norm: Path | None
) -> list[str]:
    """Section 6's lines (none when neither ``methods`` nor ``batch_norm`` is given).
    ``sweep``: :func:`~experiments.runs.load_runs` of ``--runs``; ``methods``: directories
    of one method's runs each; ``batch_norm``: ``batch_norm_study``'s JSON. A method's seeds
    with no sweep run are left out (the seeds column counts the pairs)."""
    rows: list[str] = []
    for directory in methods:
        rows += _method_rows(sweep, directory, load_method_runs(directory))
    if batch_norm is not None:
        rows += _batch_norm_rows(batch_norm)
    if not rows:
        return []
    return [
        "## 6. Other averages on the headline configuration (test RMSE, rule `last`)",
        "",
        "BEMA and Switch EMA against the raw weights and the EMA 0.999 debiased of the same "
        "seeds' sweep runs of the same configuration; the BatchNorm model (`cnn_gru_bn`) "
        "against its own runs' raw weights and EMA with averaged statistics. "
        "Δ = row − reference, paired by seed.",
        "",
        "| weights | seeds | test RMSE | Δ vs raw | lower than raw | Δ vs EMA | lower than EMA |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
