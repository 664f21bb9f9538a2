"""experiments.batch_norm_study: the configuration it trains and its report's pairing."""

import json

import pytest

from experiments import batch_norm_study as study


def _run(seed, rmses):
    test = {v: {"rmse": r, "score": 10 * r} for v, r in zip(study.VARIANTS, rmses, strict=True)}
    return {"config": {"seed": seed, "epochs": 150}, "test": test, "seconds": 1.0}


def test_the_configuration_is_the_chosen_one_with_batch_norm_refit():
    cfg = study.config(None, 150, 3)
    assert (cfg.model, cfg.refit_all, cfg.seed, cfg.epochs) == ("cnn_gru_bn", True, 3, 150)
    assert (cfg.ema_decays, cfg.ema_debias, cfg.early_stopping) == ((0.999,), (True,), None)
    assert (cfg.window, cfg.cycle_feature, cfg.lr_drop_epoch) == (40, True, 100)


def test_the_report_pairs_the_variants_by_seed():
    runs = [_run(0, (13.0, 14.0, 12.5, 12.0)), _run(1, (12.0, 13.0, 11.9, 11.7))]
    text = study.markdown(runs, "CMD")
    # recalibrated - raw: (-1.0, -0.3): mean -0.65, t(0.975, 1) * s / sqrt(2) = 12.706 * 0.35
    assert "| ema + recalibrated | 11.85 ± 1.91 |" in text
    assert "-0.65 ± 4.45" in text and "2 of 2" in text
    # recalibrated - averaged: (-0.5, -0.2): mean -0.35 ± 12.706 * 0.15 = 1.91
    assert "**Recalibrated − averaged statistics, paired**: -0.35 ± 1.91" in text
    assert "| 1 | 12.00 | 13.00 | 11.90 | 11.70 | 1 |" in text


def test_the_report_covers_the_seeds_given_and_names_its_command(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    for seed in (0, 1, 2):
        run = _run(seed, (13.0, 14.0, 12.5, 12.0 + seed))
        (tmp_path / f"seed{seed}.json").write_text(json.dumps(run))
    study.main(["--seeds", "2", "0", "--runs", str(tmp_path), "--report-only"])
    stored = json.loads((tmp_path / "results" / "batch_norm.json").read_text())
    assert [r["config"]["seed"] for r in stored["runs"]] == [2, 0]
    # synthetic data: no --data-dir in the command (was "--data-dir None", the string)
    assert stored["command"] == (
        f"python -m experiments.batch_norm_study --seeds 2 0 --epochs 150 --runs {tmp_path}"
    )


def test_a_bad_data_dir_is_a_usage_error_before_anything_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "run", lambda cfg: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--data-dir", str(tmp_path / "missing"), "--runs", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "batch_norm_study: error: argument --data-dir: C-MAPSS file" in capsys.readouterr().err
