"""``train_rul --early-stopping PATIENCE --monitor ...``: the flags (the run itself is
``test_train_rul.py``'s ``cli_run``, which sets them)."""

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
