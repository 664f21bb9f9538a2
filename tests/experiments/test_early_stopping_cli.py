"""``train_rul --early-stopping PATIENCE --monitor ...``: one run, several stoppers, rule early."""

import json

import numpy as np
import pytest

from experiments import synthetic, train_rul
from experiments.cli import ConfigFlags
from experiments.config import Config


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny run (12 synthetic engines, DCNN) of the CLI's flags stopped by two monitors,
    its history.json, and the test split's evaluations. ``main`` less the plot and the
    Orbax export (tested in test_train_rul.py), which would double this test's time."""
    raw = synthetic.generate(n_train=12, n_test=6, seed=0)
    data = tmp_path_factory.mktemp("data")
    synthetic.write(data, raw)
    out = tmp_path_factory.mktemp("run")
    calls = []
    evaluate = train_rul.evaluate

    def counting(*args, **kwargs):
        calls.append(args[2])
        return evaluate(*args, **kwargs)

    argv = ["--data-dir", str(data), "--model", "dcnn", "--epochs", "40", "--batch-size", "32"]
    argv += ["--lr", "3e-3", "--ema-decay", "0.5", "0.9", "--ema-debias", "--no-progress"]
    argv += ["--early-stopping", "1", "--monitor", "val_loss", "best_ema", "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_rul, "evaluate", counting)
        _, cfg = train_rul.FLAGS.parse(train_rul.parser(), argv)
        result, _ = train_rul.run(cfg, train_rul.load_data(cfg))
        train_rul.write_history(result, out)
    return result, json.loads((out / "history.json").read_text()), calls


def test_history_records_each_stopper(stopped_run):
    result, history, _ = stopped_run
    stops = history["early_stopping"]
    assert history["config"]["early_stopping"] == 1
    assert history["config"]["monitors"] == ["val_loss", "best_ema"]
    assert set(stops) == {"val_loss", "best_ema"}
    rows = history["rows"]
    # The run ends when the last stopper stops (epochs from 1, like the rows).
    assert len(rows) == max(s["stopped_epoch"] for s in stops.values()) < 40
    raw = stops["val_loss"]
    losses = [r["val_loss_raw"] for r in rows[: raw["stopped_epoch"]]]
    assert raw["variant"] == "raw" and raw["best_epoch"] == 1 + int(np.argmin(losses))
    assert raw["best_metric"] == pytest.approx(min(losses), rel=1e-12)
    ema = stops["best_ema"]
    assert ema["variant"] in ("ema0.5-debiased", "ema0.9-debiased")
    best_row = rows[ema["best_epoch"] - 1]
    others = [best_row[f"val_loss_{v}"] for v in ("ema0.5-debiased", "ema0.9-debiased")]
    assert best_row[f"val_loss_{ema['variant']}"] == min(others)
    assert history["test"] == result["test"]


def test_the_test_split_is_read_once_for_the_chosen_weights(stopped_run):
    _, history, calls = stopped_run
    assert len(calls) == 1 and set(calls[0]) == {"last", "best", "early"}
    early = history["test"]["early"]
    for monitor, stop in history["early_stopping"].items():
        row = history["rows"][stop["best_epoch"] - 1]
        assert early[monitor]["epoch"] == stop["best_epoch"]
        assert early[monitor]["val_rmse"] == row[f"val_rmse_{stop['variant']}"]
    # The raw stopper's weights are the best rule's raw weights (same epoch, same weights).
    if early["val_loss"]["epoch"] == history["test"]["best"]["raw"]["epoch"]:
        assert early["val_loss"]["rmse"] == history["test"]["best"]["raw"]["rmse"]


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
