"""The claims report: RMSE rows for split and refit runs, paired by seed."""

import dataclasses

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
