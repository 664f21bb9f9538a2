"""The claims report: RMSE rows for split and refit runs, and the selection rows (post-hoc
EMA, early stopping) paired by seed with the sweep's raw weights and tracked EMA."""

import dataclasses
import json
import re

import pytest

from experiments import claims
from experiments.config import Config
from experiments.runs import DECAYS


def _run(seed: int, raw: float, ema: float, *, refit: bool = False) -> dict:
    metrics = {
        "raw": raw,
        **{f"ema{d:g}{s}": ema for d in DECAYS for s in ("", "-debiased")},
    }
    test = {n: {"rmse": v, "val_rmse": v, "score": v, "epoch": 1} for n, v in metrics.items()}
    cfg = dataclasses.asdict(Config(model="cnn_gru", seed=seed, refit_all=refit))
    return {"config": cfg, "test": {"last": test, "best": test}}


def test_rmse_claim_pairs_by_seed_and_reports_a_refit_under_last_only():
    runs = {
        "cnn_gru": [_run(0, 10.0, 9.0), _run(1, 20.0, 19.0)],
        "cnn_gru-refit": [_run(0, 10.0, 9.5, refit=True), _run(1, 10.0, 9.5, refit=True)],
    }
    lines = claims.claim_rmse(runs)
    split = [line for line in lines if line.startswith("| cnn_gru |")]
    refit = [line for line in lines if line.startswith("| cnn_gru-refit |")]
    assert len(split) == 4 and len(refit) == 2  # refit: last, plain and debiased
    assert all("| last," in line for line in refit)
    # (9-10)/10 and (19-20)/20: -10 % and -5 %, mean -7.5 %
    assert "-7.5 ± " in split[0] and "-5.0 ± 0.0 %" in refit[0]


def test_selection_rows_pair_each_study_with_the_same_seeds_raw_weights(tmp_path):
    runs = {"cnn_gru": [_run(s, 13.0 + s, 12.5 + s) for s in range(3)]}
    posthoc = tmp_path / "posthoc.json"
    posthoc.write_text(
        json.dumps(
            {
                "runs": [  # seed 7 has no sweep run: left out, not mispaired
                    {"config": {"model": "cnn_gru", "seed": s}, "test_rmse": {"posthoc": 12.0 + s}}
                    for s in (0, 2, 7)
                ]
            }
        )
    )
    early = tmp_path / "early.json"
    seeds = [
        {"seed": s, "val_loss": {"test_rmse": 13.5 + s}, "val_loss_ema[0]": {"test_rmse": 12.0 + s}}
        for s in range(3)
    ]
    early.write_text(json.dumps({"seeds": seeds}))
    rows = {line.split(" | ")[0][2:]: line for line in claims.claim_selection(runs, posthoc, early)}
    # against raw 13 + s and the EMA 12.5 + s of the same seed
    assert re.search(
        r"\| 2 \| 13\.00 ± \S+ \| -1\.00 ± 0\.00 \| 2 of 2 \| -0\.50 ± 0\.00 \| 2 of 2 \|$",
        rows["cnn_gru, post-hoc EMA, σ_rel chosen on validation"],
    )  # seeds 0 and 2: 12 vs 13 and 12.5, 14 vs 15 and 14.5
    assert rows["cnn_gru, raw + early stopping"].endswith(
        "| 0.50 ± 0.00 | 0 of 3 | 1.00 ± 0.00 | 0 of 3 |"
    )
    assert rows["cnn_gru, EMA + early stopping"].endswith(
        "| 3 | 13.00 ± 2.48 | -1.00 ± 0.00 | 3 of 3 | -0.50 ± 0.00 | 3 of 3 |"
    )
    assert rows["cnn_gru, raw (raw reference)"].endswith(
        "| 3 | 14.00 ± 2.48 | 0.00 ± 0.00 | 0 of 3 | 0.50 ± 0.00 | 0 of 3 |"
    )
    assert rows["cnn_gru, EMA 0.999 debiased, last (EMA reference)"].endswith(
        "| -0.50 ± 0.00 | 3 of 3 | 0.00 ± 0.00 | 0 of 3 |"
    )
    assert claims.claim_selection(runs, None, None) == []


def test_early_stopping_rows_only_for_the_model_it_studied(tmp_path):
    runs = {"dcnn": [_run(0, 13.0, 12.0)]}
    early = tmp_path / "early.json"
    early.write_text(json.dumps({"seeds": [{"seed": 0, "val_loss": {"test_rmse": 1.0}}]}))
    assert claims.claim_selection(runs, None, early) == []


def test_a_posthoc_run_of_another_protocol_is_refused_naming_the_seed_and_setting(tmp_path):
    runs = {"cnn_gru": [_run(s, 13.0, 12.5) for s in range(2)]}
    posthoc = tmp_path / "posthoc.json"
    stored = [{"config": {"model": "cnn_gru", "seed": 1, "window": 99}, "test_rmse": {}}]
    posthoc.write_text(json.dumps({"runs": stored}))
    with pytest.raises(ValueError, match=r"--posthoc .*seed 1 is not .*window=99 there"):
        claims.claim_selection(runs, posthoc, None)
