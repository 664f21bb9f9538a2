"""experiments.reporting: the notes before training and the verdict line after it."""

from experiments import reporting
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
