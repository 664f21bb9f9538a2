"""``train_rul --early-stopping PATIENCE --monitor ...``: the flags (the run itself is
``test_train_rul.py``'s ``cli_run``, which sets them)."""

import json

import pytest

from experiments import train_rul
from experiments.cli import ConfigFlags
from experiments.config import Config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--early-stopping", "-1"], "must be an integer >= 0"),
        (["--early-stopping", "3", "--monitor", "val_loss_ema"], "val_<metric>_ema[i]"),
        (["--early-stopping", "3", "--monitor", "val_loss_ema[1]"], "names average 1"),
        (["--early-stopping", "3", "--refit-all"], "not with refit_all"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        train_rul.FLAGS.parse(train_rul.parser(), argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_flags_round_trip():
    cfg = Config(early_stopping=4, monitors=("val_loss", "val_mse_ema[0]"))
    flags = ConfigFlags()
    assert flags.argv(cfg) == ["--early-stopping", "4", "--monitor", "val_loss", "val_mse_ema[0]"]
    assert flags.parse(train_rul.parser(), flags.argv(cfg))[1] == cfg
    assert Config.from_json({"epochs": 3}).early_stopping is None  # runs stored before


def _fake_run(seed, raw_rmse, ema_rmse, raw_stop, ema_stop):
    stops, test = {}, {}
    for monitor, rmse, stop in (
        ("val_loss", raw_rmse, raw_stop),
        ("val_loss_ema[0]", ema_rmse, ema_stop),
    ):
        stops[monitor] = {
            "best_epoch": (stop or 150) - 10,
            "stopped_epoch": stop,
            "epochs_trained": 150,
        }
        test[monitor] = {"rmse": rmse, "score": 300.0, "val_rmse": rmse - 1}
    rows = [{}] * max(raw_stop or 150, ema_stop or 150)
    return {
        "config": {"seed": seed},
        "rows": rows,
        "early_stopping": stops,
        "test": {"early": test},
    }


def test_the_study_report_pairs_the_stoppers_by_seed():
    """experiments.early_stopping: per seed, its run's configuration, each stopper's test RMSE
    and epochs trained (the stopped epoch, or the cap); the paired EMA − raw difference; a
    partial run says so."""
    from experiments import early_stopping as study

    runs = [_fake_run(0, 13.0, 12.5, 80, None), _fake_run(1, 12.0, 11.9, 70, 120)]
    rows = study.per_seed(runs)
    assert [r["val_loss_ema[0]"]["epochs_trained"] for r in rows] == [150, 120]
    assert [r["val_loss"]["epochs_trained"] for r in rows] == [80, 70]
    assert [r["config"] for r in rows] == [{"seed": 0}, {"seed": 1}]  # each run's own, for claims
    cfg = study.chosen(None, 10, 150)
    assert cfg.monitors == study.MONITORS and cfg.early_stopping == 10
    text = study.markdown(rows, cfg, "CMD", requested=10)
    # mean of (-0.5, -0.1) = -0.30; half-width t(0.975, 1) * s / sqrt(2) = 12.706 * 0.2 = 2.54
    assert "test RMSE -0.30 ± 2.54" in text and "EMA lower in 2 of 2 seeds" in text
    assert (
        "Partial: 2 of the 10 requested seeds" in text and "without stopping: raw 0, EMA 1" in text
    )


def test_the_study_command_stores_its_runs_configs_and_a_command_without_a_fake_data_dir(
    tmp_path, monkeypatch
):
    from experiments import early_stopping as study

    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    for seed in (0, 1):
        run = _fake_run(seed, 13.0, 12.5, 80, None)
        (tmp_path / f"seed{seed}.json").write_text(json.dumps(run))
    study.main(["--seeds", "2", "--runs", str(tmp_path), "--report-only"])
    stored = json.loads((tmp_path / "results" / "early_stopping.json").read_text())
    assert [r["config"] for r in stored["seeds"]] == [{"seed": 0}, {"seed": 1}]
    assert stored["command"] == (
        f"python -m experiments.early_stopping --seeds 2 --patience 10 --epochs 150 "
        f"--runs {tmp_path}"
    )


def test_the_study_refuses_a_bad_data_dir_before_anything_trains(tmp_path, monkeypatch, capsys):
    from experiments import early_stopping as study

    monkeypatch.setattr(study, "train_missing", lambda *a: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--data-dir", str(tmp_path / "missing"), "--runs", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "early_stopping: error: argument --data-dir: C-MAPSS file" in capsys.readouterr().err
