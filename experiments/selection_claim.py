"""Section 5 of :mod:`experiments.claims`: choosing the average after training.

Post-hoc EMA (:mod:`experiments.posthoc_study`'s JSON, ``--posthoc``) and early stopping
(:mod:`experiments.early_stopping`'s, ``--early-stopping-results``), each against the raw
weights and the tracked EMA 0.999 debiased of the split sweep runs of its seeds (both studies
select on validation, so they pair with the split runs). Training never reads the averages, so
a run of the same configuration and seed has the same raw trajectory: the pairing is by seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from experiments import early_stopping
from experiments.config import Config
from experiments.methods_claim import (
    HEADLINE_EMA,
    PAIRED_HEADER,
    against_sweep,
    check_protocol,
    read_json,
)

STOPPED_MODEL = early_stopping.chosen(None, patience=1, epochs=1).model
"""The one model :mod:`experiments.early_stopping` trains."""


def _study(path: Path, flag: str, key: str, writer: str) -> dict[str, Any]:
    """``writer``'s JSON given as ``flag``, checked to hold its list ``key``."""
    stored = read_json(path, flag)
    if not isinstance(stored, dict) or not isinstance(stored.get(key), list) or not stored[key]:
        raise ValueError(f'{flag} {path}: no "{key}" in it (is it {writer}\'s JSON?)')
    return stored


def _paired_seeds(
    flag: str, path: Path, name: str, seeds: Sequence[int], sweep: dict[int, Any], notes: list[str]
) -> list[int]:
    """The ``seeds`` with a sweep run; the others named in ``notes``; none is an error."""
    notes += [
        f"Left out: {path} ({flag}): seed {s} has no {name} sweep run."
        for s in seeds
        if s not in sweep
    ]
    kept = [s for s in seeds if s in sweep]
    if not kept:
        raise ValueError(
            f"{flag} {path}: none of its {name} seeds {list(seeds)} has a split run in --runs; "
            "give --runs the sweep's runs of the same configuration"
        )
    return kept


def _check_protocols(
    flag: str, path: Path, name: str, stored: dict[int, Any], sweep: dict[int, Any]
) -> None:
    """:func:`check_protocol` of each seed's ``stored`` config against its sweep run's,
    without early stopping (the stoppers only cut a run short)."""
    for seed, config in stored.items():
        method = replace(Config.from_json(config), early_stopping=None)
        check_protocol(flag, path, name, method, Config.from_json(sweep[seed]["config"]))


def claim_selection(
    runs: dict[str, list[dict[str, Any]]], posthoc: Path | None, early: Path | None
) -> list[str]:
    """Section 5's lines (none when neither study is given). ``runs``: the sweep's split
    runs by name; ``posthoc``: ``posthoc_study``'s JSON; ``early``: ``early_stopping``'s.
    Rows for the models the studies ran, each against the sweep runs of its own seeds
    (:func:`against_sweep`), after two reference rows over every split run of that model;
    seeds without a sweep run are named under the table. Post-hoc runs, and early-stopping
    seeds that store their configuration, are checked against the sweep run of their seed
    (:func:`check_protocol`; the stoppers aside, which only cut a run short).

    Raises:
      ValueError naming the flag and path: an unreadable file or one of another kind, a run
      of another protocol, a study none of whose seeds has a sweep run.
    """
    flag_es = "--early-stopping-results"
    post = _study(posthoc, "--posthoc", "runs", "posthoc_study")["runs"] if posthoc else []
    stops = _study(early, flag_es, "seeds", "early_stopping")["seeds"] if early else []
    rows: list[str] = []
    notes: list[str] = []
    paired_any = {"--posthoc": False, flag_es: False}
    for name, results in runs.items():
        by_seed = {r["config"]["seed"]: r for r in results}
        model = Config.from_json(results[0]["config"]).model
        studied: list[str] = []
        mine = {r["config"]["seed"]: r for r in post if r["config"]["model"] == model}
        if posthoc and mine:
            seeds = _paired_seeds("--posthoc", posthoc, name, list(mine), by_seed, notes)
            _check_protocols(
                "--posthoc", posthoc, name, {s: mine[s]["config"] for s in seeds}, by_seed
            )
            studied.append(
                against_sweep(
                    f"{name}, post-hoc EMA, σ_rel chosen on validation",
                    [mine[s]["test_rmse"]["posthoc"] for s in seeds],
                    [by_seed[s] for s in seeds],
                )
            )
            paired_any["--posthoc"] = True
            own = [mine[s]["test_rmse"].get("raw") for s in seeds]
            if None not in own:  # the premise of the pairing: the same raw trajectory
                gap = max(
                    abs(o - by_seed[s]["test"]["last"]["raw"]["rmse"])
                    for o, s in zip(own, seeds, strict=True)
                )
                notes.append(
                    f"The post-hoc runs' own raw weights are within {gap:.3f} test RMSE of "
                    f"their {name} sweep runs' (the same raw trajectory, seed by seed)."
                )
        if early and model == STOPPED_MODEL:
            by_stop = {r["seed"]: r for r in stops}
            seeds = _paired_seeds(flag_es, early, name, list(by_stop), by_seed, notes)
            stored = {s: by_stop[s]["config"] for s in seeds if "config" in by_stop[s]}
            _check_protocols(flag_es, early, name, stored, by_seed)  # files since it stores them
            for key, label in early_stopping.LABELS.items():
                studied.append(
                    against_sweep(
                        f"{name}, {label}",
                        [by_stop[s][key]["test_rmse"] for s in seeds],
                        [by_seed[s] for s in seeds],
                    )
                )
            paired_any[flag_es] = True
        if studied:
            every = [by_seed[s] for s in sorted(by_seed)]
            last = [r["test"]["last"] for r in every]
            rows += [
                against_sweep(
                    f"{name}, raw (raw reference)", [t["raw"]["rmse"] for t in last], every
                ),
                against_sweep(
                    f"{name}, EMA 0.999 debiased, last (EMA reference)",
                    [t[HEADLINE_EMA]["rmse"] for t in last],
                    every,
                ),
                *studied,
            ]
    for flag, path in (("--posthoc", posthoc), (flag_es, early)):
        if path and not paired_any[flag]:
            raise ValueError(
                f"{flag} {path}: --runs has no split runs of its model to pair with; give --runs "
                "the sweep's runs of the same configuration"
            )
    if any("config" not in r for r in stops):
        notes.append(
            f"Not checked: {early} ({flag_es}) is paired by seed only; it does not store its "
            "runs' configurations (written before early_stopping did), so their protocol is "
            "not compared with the sweep's."
        )
    if not rows:
        return []
    return [
        "## 5. Choosing the average: post-hoc EMA and early stopping (test RMSE, split runs)",
        "",
        "Each row against the raw final weights and the EMA 0.999 debiased (rule `last`) of "
        "the same seeds' sweep runs; Δ = row − reference, paired by seed (the seeds column "
        "counts the pairs; the two reference rows cover every split run). Post-hoc: σ_rel "
        "chosen on validation among 24 synthesized; early stopping: Keras's rule, patience 10, "
        "on the validation loss of the weights named, each stopper's best weights.",
        "",
        *PAIRED_HEADER,
        *rows,
        "",
        *notes,
        *([""] if notes else []),
    ]
