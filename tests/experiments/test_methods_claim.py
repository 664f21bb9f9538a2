"""Claim 6: BEMA and Switch EMA paired with the sweep's runs of the same seeds and protocol,
the BatchNorm study with its own runs; bad inputs refused before the timing claim trains."""

import dataclasses
import json
import re

import pytest

from experiments import claims, methods_claim
from experiments.config import Config

REAL = "/data/cmapss"  # a data directory as the runs store it (never read here)


def _run(cfg: Config, **rmse: float) -> dict:
    test = {name: {"rmse": v, "score": v, "val_rmse": v, "epoch": 150} for name, v in rmse.items()}
    return {"config": dataclasses.asdict(cfg), "test": {"last": test, "best": test}}


def _config(seed: int, **settings) -> Config:
    return Config(
        **{"model": "cnn_gru", "seed": seed, "refit_all": True, "data_dir": REAL, **settings}
    )


def _sweep(seeds, refit=True, **protocol) -> dict:
    name = "cnn_gru-refit" if refit else "cnn_gru"
    return {
        name: [
            _run(
                _config(s, perturb=(0.01,), refit_all=refit, **protocol),
                raw=13.0 + s,
                **{"ema0.999-debiased": 12.5 + s},
            )
            for s in seeds
        ]
    }


def _write_bema(directory, seeds, name="cnn_gru-refit", **settings):
    """A sweep's layout: ``<name>/seed<k>.json``, BEMA at 20 + seed."""
    (directory / name).mkdir(parents=True, exist_ok=True)
    for s in seeds:
        cfg = _config(s, bema=True, refit_all=name.endswith("-refit"), **settings)
        (directory / name / f"seed{s}.json").write_text(
            json.dumps(_run(cfg, raw=13.0 + s, bema=20.0 + s))
        )


def _rows(lines):
    return {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| cnn_gru")}


def test_bema_and_switch_ema_pair_with_the_sweeps_raw_and_ema_of_the_same_seeds(tmp_path):
    _write_bema(tmp_path / "bema", (0, 2, 3))  # seed 0 has no sweep run: left out, and named
    switch = tmp_path / "switch"  # train_rul's layout
    for s in (3, 2, 1):
        cfg = _config(s, switch_ema=True, switch_every=31, data_dir="../elsewhere/cmapss")
        (switch / f"seed{s}").mkdir(parents=True)
        run = _run(cfg, raw=12.0, **{"ema0.999-debiased": 12.0 + s - 0.1 * s})
        (switch / f"seed{s}" / "history.json").write_text(json.dumps(run))

    sweep = _sweep((1, 2, 3))  # paired by seed, not by position
    lines = methods_claim.claim_methods(sweep, [tmp_path / "bema", switch], None)
    rows = _rows(lines)
    # BEMA 20+s against raw 13+s and the EMA 12.5+s: +7 and +7.5 every seed (2 and 3)
    assert rows["cnn_gru-refit, BEMA (TRL's defaults, no burn-in)"].endswith(
        "| 2 | 22.50 ± 6.35 | 7.00 ± 0.00 | 0 of 2 | 7.50 ± 0.00 | 0 of 2 |"
    )
    # Switch EMA 12+0.9s against raw 13+s (-1-0.1s) and the EMA 12.5+s (-0.5-0.1s), s = 1..3
    assert rows["cnn_gru-refit, Switch EMA every 31 epochs, its EMA 0.999 debiased"].endswith(
        "| 3 | 13.80 ± 2.24 | -1.20 ± 0.25 | 3 of 3 | -0.70 ± 0.25 | 3 of 3 |"
    )
    assert any(
        "Left out: " in line and "seed 0 has no cnn_gru-refit sweep run" in line for line in lines
    )


def test_split_and_refit_method_runs_pair_with_their_own_sweep_runs(tmp_path):
    _write_bema(tmp_path, (0, 1), name="cnn_gru")
    _write_bema(tmp_path, (0, 1), name="cnn_gru-refit")
    sweep = {**_sweep((0, 1), refit=False), **_sweep((0, 1))}
    for run in sweep["cnn_gru"]:  # the split runs: raw and EMA at 10 + seed
        last = run["test"]["last"]
        last["raw"]["rmse"] = last["ema0.999-debiased"]["rmse"] = 10.0 + run["config"]["seed"]
    rows = _rows(methods_claim.claim_methods(sweep, [tmp_path], None))
    assert rows["cnn_gru, BEMA (TRL's defaults, no burn-in)"].endswith(
        "| 2 | 20.50 ± 6.35 | 10.00 ± 0.00 | 0 of 2 | 10.00 ± 0.00 | 0 of 2 |"
    )
    assert rows["cnn_gru-refit, BEMA (TRL's defaults, no burn-in)"].endswith(
        "| 7.00 ± 0.00 | 0 of 2 | 7.50 ± 0.00 | 0 of 2 |"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window": 40}, "seed 1 is not the sweep's protocol .*window=40 there, 30 in the sweep"),
        ({"data_dir": None}, "seed 1 is not the sweep's protocol .*data_dir=None there"),
        ({"lr": 3e-3}, "lr=0.003 there, 0.001 in the sweep"),
    ],
)
def test_a_method_run_of_another_protocol_is_refused_naming_the_seed_and_setting(
    tmp_path, settings, message
):
    _write_bema(tmp_path, (0,))
    _write_bema(tmp_path, (1,), **settings)  # one run of the directory differs
    with pytest.raises(ValueError, match=message):
        methods_claim.claim_methods(_sweep((0, 1)), [tmp_path], None)


def test_monitors_are_protocol_only_when_a_run_stops_early(tmp_path):
    stops = {"early_stopping": 10, "monitors": ("val_loss",)}
    sweep = _sweep((0,), refit=False, **stops)
    _write_bema(tmp_path / "same", (0,), name="cnn_gru", **stops)
    assert methods_claim.claim_methods(sweep, [tmp_path / "same"], None)
    other = {"early_stopping": 10, "monitors": ("val_loss", "val_loss_ema[0]")}
    _write_bema(tmp_path / "other", (0,), name="cnn_gru", **other)
    with pytest.raises(ValueError, match="monitors="):
        methods_claim.claim_methods(sweep, [tmp_path / "other"], None)
    quiet = _sweep((0,), monitors=("val_loss", "val_loss_ema[0]"))  # nothing stops early
    _write_bema(tmp_path / "quiet", (0,))
    assert methods_claim.claim_methods(quiet, [tmp_path / "quiet"], None)


def test_what_cannot_be_paired_is_refused_naming_the_flag(tmp_path):
    _write_bema(tmp_path, (0,))
    with pytest.raises(ValueError, match="--runs has no cnn_gru-refit runs to pair with"):
        methods_claim.claim_methods({}, [tmp_path], None)
    with pytest.raises(ValueError, match="none of its cnn_gru-refit seeds has a sweep run"):
        methods_claim.claim_methods(_sweep((5,)), [tmp_path], None)
    not_a_sweep = {"cnn_gru-refit": [_run(_config(0, bema=True), raw=1.0, bema=1.0)]}
    with pytest.raises(ValueError, match="--runs: cnn_gru-refit seed 0 is not a sweep run"):
        methods_claim.claim_methods(not_a_sweep, [tmp_path], None)
    plain = tmp_path / "plain" / "cnn_gru-refit"
    plain.mkdir(parents=True)
    (plain / "seed0.json").write_text(json.dumps(_sweep((0,))["cnn_gru-refit"][0]))
    with pytest.raises(ValueError, match="uses neither --bema nor --switch-ema"):
        methods_claim.claim_methods(_sweep((0,)), [tmp_path / "plain"], None)
    (plain / "seed0.json").write_text("{not json")
    with pytest.raises(
        ValueError, match=r"plain/cnn_gru-refit/seed0\.json: not a readable JSON file"
    ):
        methods_claim.claim_methods(_sweep((0,)), [tmp_path / "plain"], None)


def test_batch_norm_rows_pair_with_the_studys_own_raw_and_averaged_statistics(tmp_path):
    path = tmp_path / "batch_norm.json"
    cfg = dataclasses.asdict(Config(model="cnn_gru_bn", refit_all=True))
    values = {"raw": 16.0, "ema + raw statistics": 17.0, "ema + averaged statistics": 15.5}
    runs = [
        {"config": cfg, "test": {k: {"rmse": v + s} for k, v in values.items()}, "seconds": 1.0}
        for s in range(2)
    ]
    for run, recalibrated in zip(runs, (15.8, 16.6), strict=True):
        run["test"]["ema + recalibrated"] = {"rmse": recalibrated}
    path.write_text(json.dumps({"command": "", "runs": runs}))
    rows = _rows(methods_claim.claim_methods({}, [], path))
    assert rows["cnn_gru_bn-refit, ema + averaged statistics (EMA reference)"].endswith(
        "| -0.50 ± 0.00 | 2 of 2 | 0.00 ± 0.00 | 0 of 2 |"
    )
    assert rows["cnn_gru_bn-refit, ema + recalibrated"].endswith(
        "| -0.30 ± 1.27 | 2 of 2 | 0.20 ± 1.27 | 0 of 2 |"
    )
    assert methods_claim.claim_methods({}, [], None) == []


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--methods", "--methods .*missing: no such directory"),
        ("--batch-norm-results", "--batch-norm-results .*missing: no such file"),
        ("--posthoc", "--posthoc .*missing: not a readable JSON file"),
        ("--early-stopping-results", "--early-stopping-results .*missing: not a readable JSON"),
    ],
)
def test_a_wrong_path_is_a_usage_error_before_the_timing_claim_trains(
    tmp_path, capsys, monkeypatch, flag, message
):
    def trains(*args, **kwargs):
        raise AssertionError("the timing claim ran before the inputs were checked")

    monkeypatch.setattr(claims, "time_epochs", trains)
    monkeypatch.setattr(claims.cmapss, "load", trains)
    with pytest.raises(SystemExit) as exit_info:
        claims.main(["--runs", str(tmp_path), flag, str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
