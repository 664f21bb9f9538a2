"""Section 6 of :mod:`experiments.claims`: BEMA, Switch EMA and BatchNorm statistics, and the
pairing it shares with section 5 (:mod:`experiments.selection_claim`).

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
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.batch_norm_study import VARIANTS as BATCH_NORM_ROWS
from experiments.config import Config, variant_name
from experiments.runs import config_differences, run_name
from experiments.stats import differences, fmt

HEADLINE_EMA = variant_name(0.999, True)
"""The tracked EMA every method is compared with (the headline's deployed weights)."""

METHOD_FIELDS = frozenset(
    {
        "seed",
        "ema_decays",
        "ema_debias",
        "bema",
        "bema_start_step",
        "switch_ema",
        "switch_every",
        "perturb",
        "perturb_draws",
        "progress",
    }
)
"""The :class:`Config` fields a method's runs may set apart from the sweep's: the averages
(training does not read BEMA's; Switch EMA's are the method), the seed and what is only
measured after training or shown. ``data_dir`` may differ as a path to the same real data,
``monitors`` only when nothing stops early; every other field is the protocol, and must
match for the pairing to mean anything."""


def read_json(path: Path, flag: str) -> Any:
    """The JSON file given as ``flag``; ``ValueError`` naming both if it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {path}: not a readable JSON file ({err})") from err


def load_method_runs(directory: Path) -> dict[str, list[dict[str, Any]]]:
    """``{sweep name: [run, ...]}`` of the runs under ``directory``: ``train_rul``'s outputs
    (``seed<k>/history.json``, named by their config) and a sweep's (``<name>/seed<k>.json``).
    """
    if not directory.is_dir():
        raise ValueError(f"--methods {directory}: no such directory")
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(directory.glob("seed*/history.json")):
        if re.fullmatch(r"seed\d+", path.parent.name):
            run = read_json(path, "--methods")
            out.setdefault(sweep_name(run), []).append(run)
    for path in sorted(directory.glob("*/seed*.json")):  # the order of load_runs
        if re.fullmatch(r"seed\d+", path.stem):
            out.setdefault(path.parent.name, []).append(read_json(path, "--methods"))
    if not out:
        raise ValueError(
            f"--methods {directory}: no runs there (expected <model>/seed<k>.json from "
            "experiments.sweep or seed<k>/history.json from experiments.train_rul)"
        )
    return out


def sweep_name(run: dict[str, Any]) -> str:
    """The name the sweep stores a run of this configuration under: ``cnn_gru-refit``."""
    return run_name(run["config"]["model"], bool(run["config"].get("refit_all")))


def method_label(cfg: Config) -> str | None:
    """What the run averaged with, in words; ``None`` for a plain EMA run (a sweep's)."""
    if cfg.bema:
        burn_in = f"θ₀ at step {cfg.bema_start_step}" if cfg.bema_start_step else "no burn-in"
        return f"BEMA (TRL's defaults, {burn_in})"
    if cfg.switch_ema:
        every = "every epoch" if cfg.switch_every == 1 else f"every {cfg.switch_every} epochs"
        debiased = " debiased" if cfg.ema_debias[0] else ""
        return f"Switch EMA {every}, its EMA {cfg.ema_decays[0]:g}{debiased}"
    return None


def protocol_differences(method: Config, sweep: Config) -> list[str]:
    """``"name=... there, ... in the sweep"`` for each protocol setting that differs."""
    ignore = set(METHOD_FIELDS)
    if (method.data_dir is None) == (sweep.data_dir is None):  # both real data, or both not
        ignore.add("data_dir")
    if method.early_stopping is None and sweep.early_stopping is None:
        ignore.add("monitors")
    return [
        f"{name}={a!r} there, {b!r} in the sweep"
        for name, a, b in config_differences(method, sweep, ignore)
    ]


def check_protocol(flag: str, source: Path, name: str, method: Config, sweep: Config) -> None:
    """Refuse, naming ``flag``, ``source`` and the settings, a run of ``name`` that is not
    the protocol of the sweep run of its seed (:func:`protocol_differences`)."""
    differ = protocol_differences(method, sweep)
    if differ:
        raise ValueError(
            f"{flag} {source}: {name} seed {method.seed} is not the sweep's protocol "
            f"({'; '.join(differ)}): pair it with --runs of the same settings"
        )


PAIRED_HEADER = (
    "| weights | seeds | test RMSE | Δ vs raw | lower than raw | Δ vs EMA | lower than EMA |",
    "|---|---|---|---|---|---|---|",
)
"""The header of :func:`paired_row`'s table (sections 5 and 6)."""


def paired_row(name: str, test: Sequence[float], raw: Sequence[float], ema: Sequence[float]) -> str:
    """A table row: ``test`` against the two references of the same seeds, ``raw`` and the
    tracked ``ema``: each difference ``test − reference`` and how many seeds it is below."""
    d_raw, d_ema = differences(test, raw), differences(test, ema)
    n = len(test)
    return (
        f"| {name} | {n} | {fmt(test)} | {fmt(d_raw)} | {sum(d < 0 for d in d_raw)} of {n} | "
        f"{fmt(d_ema)} | {sum(d < 0 for d in d_ema)} of {n} |"
    )


def against_sweep(name: str, test: Sequence[float], sweep: Sequence[dict[str, Any]]) -> str:
    """:func:`paired_row` of ``test`` against ``sweep``, the sweep runs of the same seeds in
    the same order: their raw weights and :data:`HEADLINE_EMA` (rule ``last``)."""
    last = [run["test"]["last"] for run in sweep]
    return paired_row(
        name, test, [t["raw"]["rmse"] for t in last], [t[HEADLINE_EMA]["rmse"] for t in last]
    )


def _references(sweep: dict[str, list[dict[str, Any]]], name: str) -> dict[int, dict[str, Any]]:
    """The sweep's plain-EMA runs named ``name`` by seed, each checked to hold the headline EMA."""
    reference = {}
    for run in sweep.get(name, []):
        cfg = Config.from_json(run["config"])
        if method_label(cfg) is not None or HEADLINE_EMA not in cfg.variants:
            raise ValueError(
                f"--runs: {name} seed {cfg.seed} is not a sweep run with {HEADLINE_EMA} "
                f"({method_label(cfg) or cfg.variants}): give --runs the β sweep's runs"
            )
        reference[cfg.seed] = run
    return reference


def _method_rows(
    sweep: dict[str, list[dict[str, Any]]], directory: Path
) -> tuple[list[str], list[str]]:
    """Rows of the runs under ``directory``, one per sweep name and method, and notes on the
    seeds left out (no sweep run of that seed)."""
    rows, notes = [], []
    for name, runs in load_method_runs(directory).items():
        reference = _references(sweep, name)
        if not reference:
            raise ValueError(
                f"--methods {directory}: --runs has no {name} runs to pair with; give --runs "
                "the sweep's runs of the same configuration"
            )
        groups: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            cfg = Config.from_json(run["config"])
            label = method_label(cfg)
            if label is None:
                raise ValueError(
                    f"--methods {directory}: {name} seed {cfg.seed} uses neither --bema nor "
                    "--switch-ema: the sweep's own runs belong in --runs"
                )
            if cfg.seed not in reference:
                notes.append(f"{directory} ({label}): seed {cfg.seed} has no {name} sweep run")
                continue
            base = Config.from_json(reference[cfg.seed]["config"])
            check_protocol("--methods", directory, name, cfg, base)
            if any(r["config"]["seed"] == cfg.seed for r in groups.get(label, [])):
                raise ValueError(f"--methods {directory}: {label}, seed {cfg.seed} twice")
            groups.setdefault(label, []).append(run)
        if not groups:
            raise ValueError(
                f"--methods {directory}: none of its {name} seeds has a sweep run in --runs"
            )
        for label, mine in groups.items():
            averaged = Config.from_json(mine[0]["config"]).variants[1]  # its one average
            rows.append(
                against_sweep(
                    f"{name}, {label}",
                    [r["test"]["last"][averaged]["rmse"] for r in mine],
                    [reference[r["config"]["seed"]] for r in mine],
                )
            )
    return rows, notes


def _batch_norm_rows(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"--batch-norm-results {path}: no such file")
    stored = read_json(path, "--batch-norm-results").get("runs") or []
    if not stored:
        raise ValueError(f"--batch-norm-results {path}: no runs in it")
    name = sweep_name(stored[0])
    raw = [r["test"]["raw"]["rmse"] for r in stored]
    ema = [r["test"]["ema + averaged statistics"]["rmse"] for r in stored]
    references = {"raw": " (raw reference)", "ema + averaged statistics": " (EMA reference)"}
    return [
        paired_row(
            f"{name}, {label}{references.get(label, '')}",
            [r["test"][label]["rmse"] for r in stored],
            raw,
            ema,
        )
        for label in BATCH_NORM_ROWS
    ]


def claim_methods(
    sweep: dict[str, list[dict[str, Any]]], methods: Sequence[Path], batch_norm: Path | None
) -> list[str]:
    """Section 6's lines (none when neither ``methods`` nor ``batch_norm`` is given).
    ``sweep``: :func:`~experiments.runs.load_runs` of ``--runs``; ``methods``: directories
    of BEMA or Switch EMA runs; ``batch_norm``: ``batch_norm_study``'s JSON. Every method run
    is checked against the sweep run of its seed; a seed with no sweep run is left out and
    named under the table (the seeds column counts the pairs).

    Raises:
      ValueError naming the flag and path: unreadable input, a method run of another
      protocol or none, a seed twice, no seed to pair, ``--runs`` without the plain sweep
      runs to pair with.
    """
    rows: list[str] = []
    notes: list[str] = []
    for directory in methods:
        more, left_out = _method_rows(sweep, directory)
        rows += more
        notes += left_out
    if batch_norm is not None:
        rows += _batch_norm_rows(batch_norm)
    if not rows:
        return []
    return [
        "## 6. BEMA, Switch EMA and BatchNorm statistics (test RMSE, rule `last`)",
        "",
        "BEMA and Switch EMA against the raw weights and the EMA 0.999 debiased of the same "
        "seeds' sweep runs of the same configuration; the BatchNorm model (`cnn_gru_bn`) "
        "against its own runs' raw weights and EMA with averaged statistics. "
        "Δ = row − reference, paired by seed.",
        "",
        *PAIRED_HEADER,
        *rows,
        "",
        *[f"Left out: {note}." for note in notes],
        *([""] if notes else []),
    ]
