"""Compare window lengths on a test-like validation set (a selection check, no test data).

    python -m experiments.window_check --data-dir ../shared/data/cmapss --windows 30 40 --seeds 0 1

The standard validation set holds the windows that end at cycles ``≥ window`` of the
validation engines, so it differs between window lengths; the test set holds the last window
of each test engine, front-padded when the engine is shorter than the window. Here each
validation engine is cut at every cycle ``≥ 31`` (:func:`experiments.cmapss.truncated_engines`)
and scored like a test engine, so every window length is judged on the same endpoints, with
the same padding the test set gets. Training is ``train_rul``'s (same options); the printed
"test" figures of that run are these truncated *validation* engines.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from experiments import cmapss, extras
from experiments.cli import ConfigFlags
from experiments.config import COUNT, INDEX, Config
from experiments.synthetic import generate
from experiments.training import run

PROG = "python -m experiments.window_check"

FLAGS = ConfigFlags().without("window", "seed", "members", "progress")
"""Every ``train_rul`` flag but those this check sets itself (``--windows``, ``--seeds``),
``--members`` (it compares single models) and ``--no-progress`` (it prints one line a run)."""


def check(base: Config, windows: Sequence[int], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One ``train_rul`` run of ``base`` per (seed, window); returns its test-like
    validation RMSEs."""
    raw = (
        generate(seed=0)
        if base.data_dir is None
        else cmapss.read_subset(base.data_dir, base.subset)
    )
    rows = []
    for seed in seeds:
        _, val_units = cmapss.split_units(raw.train[:, 0], 0.2, seed)
        pseudo = cmapss.truncated_engines(raw, val_units)
        for window in windows:
            cfg = replace(base, seed=seed, window=window)
            ds = cmapss.prepare(pseudo, seed=seed, **cfg.preprocessing())
            result, _ = run(cfg, ds)
            row: dict[str, Any] = {"seed": seed, "window": window, "endpoints": len(ds.x_test)}
            for rule in ("last", "best"):
                row[rule] = {k: round(v["rmse"], 3) for k, v in result["test"][rule].items()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    extras.require(PROG)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument(
        "--windows",
        type=COUNT.parse,
        nargs="+",
        default=[30, 40],
        help="window lengths to compare (default: 30 40)",
    )
    p.add_argument(
        "--seeds",
        type=INDEX.parse,
        nargs="+",
        default=[0],
        help="seeds, each its own validation split (default: 0)",
    )
    FLAGS.add_to(p)
    args, base = FLAGS.parse(p, argv, progress=False)
    return check(base, args.windows, args.seeds)


__all__ = ["check", "main"]

if __name__ == "__main__":
    main()
