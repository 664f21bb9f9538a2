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
from typing import Any

from experiments import cmapss
from experiments.train_rul import cli_config, parse_args, preprocessing, run


def check(args: argparse.Namespace, windows: Sequence[int], seeds: Sequence[int]) -> list[dict]:
    """One ``train_rul`` run per (seed, window); returns its test-like validation RMSEs."""
    if args.data_dir is None:
        from experiments.synthetic import generate

        raw = generate(seed=0)
    else:
        raw = cmapss.read_subset(args.data_dir, args.subset)
    rows = []
    for seed in seeds:
        _, val_units = cmapss.split_units(raw.train[:, 0], 0.2, seed)
        pseudo = cmapss.truncated_engines(raw, val_units)
        for window in windows:
            args.window = window
            cfg = cli_config(args, seed=seed, progress=False)
            ds = cmapss.prepare(pseudo, seed=seed, **preprocessing(cfg))
            result, _ = run(cfg, ds)
            row: dict[str, Any] = {"seed": seed, "window": window, "endpoints": len(ds.x_test)}
            for rule in ("last", "best"):
                row[rule] = {k: round(v["rmse"], 3) for k, v in result["test"][rule].items()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, nargs="+", default=[30, 40])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    own, rest = p.parse_known_args(argv)
    args = parse_args(rest)  # every train_rul option (model, epochs, lr, ...)
    if args.members != 1:
        raise SystemExit("window_check compares single models: drop --members")
    return check(args, own.windows, own.seeds)


__all__ = ["check", "main"]

if __name__ == "__main__":
    main()
