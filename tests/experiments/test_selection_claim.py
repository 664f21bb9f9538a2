"""Claim 5: post-hoc EMA and early stopping, each paired by seed with the split sweep runs'
raw weights and tracked EMA 0.999 debiased, their protocol checked; bad inputs refused."""

import dataclasses
import json

import pytest

from experiments import selection_claim
from experiments.config import Config
from experiments.runs import DECAYS


def _run(seed: int, raw: float, ema: float, model: str = "cnn_gru") -> dict:
    metrics = {"raw": raw, **{f"ema{d:g}{s}": ema for d in DECAYS for s in ("", "-debiased")}}
    test = {n: {"rmse": v, "val_rmse": v, "score": v, "epoch": 1} for n, v in metrics.items()}
    cfg = dataclasses.asdict(Config(model=model, seed=seed))
    return {"config": cfg, "test": {"last": test, "best": test}}


def _sweep(seeds=range(3)) -> dict:
    """Split runs of the studied model (raw 13 + s, EMA 12.5 + s) and of another model."""
    return {
        "cnn_gru": [_run(s, 13.0 + s, 12.5 + s) for s in seeds],
        "dcnn": [_run(s, 50.0, 50.0, model="dcnn") for s in seeds],
    }


def _posthoc(path, seeds, **config) -> None:
    runs = [
        {
            "config": {"model": "cnn_gru", "seed": s, **config},
            "test_rmse": {"posthoc": 12.0 + s, "raw": 13.0 + s + 0.001 * s},  # the sweep's + 0.001s
        }
        for s in seeds
    ]
    path.write_text(json.dumps({"runs": runs}))


def _early(path, seeds, config=None) -> None:
    rows = [
        {
            "seed": s,
            "val_loss": {"test_rmse": 13.5 + s},
            "val_loss_ema[0]": {"test_rmse": 12.0 + s},
            **(
                {"config": dataclasses.asdict(dataclasses.replace(config, seed=s))}
                if config
                else {}
            ),
        }
        for s in seeds
    ]
    path.write_text(json.dumps({"seeds": rows}))


def _rows(lines):
    return {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}


def test_each_study_pairs_with_the_raw_and_ema_of_its_own_seeds(tmp_path):
    _posthoc(tmp_path / "posthoc.json", (2, 7, 0))  # seed 7 has no sweep run
    _early(tmp_path / "early.json", (2, 0))  # not in the sweep's order, seed 1 missing
    lines = selection_claim.claim_selection(
        _sweep(), tmp_path / "posthoc.json", tmp_path / "early.json"
    )
    rows = _rows(lines)
    # post-hoc 12 + s against raw 13 + s and the EMA 12.5 + s of the same seed (0 and 2)
    assert rows["cnn_gru, post-hoc EMA, σ_rel chosen on validation"].endswith(
        "| 2 | 13.00 ± 12.71 | -1.00 ± 0.00 | 2 of 2 | -0.50 ± 0.00 | 2 of 2 |"
    )
    assert rows["cnn_gru, raw + early stopping"].endswith(
        "| 2 | 14.50 ± 12.71 | 0.50 ± 0.00 | 0 of 2 | 1.00 ± 0.00 | 0 of 2 |"
    )
    assert rows["cnn_gru, EMA + early stopping"].endswith(
        "| -1.00 ± 0.00 | 2 of 2 | -0.50 ± 0.00 | 2 of 2 |"
    )
    # the references cover every split run of the model, each against itself
    assert rows["cnn_gru, raw (raw reference)"].endswith(
        "| 3 | 14.00 ± 2.48 | 0.00 ± 0.00 | 0 of 3 | 0.50 ± 0.00 | 0 of 3 |"
    )
    assert rows["cnn_gru, EMA 0.999 debiased, last (EMA reference)"].endswith(
        "| 3 | 13.50 ± 2.48 | -0.50 ± 0.00 | 3 of 3 | 0.00 ± 0.00 | 0 of 3 |"
    )
    assert not any(name.startswith("dcnn") for name in rows)  # no study ran it
    assert any("Left out: " in line and "seed 7 has no cnn_gru sweep run" in line for line in lines)
    assert any("Not checked: " in line and "early.json" in line for line in lines)
    assert "raw weights are within 0.002 test RMSE of their cnn_gru sweep runs'" in "\n".join(lines)


def test_no_study_no_section():
    assert selection_claim.claim_selection(_sweep(), None, None) == []


def test_a_run_of_another_protocol_is_refused_naming_the_flag_seed_and_setting(tmp_path):
    _posthoc(tmp_path / "posthoc.json", (0, 1), window=99)
    with pytest.raises(ValueError, match=r"--posthoc .*seed 0 is not .*window=99 there"):
        selection_claim.claim_selection(_sweep(), tmp_path / "posthoc.json", None)
    other = Config(model="cnn_gru", lr=0.5, early_stopping=10)
    _early(tmp_path / "early.json", (1,), other)
    with pytest.raises(ValueError, match=r"--early-stopping-results .*seed 1 is not .*lr=0.5"):
        selection_claim.claim_selection(_sweep(), None, tmp_path / "early.json")


def test_early_stopping_stored_with_the_sweeps_protocol_is_checked_and_not_flagged(tmp_path):
    _early(tmp_path / "early.json", (0, 1), Config(model="cnn_gru", early_stopping=10))
    lines = selection_claim.claim_selection(_sweep(), None, tmp_path / "early.json")
    assert "cnn_gru, EMA + early stopping" in _rows(lines)
    assert not any("Not checked" in line for line in lines)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "--posthoc .*: not a readable JSON file"),
        (json.dumps({"seeds": []}), '--posthoc .*: no "runs" in it .*posthoc_study'),
        (json.dumps({"runs": []}), '--posthoc .*: no "runs" in it'),
    ],
)
def test_a_file_that_is_not_the_studys_is_refused_naming_the_flag(tmp_path, content, message):
    (tmp_path / "posthoc.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        selection_claim.claim_selection(_sweep(), tmp_path / "posthoc.json", None)


def test_a_study_with_nothing_to_pair_is_refused(tmp_path):
    _posthoc(tmp_path / "posthoc.json", (5, 6))
    with pytest.raises(ValueError, match=r"--posthoc .*none of its cnn_gru seeds \[5, 6\]"):
        selection_claim.claim_selection(_sweep(), tmp_path / "posthoc.json", None)
    _early(tmp_path / "early.json", (0,))
    with pytest.raises(ValueError, match=r"--early-stopping-results .*no split runs of its model"):
        selection_claim.claim_selection({"dcnn": _sweep()["dcnn"]}, None, tmp_path / "early.json")
