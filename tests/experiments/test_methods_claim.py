"""Claim 6: BEMA and Switch EMA paired with the sweep's runs of the same seeds and protocol,
the BatchNorm study with its own runs; bad inputs refused before the timing claim trains."""

import dataclasses
import json
import re

import pytest

from experiments import claims, methods_claim
from experiments.config import Config


def _run(cfg: Config, **rmse: float) -> dict:
    test = {name: {"rmse": v, "score": v, "val_rmse": v, "epoch": 150} for name, v in rmse.items()}
    return {"config": dataclasses.asdict(cfg), "test": {"last": test, "best": test}}


def _sweep(seeds, **protocol) -> dict:
    return {
        "cnn_gru-refit": [
            _run(
                Config(model="cnn_gru", seed=s, refit_all=True, perturb=(0.01,), **protocol),
                raw=13.0 + s,
                **{"ema0.999-debiased": 12.5 + s},
            )
            for s in seeds
        ]
    }


def _rows(lines):
    return {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| cnn_gru")}


def test_bema_and_switch_ema_pair_with_the_sweeps_raw_and_ema_of_the_same_seeds(tmp_path):
    bema = tmp_path / "bema" / "cnn_gru-refit"  # a sweep's layout
    bema.mkdir(parents=True)
    for s in (0, 1, 7):  # seed 7 has no sweep run: left out, not mispaired
        cfg = Config(model="cnn_gru", seed=s, refit_all=True, bema=True)
        (bema / f"seed{s}.json").write_text(json.dumps(_run(cfg, raw=13.0 + s, bema=20.0 + s)))
    switch = tmp_path / "switch"  # train_rul's layout
    for s in (0, 1, 2):
        cfg = Config(model="cnn_gru", seed=s, refit_all=True, switch_ema=True, switch_every=31)
        (switch / f"seed{s}").mkdir(parents=True)
        run = _run(cfg, raw=12.0, **{"ema0.999-debiased": 12.0 + s - 0.1 * s})
        (switch / f"seed{s}" / "history.json").write_text(json.dumps(run))

    lines = methods_claim.claim_methods(_sweep(range(3)), [tmp_path / "bema", switch], None)
    rows = _rows(lines)
    # BEMA 20+s against raw 13+s and the EMA 12.5+s: +7 and +7.5 every seed
    assert rows["cnn_gru-refit, BEMA (TRL's defaults, no burn-in)"].endswith(
        "| 2 | 20.50 ± 6.35 | 7.00 ± 0.00 | 0 of 2 | 7.50 ± 0.00 | 0 of 2 |"
    )
    # Switch EMA 12+0.9s against raw 13+s (-1-0.1s) and the EMA 12.5+s (-0.5-0.1s)
    assert rows["cnn_gru-refit, Switch EMA every 31 epochs, its EMA 0.999 debiased"].endswith(
        "| 3 | 12.90 ± 2.24 | -1.10 ± 0.25 | 3 of 3 | -0.60 ± 0.25 | 3 of 3 |"
    )


def test_a_method_run_of_another_protocol_is_refused_naming_the_setting(tmp_path):
    runs = tmp_path / "cnn_gru-refit"
    runs.mkdir()
    cfg = Config(model="cnn_gru", seed=0, refit_all=True, bema=True, window=30)
    (runs / "seed0.json").write_text(json.dumps(_run(cfg, raw=1.0, bema=1.0)))
    with pytest.raises(ValueError, match="window=30 there, 40 in the sweep"):
        methods_claim.claim_methods(_sweep([0], window=40), [tmp_path], None)
    with pytest.raises(ValueError, match="no cnn_gru-refit runs to pair with"):
        methods_claim.claim_methods({}, [tmp_path], None)


def test_batch_norm_rows_pair_with_the_studys_own_raw_and_averaged_statistics(tmp_path):
    path = tmp_path / "batch_norm.json"
    cfg = dataclasses.asdict(Config(model="cnn_gru_bn", refit_all=True))
    values = {"raw": 16.0, "ema + raw statistics": 17.0, "ema + averaged statistics": 15.5}
    runs = [
        {"config": cfg, "test": {k: {"rmse": v + s} for k, v in values.items()}} | {"seconds": 1.0}
        for s in range(2)
    ]
    for run, recalibrated in zip(runs, (15.8, 16.6), strict=True):
        run["test"]["ema + recalibrated"] = {"rmse": recalibrated}
    path.write_text(json.dumps({"command": "", "runs": runs}))
    rows = _rows(methods_claim.claim_methods({}, [], path))
    assert rows["cnn_gru_bn-refit, ema + averaged statistics"].endswith(
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
    ],
)
def test_a_wrong_path_is_a_usage_error_before_the_timing_claim_trains(
    tmp_path, capsys, flag, message
):
    with pytest.raises(SystemExit) as exit_info:
        claims.main(["--runs", str(tmp_path), flag, str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
