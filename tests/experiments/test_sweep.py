"""experiments.sweep: the tables pair by seed and select on validation only; the command line
trains, resumes and keeps test figures off the console."""

import dataclasses
import json
import re

import numpy as np
import pytest

from experiments import sweep
from experiments.config import Config
from experiments.runs import REFIT_SUFFIX, summarise


def _fake(seed, val, test):
    variants = ["raw", "ema0.9"]
    metrics = {
        n: {"val_rmse": v, "rmse": t, "score": 10 * t, "epoch": 3}
        for n, v, t in zip(variants, val, test, strict=True)
    }
    cfg = dataclasses.asdict(Config(epochs=3, batch_size=8, seed=seed, perturb=(0.01,)))
    return {"config": cfg, "rows": [], "test": {"last": metrics, "best": metrics}}


def test_sweep_table_pairs_by_seed_and_selects_on_validation_only():
    # ema0.9 is better on validation but worse on test: the table must still pick it
    runs = {"m": [_fake(s, [14.0 + s, 13.0 + s], [12.0 + s, 12.5 + s]) for s in range(3)]}
    rows = {r["variant"]: r for r in summarise(runs["m"], "last")}
    np.testing.assert_allclose(rows["ema0.9"]["d_rmse"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(rows["ema0.9"]["d_rmse_pct"], [50 / (12 + s) for s in range(3)])
    text = sweep.markdown(runs, "cmd")
    best = text.split("## Best configuration")[1]
    assert "weights `ema0.9`" in best
    assert "test RMSE 13.50 ± " in best
    # the reproducing command: the flags that differ from the sweep's defaults
    assert (
        "Runs: `python -m experiments.sweep --models m --seeds 3 --epochs 3 --batch-size 8 "
        "--perturb 0.01`" in text
    )


def test_sweep_picks_a_best_configuration_per_rule_without_ranking_the_rules():
    """Under rule ``best`` the validation RMSE is the minimum of the curve it selects on, so
    it would win any comparison with ``last``: each rule gets its own pick instead."""
    runs = {"m": [_fake(s, [14.0, 13.0], [12.0, 12.5]) for s in range(2)]}
    for r in runs["m"]:  # raw's best epoch looks better on validation than anything `last`
        r["test"]["best"] = {**r["test"]["last"], "raw": {**r["test"]["last"]["raw"]}}
        r["test"]["best"]["raw"].update(val_rmse=11.0, rmse=15.0, epoch=1)
    section = sweep.markdown(runs, "cmd").split("## Best configuration per rule")[1]
    last = next(line for line in section.splitlines() if line.startswith("- rule `last`"))
    best = next(line for line in section.splitlines() if line.startswith("- rule `best`"))
    assert "weights `ema0.9`" in last and "test RMSE 12.50" in last
    assert "weights `raw`" in best and "validation RMSE 11.00" in best


def test_sweep_cli_runs_resumes_and_keeps_test_figures_off_the_console(
    tiny_data_dir, tmp_path, capsys
):
    """``sweep.main`` end to end (one seed, two epochs): the run JSON, table and plot are
    written; the console names validation RMSE only; a second call trains nothing; the
    report's default name is the runs directory's."""
    data = str(tiny_data_dir)
    argv = ["--data-dir", data, "--models", "dcnn", "--seeds", "1", "--epochs", "2"]
    argv += ["--batch-size", "32", "--perturb", "--runs", str(tmp_path / "tiny_runs")]
    argv += ["--out", str(tmp_path), "--name", "tiny"]
    sweep.main(argv)
    printed = capsys.readouterr().out
    assert re.search(r"dcnn seed 0: val RMSE raw \d+\.\d\d  ema0\.999 \d+\.\d\d", printed)
    progress = [line for line in printed.splitlines() if " seed " in line]
    assert len(progress) == 1 and "test" not in progress[0].lower()
    stored = json.loads((tmp_path / "tiny_runs" / "dcnn" / "seed0.json").read_text())
    assert stored["config"]["epochs"] == 2 and set(stored["test"]) == {"last", "best"}
    table = (tmp_path / "tiny.md").read_text()
    assert "## dcnn: 1 seeds, 2 epochs" in table and "## Best configuration" in table
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep.main(argv)  # resumable: the stored run is reused, nothing is trained again
    assert "seed 0:" not in capsys.readouterr().out
    # without --name the report is named after --runs: another sweep's report is left alone
    sweep.main([a for a in argv if a not in ("--name", "tiny")] + ["--report-only"])
    assert (tmp_path / "tiny_runs.md").read_text().startswith("# RUL β sweep")
    assert not (tmp_path / "sweep.md").exists()
    other = [a if a != "2" else "3" for a in argv]  # --epochs 3 into the same --runs
    with pytest.raises(
        SystemExit, match=r"seed0\.json was run with other settings \(epochs=2 there, 3 now\)"
    ):
        sweep.main(other)


def test_sweep_never_selects_a_refit_run():
    """Refit runs have no validation engines: their monitor column must not win selection,
    and their reproducing command names the schedule and ``--refit-all``."""
    runs = {"m": [_fake(s, [14.0, 13.0], [12.0, 12.5]) for s in range(2)]}
    refit = [_fake(s, [1.0, 1.0], [11.0, 11.0]) for s in range(2)]
    for r in refit:
        r["config"].update(refit_all=True, lr_drop_epoch=2, lr_drop_factor=0.1)
    runs["m" + REFIT_SUFFIX] = refit
    text = sweep.markdown(runs, "cmd")
    assert "`m`, weights `ema0.9`" in text.split("## Best configuration")[1]
    assert "--models m --seeds 2 --epochs 3 --batch-size 8 --lr-drop-epoch 2 --refit-all" in text
    # the refit section reports the validation-chosen `last` variant of the split runs
    refit_text = text.split("retrained on all training engines")[1]
    assert "(`ema0.9`, 13.00)" in refit_text
    assert "**test RMSE 11.00 ± 0.00**" in refit_text


def test_sweep_command_names_non_default_data_options():
    fake = _fake(0, [14.0, 13.0], [12.0, 12.5])
    fake["config"].update(window=40, members=5, min_prefix=31, cycle_feature=True)
    command = sweep.run_command("m", [fake])
    assert command.endswith(
        "--window 40 --members 5 --min-prefix 31 --cycle-feature --perturb 0.01"
    )
    assert "--max-rul" not in command and "--smooth" not in command
    assert Config.from_json(fake["config"]).data_description() == (
        ", window 40, members 5, prefixes from cycle 31, cycle feature"
    )
    assert Config().data_description() == ""
    assert "## m: 1 seeds, 3 epochs, batch 8, Adam lr 0.001, window 40, members 5" in (
        sweep.markdown({"m": [fake]}, "cmd")
    )
