"""Train a RUL model on C-MAPSS with EMAs of its weights; evaluate raw and EMA weights.

    python -m experiments.train_rul --out runs/demo                       # synthetic default
    python -m experiments.train_rul --data-dir ../shared/data/cmapss --out runs/fd001

One training run keeps every requested average at once (``ema_jax.ema`` with a tuple of
decays), so "raw" and each EMA variant see the same data order, dropout masks and
initialisation: their differences are paired by construction.

Loss: MSE of the normalised RUL (``RUL / max_rul``); reported RMSE is in cycles.

Model selection uses validation only, with two documented rules, both reported:

* ``last``: the weights at the end of training (no selection; the deployment the seed
  describes: train N epochs, ship the EMA weights);
* ``best``: per variant, the epoch with the lowest validation RMSE (its weights are kept
  on the host when they improve);
* ``early`` (with ``--early-stopping PATIENCE``): per ``--monitor``, the best weights of an
  ``ema_jax.EarlyStopping`` on that value; the run ends once every monitor has stopped
  (training uses the raw params only, so one run carries them all, paired).

The test split is read once, after training, for every rule and variant.

``--refit-all`` is the second stage of the usual protocol: choose the model, epoch count
and EMA variant on the validation split, then retrain that choice on *all* training
engines (no validation engines left) for that many epochs and deploy the final weights.
Nothing is selected in such a run: the per-epoch "validation" columns then monitor a
fixed subsample of the training windows (dropout off), and the ``best`` rule is the
final epoch, identical to ``last``.

Outputs in ``--out``: ``history.json`` (config, per-epoch rows, final results),
``history.csv`` (per-epoch rows), ``curves.png`` (raw vs EMA), ``ema_params/`` (the EMA
weights, Orbax).

The command line over :mod:`experiments.training` (the run), :mod:`experiments.selection`
(the rules) and :mod:`experiments.reporting` (what is written and printed).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments import extras, reporting
from experiments.cli import ConfigFlags
from experiments.training import data_problem, load_data, run

PROG = "python -m experiments.train_rul"
FLAGS = ConfigFlags()
"""``train_rul`` sets every :class:`Config` field from its command line."""


def parser() -> argparse.ArgumentParser:
    """``train_rul``'s command line: every :class:`Config` flag, and ``--out``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a RUL model on C-MAPSS with EMAs of its weights; "
        "report raw and EMA validation/test metrics.",
    )
    FLAGS.add_to(p)
    p.add_argument(
        "--out", default="runs/train_rul", help="output directory (default: runs/train_rul)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, report, write ``--out``; returns the run's result (:func:`training.run`)."""
    extras.require(PROG)
    p = parser()
    args, cfg = FLAGS.parse(p, argv)
    out = Path(args.out)
    problem = _out_problem(out)
    if problem is None:
        ds = load_data(cfg)
        problem = data_problem(cfg, ds)
    if problem is not None:  # before training: one line naming the flag, exit status 2
        p.error(problem)
    print(
        f"data: {cfg.data_dir or 'synthetic default'} {cfg.subset}  train {len(ds.x_train)}  "
        f"val {len(ds.x_val)}  test {len(ds.x_test)} windows, {len(ds.features)} features"
    )
    steps = cfg.epochs * (len(ds.x_train) // cfg.batch_size)
    notes = reporting.initial_weight_notes(cfg, steps) + reporting.short_window_notes(cfg, steps)
    for note in notes:
        print(note)
    result, state = run(cfg, ds)
    reporting.write_history(result, out)
    reporting.plot_curves(result, out / "curves.png")
    reporting.export_ema(state, cfg.variants, out / "ema_params")
    print("\n" + reporting.results_table(result["test"]))
    print("\n" + reporting.verdict(result["test"]))
    hint = reporting.where_the_gain_shows(result["test"])
    if hint:
        print(hint)
    print(f"wrote {out}/history.json, history.csv, curves.png, ema_params/")
    return result


def _out_problem(out: Path) -> str | None:
    """Why ``--out`` cannot be written (a file, or under one; not writable), or ``None``."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        where = "is" if existing == out else f"is under {existing}, which is"
        return f"argument --out: {out} {where} a file, not a directory"
    if not os.access(existing, os.W_OK):
        return f"argument --out: {existing} is not writable"
    return None


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
