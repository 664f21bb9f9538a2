"""Stored runs: where a finished run is written, how the studies read runs back, and what a
β sweep's run holds.

A finished ``train_rul`` run is one JSON file (``config``, per-epoch ``rows``, ``test``
metrics per rule and variant). The sweep keeps ``<runs>/<model>[-refit]/seed<k>.json``
(:func:`run_path`, :func:`load_runs`); the early-stopping and post-hoc studies keep
``<runs>/seed<k>.json`` (:func:`load_seeds`). A resumed study reuses a stored run only if it
was made with the same configuration (:func:`check_same_config`). JAX-free.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

from experiments.config import Config
from experiments.stats import differences, percent_differences

DECAYS = (0.9, 0.99, 0.999, 0.9999)
"""The decays of the β sweep, each kept plain and bias-corrected."""
SWEEP_DECAYS = DECAYS * 2
SWEEP_DEBIAS = (False,) * len(DECAYS) + (True,) * len(DECAYS)
RULES = ("last", "best")
"""The selection rules every run reports (:mod:`experiments.selection`)."""
REFIT_SUFFIX = "-refit"  # runs directory of a model retrained on all training engines


def run_name(model: str, refit_all: bool) -> str:
    """``<model>[-refit]``: the directory the sweep stores a model's runs in, and its report's
    name for them."""
    return model + (REFIT_SUFFIX if refit_all else "")


def run_path(runs_dir: Path, cfg: Config) -> Path:
    """``<runs>/<model>[-refit]/seed<k>.json``: where the sweep stores the run of ``cfg``."""
    return runs_dir / run_name(cfg.model, cfg.refit_all) / f"seed{cfg.seed}.json"


def load_runs(runs_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """``{model: [result, ...]}`` from ``<runs_dir>/<model>/seed*.json``, seeds in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for model_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        files = sorted(model_dir.glob("seed*.json"), key=lambda p: int(p.stem[4:]))
        if files:
            out[model_dir.name] = [json.loads(f.read_text()) for f in files]
    return out


def load_seeds(runs_dir: Path, seeds: Iterable[int]) -> list[dict[str, Any]]:
    """The stored ``<runs_dir>/seed<k>.json`` of each of ``seeds`` that exists, in order."""
    paths = [runs_dir / f"seed{seed}.json" for seed in seeds]
    return [json.loads(path.read_text()) for path in paths if path.exists()]


def stored_config(results: list[dict[str, Any]]) -> Config:
    """The :class:`Config` of the first of a model's stored runs (they differ in seed)."""
    return Config.from_json(results[0]["config"])


def config_differences(
    a: Config, b: Config, ignore: Collection[str] = ("progress",)
) -> list[tuple[str, Any, Any]]:
    """``(field, a's value, b's value)`` for every :class:`Config` field outside ``ignore``
    in which ``a`` and ``b`` differ."""
    return [
        (f.name, getattr(a, f.name), getattr(b, f.name))
        for f in fields(Config)
        if f.name not in ignore and getattr(a, f.name) != getattr(b, f.name)
    ]


def check_same_config(path: Path, cfg: Config) -> None:
    """Exit naming the settings in which the stored run at ``path`` differs from ``cfg``:
    a resumed sweep must not mix runs of different configurations in one table."""
    stored = Config.from_json(json.loads(path.read_text())["config"])
    differ = [f"{n}={a!r} there, {b!r} now" for n, a, b in config_differences(stored, cfg)]
    if differ:
        raise SystemExit(
            f"{path} was run with other settings ({', '.join(differ)}); "
            "use another --runs directory or delete it"
        )


def summarise(results: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    """Per variant: lists over seeds of val/test RMSE, score, and paired EMA−raw diffs."""
    variants = list(results[0]["test"][rule])
    raw = [r["test"][rule]["raw"] for r in results]
    rows = []
    for name in variants:
        per = [r["test"][rule][name] for r in results]
        rmse, base = [m["rmse"] for m in per], [b["rmse"] for b in raw]
        rows.append(
            {
                "variant": name,
                "val_rmse": [m["val_rmse"] for m in per],
                "rmse": rmse,
                "score": [m["score"] for m in per],
                "d_rmse": differences(rmse, base),
                "d_rmse_pct": percent_differences(rmse, base),
                "d_score": differences([m["score"] for m in per], [b["score"] for b in raw]),
                "epoch": [m["epoch"] for m in per],
            }
        )
    return rows


__all__ = [
    "DECAYS",
    "REFIT_SUFFIX",
    "RULES",
    "SWEEP_DEBIAS",
    "SWEEP_DECAYS",
    "check_same_config",
    "config_differences",
    "load_runs",
    "load_seeds",
    "run_name",
    "run_path",
    "stored_config",
    "summarise",
]
