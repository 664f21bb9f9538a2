"""experiments.reporting: the notes before training and the verdict line after it."""

import dataclasses
import shlex

from experiments import early_stopping, reporting, train_rul
from experiments.config import Config


def test_a_plain_average_longer_than_the_run_gets_a_note():
    """A plain average still weighted mostly on the initial weights is no average of the run
    (a 3-epoch run with plain β = 0.999 scored 45.7 against raw's 17.5): the debiased default
    gets no note; a plain average whose initial weights keep more than 10 % after the run's
    steps is named, with that share."""
    assert reporting.initial_weight_notes(Config(), 81) == []  # the debiased default
    plain = Config(ema_decays=(0.9, 0.999), ema_debias=(False, False))
    (note,) = reporting.initial_weight_notes(plain, 81)
    assert note.startswith("note: ema0.999 is a plain average") and "92%" in note  # .999**81
    assert reporting.initial_weight_notes(plain, 2400) == []  # 0.999**2400 = 9 %


def test_the_verdict_compares_the_validation_chosen_average_with_raw():
    def m(val, test):
        return {"val_rmse": val, "rmse": test}

    test = {"last": {"raw": m(20.0, 18.0), "ema0.9": m(19.0, 18.5), "ema0.99": m(19.5, 17.0)}}
    line = reporting.verdict(test)
    assert line.startswith("final weights: ema0.9 (the average with the lowest validation")
    assert line.endswith(
        "val 19.00 / test 18.50 against raw 20.00 / 18.00: the EMA is lower on validation only"
    )
    test["last"]["ema0.9"] = m(21.0, 17.5)  # now ema0.99 has the lowest validation RMSE
    assert reporting.verdict(test).endswith("the EMA is lower on both")
    test["last"] = {"raw": m(1.0, 1.0), "ema0.9": m(2.0, 2.0)}
    assert reporting.verdict(test).endswith("the EMA is not lower")


def test_a_debiased_average_whose_window_outlasts_the_run_gets_a_note():
    """β = 0.999 averages over 1/(1 − β) = 1000 steps: a 660-step run (12 epochs of 55 steps)
    is named with its length and the epochs for three windows; β = 0.99 (100 steps) is not,
    and neither is a plain average (it gets the initial-weight note instead)."""
    cfg = Config(epochs=12, ema_decays=(0.99, 0.999), ema_debias=(True, True))
    (note,) = reporting.short_window_notes(cfg, 660)
    assert note.startswith("note: ema0.999-debiased averages over about 1000 steps")
    assert "this run has 660" in note and "--epochs 55 gives 3 windows" in note  # 3000 / 55
    assert reporting.short_window_notes(cfg, 1000) == []
    plain = Config(ema_decays=(0.999,), ema_debias=(False,))
    assert reporting.short_window_notes(plain, 660) == []


def test_a_run_without_the_gain_names_the_command_that_shows_it():
    def m(val, test):
        return {"val_rmse": val, "rmse": test}

    test = {"last": {"raw": m(22.77, 23.32), "ema0.999-debiased": m(21.14, 23.37)}}
    line = reporting.where_the_gain_shows(test)
    assert line is not None and line.startswith("why not here: ")
    assert line.endswith(reporting.HEADLINE_COMMAND)
    assert "--model cnn_gru --window 40 --cycle-feature --epochs 150" in line
    test["last"]["ema0.999-debiased"] = m(21.14, 23.0)  # lower on both: nothing to explain
    assert reporting.where_the_gain_shows(test) is None


def test_the_headline_command_is_one_seed_of_the_studys_chosen_configuration():
    """The command the hint names parses to the configuration of the study's headline (the
    one ``experiments.early_stopping`` trains), without its stoppers."""
    words = shlex.split(reporting.HEADLINE_COMMAND.replace("<C-MAPSS folder>", "/data"))
    assert words[:3] == ["python", "-m", "experiments.train_rul"]
    cfg = train_rul.FLAGS.config(train_rul.parser().parse_args(words[3:]))
    chosen = early_stopping.chosen("/data", patience=1, epochs=150)
    default = Config()
    assert cfg == dataclasses.replace(
        chosen,
        early_stopping=default.early_stopping,
        monitors=default.monitors,
        progress=default.progress,
    )
