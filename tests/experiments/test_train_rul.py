"""``python -m experiments.train_rul`` end to end: one tiny run's files, figures and rules
(EMA smoother than raw, selection on validation only, the test split read once)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ema_jax import checkpoint
from experiments import cmapss, selection
from experiments.config import Config
from experiments.flatness import perturbed_losses
from experiments.models import make_model
from experiments.train_rul import main
from experiments.training import load_data

EPOCHS = 8


@pytest.fixture(scope="module")
def cli_run(tiny_data_dir, tmp_path_factory):
    """One tiny CLI run (12 synthetic engines written as NASA-format files, DCNN, 8 epochs):
    the files it writes are what the tests below check."""
    data = tiny_data_dir
    out = tmp_path_factory.mktemp("run")
    argv = ["--data-dir", str(data), "--model", "dcnn", "--epochs", str(EPOCHS)]
    argv += ["--batch-size", "32", "--lr", "3e-3", "--ema-decay", "0.9", "0.98", "--ema-debias"]
    argv += ["--perturb", "0.05", "--out", str(out), "--no-progress"]
    # Two stoppers that do not end the run: val_loss stops at epoch 5, train_loss never.
    argv += ["--early-stopping", "2", "--monitor", "val_loss", "train_loss"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection, "evaluate", _counting(EVALUATED))
        result = main(argv)
    return result, out, cmapss.load(data, seed=0)


EVALUATED: list = []
"""The choices of every call of ``selection.evaluate`` (the test split's only reader) in
:func:`cli_run`."""


def _counting(calls):
    evaluate = selection.evaluate

    def counting(scoring, ds, choices):
        calls.append(choices)
        return evaluate(scoring, ds, choices)

    return counting


def test_early_stopping_is_recorded_and_tested_once(cli_run):
    """``--early-stopping 2 --monitor val_loss train_loss``: history.json records each
    stopper (epochs from 1, like the rows); the run lasts until both stop (train_loss never
    does); rule ``early`` is evaluated with the others, in the one reading of the test split."""
    _, out, _ = cli_run
    history = json.loads((out / "history.json").read_text())
    stops = history["early_stopping"]
    assert history["config"]["early_stopping"] == 2
    assert history["config"]["monitors"] == ["val_loss", "train_loss"]
    rows = history["rows"]
    assert len(rows) == EPOCHS
    losses = [r["val_loss_raw"] for r in rows]
    best = 1 + int(np.argmin(losses[:5]))
    assert stops["val_loss"]["best_epoch"] == best
    assert stops["val_loss"]["stopped_epoch"] == best + 2 == 5  # Keras: patience 2
    assert stops["val_loss"]["best_metric"] == pytest.approx(losses[best - 1], rel=1e-12)
    assert stops["train_loss"]["stopped_epoch"] is None
    assert stops["train_loss"]["variant"] == stops["val_loss"]["variant"] == "raw"
    assert len(EVALUATED) == 1 and set(EVALUATED[0]) == {"last", "best", "early"}
    test = history["test"]
    assert test["early"]["val_loss"]["epoch"] == best
    # Same weights, same figures: raw's best epoch is 3 of 8; train_loss's best is the last.
    assert test["best"]["raw"]["epoch"] == best and test["early"]["val_loss"] == test["best"]["raw"]
    assert test["early"]["train_loss"]["epoch"] == EPOCHS
    assert test["early"]["train_loss"]["rmse"] == test["last"]["raw"]["rmse"]


def roughness(values):
    """Σ_e (L_e − L_{e−1})²: the epoch-to-epoch jitter of a curve."""
    return float(np.sum(np.diff(values) ** 2))


def test_ema_validation_curve_is_smoother_than_raw(cli_run):
    result, _, _ = cli_run
    rows = result["rows"]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    raw = [r["val_loss_raw"] for r in rows]
    ema = [r["val_loss_ema0.98-debiased"] for r in rows]
    assert np.isfinite(raw).all() and min(raw) < raw[0]  # it did learn
    assert roughness(ema) < 0.5 * roughness(raw)


def test_cli_writes_history_and_plot(cli_run, capsys):
    result, out, _ = cli_run
    history = json.loads((out / "history.json").read_text())
    assert history["config"]["ema_decays"] == [0.9, 0.98]
    assert history["config"]["ema_debias"] == [True, True]
    assert history["rows"] == result["rows"]
    header, *lines = (out / "history.csv").read_text().splitlines()
    columns = header.split(",")
    assert columns[:3] == ["epoch", "seconds", "train_loss"]
    for name in ("raw", "ema0.9-debiased", "ema0.98-debiased"):
        assert f"val_loss_{name}" in columns and f"val_rmse_{name}" in columns
    assert len(lines) == EPOCHS
    first = dict(zip(columns, lines[0].split(","), strict=True))
    np.testing.assert_allclose(float(first["val_rmse_raw"]), result["rows"][0]["val_rmse_raw"])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "curves.png").stat().st_size < 200_000


def test_selection_uses_validation_only(cli_run):
    result, _, _ = cli_run
    for name in ("raw", "ema0.9-debiased", "ema0.98-debiased"):
        curve = [r[f"val_rmse_{name}"] for r in result["rows"]]
        best = result["test"]["best"][name]
        assert best["val_rmse"] == min(curve)
        assert best["epoch"] == 1 + int(np.argmin(curve))
        last = result["test"]["last"][name]
        assert (last["epoch"], last["val_rmse"]) == (EPOCHS, curve[-1])


def test_exported_ema_params_reproduce_the_reported_test_metrics(cli_run):
    """The exported weights, run on the test windows and scored in float64 NumPy, give the
    test RMSE and PHM08 score the run reported for them."""
    result, out, ds = cli_run
    model = make_model("dcnn")
    for name in ("ema0.9-debiased", "ema0.98-debiased"):
        params = checkpoint.load_exported(out / "ema_params" / name)
        pred = np.asarray(model.apply({"params": params}, ds.x_test), np.float64) * ds.max_rul
        d = pred - ds.y_test.astype(np.float64)
        score = np.sum(np.where(d < 0, np.exp(-d / 13) - 1, np.exp(d / 10) - 1))
        reported = result["test"]["last"][name]
        np.testing.assert_allclose(reported["rmse"], np.sqrt(np.mean(d**2)), rtol=1e-4)
        np.testing.assert_allclose(reported["score"], score, rtol=1e-4)


def test_best_rule_metrics_are_those_of_the_best_epoch(cli_run, tmp_path):
    """The ``best`` rule's test figures are the weights of the best validation epoch: a run
    stopped at that epoch (same seed; constant learning rate, so its epochs are the same)
    reports them under ``last``."""
    result, out, _ = cli_run
    best = result["test"]["best"]
    name = min(best, key=lambda n: best[n]["epoch"])
    stop = best[name]["epoch"]
    assert stop < EPOCHS, "the tiny run should peak before its last epoch"
    data = json.loads((out / "history.json").read_text())["config"]["data_dir"]
    argv = ["--data-dir", data, "--model", "dcnn", "--epochs", str(stop), "--batch-size", "32"]
    argv += ["--lr", "3e-3", "--ema-decay", "0.9", "0.98", "--ema-debias"]
    argv += ["--out", str(tmp_path), "--no-progress"]
    short = main(argv)["test"]["last"][name]
    for key in ("rmse", "score", "val_rmse"):
        np.testing.assert_allclose(short[key], best[name][key], rtol=1e-6)


def test_flatness_probe_perturbs_each_variants_own_weights(cli_run):
    """Each EMA variant's probe, recomputed from its exported weights with the run's probe
    key (the third split of ``key(seed)``) on the validation windows, is what was reported."""
    result, out, ds = cli_run
    probe = result["perturb"]
    assert set(probe) == {"raw", "ema0.9-debiased", "ema0.98-debiased"}
    assert all(probe[name]["0.05"] > 0 for name in probe)  # noise raises the loss
    model = make_model("dcnn")

    def val_loss(params, x, y):
        return jnp.mean((model.apply({"params": params}, x) - y / ds.max_rul) ** 2)

    probe_key = jax.random.split(jax.random.key(0), 3)[2]
    data = (jnp.asarray(ds.x_val), jnp.asarray(ds.y_val))
    for name in ("ema0.9-debiased", "ema0.98-debiased"):
        params = checkpoint.load_exported(out / "ema_params" / name)
        again = perturbed_losses(val_loss, params, [0.05], probe_key, 4, data)
        np.testing.assert_allclose(again["0.05"], probe[name]["0.05"], rtol=1e-4)


def test_refit_all_trains_on_every_engine_and_selects_nothing(cli_run, tmp_path):
    """``--refit-all``: every training engine is trained on (no validation engines), and the
    ``best`` rule is the final epoch (nothing is selected without validation data)."""
    _, out, _ = cli_run
    data = json.loads((out / "history.json").read_text())["config"]["data_dir"]
    cfg = Config(data_dir=data, model="dcnn", refit_all=True)
    full = load_data(cfg)
    assert len(full.x_val) == 0
    assert set(full.unit_train.tolist()) == set(range(1, 13))
    argv = ["--data-dir", data, "--model", "dcnn", "--epochs", "2", "--batch-size", "32"]
    argv += ["--ema-decay", "0.9", "--refit-all", "--out", str(tmp_path), "--no-progress"]
    result = main(argv)
    assert result["config"]["refit_all"] is True
    for name in ("raw", "ema0.9-debiased"):  # averages are debiased by default
        assert result["test"]["best"][name] == result["test"]["last"][name]
        assert result["test"]["best"][name]["epoch"] == 2


def test_ensemble_run_trains_every_member(cli_run, tmp_path):
    """``--members 2``: one run trains two copies; the EMA covers both; the reported test
    RMSE is the mean prediction's."""
    _, out, ds = cli_run
    data = json.loads((out / "history.json").read_text())["config"]["data_dir"]
    argv = ["--data-dir", data, "--model", "dcnn", "--epochs", "2", "--batch-size", "32"]
    argv += ["--members", "2", "--ema-decay", "0.9", "--out", str(tmp_path), "--no-progress"]
    result = main(argv)
    assert result["config"]["members"] == 2
    params = checkpoint.load_exported(tmp_path / "ema_params" / "ema0.9-debiased")
    assert sorted(params) == ["member0", "member1"]
    pred = np.asarray(make_model("dcnn", members=2).apply({"params": params}, ds.x_test))
    rmse = cmapss.rmse(pred * ds.max_rul, ds.y_test)
    np.testing.assert_allclose(result["test"]["last"]["ema0.9-debiased"]["rmse"], rmse, rtol=1e-4)


BEFORE_TRAINING = {
    "batch larger than the data": (
        ["--batch-size", "100000"],
        r"argument --batch-size: 100000 is more than the \d+ training windows, so an epoch "
        r"would have no full batch: use --batch-size <= \d+$",
    ),
    "window leaving fewer windows than a batch": (
        ["--window", "400"],
        r"argument --batch-size: 256 is more than the \d+ training windows that --window 400 "
        r"leaves.* or a shorter --window$",
    ),
    "out is a file": (["--out", "{file}"], r"argument --out: \S+ is a file, not a directory$"),
    "out under a file": (
        ["--out", "{file}/run"],
        r"argument --out: \S+ is under \S+, which is a file, not a directory$",
    ),
}


@pytest.mark.parametrize(("argv", "message"), BEFORE_TRAINING.values(), ids=BEFORE_TRAINING)
def test_data_and_out_mistakes_end_in_one_line_before_training(
    argv, message, tiny_data_dir, tmp_path, capsys, monkeypatch
):
    """A batch larger than the data (also through a long ``--window``) and an ``--out``
    that is (or is under) a file: usage, one line naming the flag, exit status 2, and no
    training (``run`` is never called)."""
    file = tmp_path / "a_file"
    file.write_text("not a directory")
    argv = [word.format(file=file) for word in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    trained = []
    monkeypatch.setattr("experiments.train_rul.run", lambda *a: trained.append(a))
    with pytest.raises(SystemExit) as exc:
        main(["--data-dir", str(tiny_data_dir), "--no-progress", *argv])
    assert exc.value.code == 2 and not trained
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: python -m experiments.train_rul")
    assert re.fullmatch(r"python -m experiments\.train_rul: error: .*", err[-1])
    assert re.search(message, err[-1])
    assert file.read_text() == "not a directory"


def test_the_monitors_config_accepts_are_the_metrics_a_run_validates(tiny_data_dir):
    """``--monitor`` is checked without JAX against ``config.VALIDATION_METRICS``: those are
    exactly the metrics ``Scoring.metrics`` computes each epoch."""
    from experiments.config import VALIDATION_METRICS
    from experiments.training import build

    cfg = Config(data_dir=str(tiny_data_dir), model="dcnn")
    ds = load_data(cfg)
    scoring, state = build(cfg, ds, jax.random.key(0))
    metrics = scoring.metrics(state.params, (ds.x_val[:2], ds.y_val[:2]))
    assert tuple(metrics) == VALIDATION_METRICS
