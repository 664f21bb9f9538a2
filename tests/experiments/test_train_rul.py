"""RUL training: tiny end-to-end runs (EMA smoother than raw), CLI outputs, sweep statistics."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ema_jax import checkpoint
from experiments import cmapss, sweep, synthetic, train_rul
from experiments.config import Config
from experiments.models import make_model
from experiments.train_rul import (
    KeepBest,
    batches,
    epoch_row,
    history_rows,
    load_data,
    main,
    optimizer,
    perturbed_losses,
    show_progress,
)

EPOCHS = 8


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One tiny CLI run (12 synthetic engines written as NASA-format files, DCNN, 8 epochs):
    the files it writes are what the tests below check."""
    raw = synthetic.generate(n_train=12, n_test=6, seed=0)
    data = tmp_path_factory.mktemp("data")
    synthetic.write(data, raw)
    out = tmp_path_factory.mktemp("run")
    argv = ["--data-dir", str(data), "--model", "dcnn", "--epochs", str(EPOCHS)]
    argv += ["--batch-size", "32", "--lr", "3e-3", "--ema-decay", "0.9", "0.98", "--ema-debias"]
    argv += ["--perturb", "0.05", "--out", str(out), "--no-progress"]
    # Two stoppers that do not end the run: val_loss stops at epoch 5, train_loss never.
    argv += ["--early-stopping", "2", "--monitor", "val_loss", "train_loss"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_rul, "evaluate", _counting(EVALUATED))
        result = main(argv)
    return result, out, cmapss.load(data, seed=0)


EVALUATED: list = []
"""The choices of every call of ``train_rul.evaluate`` (the test split's only reader) in
:func:`cli_run`."""


def _counting(calls):
    evaluate = train_rul.evaluate

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


def _record(rmses, seconds=0.5):
    """One epoch's record as ``ema_jax.train_with_ema`` passes it to a callback (and stores it
    in its history): raw metrics, then one entry per average."""
    raw, *emas = rmses
    return {
        "train_loss": 0.1,
        "val_loss": raw / 100,
        "val_loss_ema": [e / 100 for e in emas],
        "val_mse": raw**2,
        "val_mse_ema": [e**2 for e in emas],
        "seconds": seconds,
    }


class _State:
    """What the callbacks read of an ``EmaTrainState``."""

    def __init__(self, params, ema_params):
        self.params, self.ema_params = params, tuple(ema_params)


def test_keep_best_keeps_each_variants_lowest_validation_epoch_on_the_host():
    """Per variant, the first epoch with the lowest validation RMSE (a tie keeps the earlier
    one), with a host copy of that variant's weights at that epoch."""
    keep = KeepBest(["raw", "ema0.9"])
    curves = [(20.0, 18.0), (15.0, 13.0), (16.0, 13.0), (14.0, 13.5)]
    for epoch, rmses in enumerate(curves):
        state = _State({"w": jnp.full(2, epoch)}, [{"w": jnp.full(2, 10 + epoch)}])
        keep(epoch, _record(rmses), state)
    assert (keep.best["raw"].epoch, keep.best["ema0.9"].epoch) == (4, 2)
    assert keep.best["raw"].val_rmse == pytest.approx(14.0)
    assert keep.best["ema0.9"].val_rmse == pytest.approx(13.0)
    weights = keep.best["ema0.9"].params["w"]
    assert isinstance(weights, np.ndarray)  # a host copy: the train step donates the state
    np.testing.assert_array_equal(weights, [11, 11])
    np.testing.assert_array_equal(keep.best["raw"].params["w"], [3, 3])


def test_history_rows_are_the_loops_history_one_row_per_epoch():
    """The rows come from the history the loop returns: its ``seconds`` (no clock of our
    own), the train loss, and per variant the validation loss and RMSE, in this order."""
    records = [_record((20.0, 18.0), 1.5), _record((15.0, 13.0), 0.25)]
    history = {k: [r[k] for r in records] for k in records[0]}
    rows = history_rows(history, ["raw", "ema0.9"])
    assert rows == [epoch_row(e, r, ["raw", "ema0.9"]) for e, r in enumerate(records)]
    assert list(rows[1]) == [
        "epoch", "seconds", "train_loss",
        "val_loss_raw", "val_rmse_raw", "val_loss_ema0.9", "val_rmse_ema0.9",
    ]  # fmt: skip
    assert (rows[1]["epoch"], rows[1]["seconds"], rows[1]["val_loss_ema0.9"]) == (2, 0.25, 0.13)
    np.testing.assert_allclose([r["val_rmse_ema0.9"] for r in rows], [18.0, 13.0])


def test_progress_shows_every_average():
    """The bar and the per-epoch line name every variant's validation RMSE (issue #19), not
    only the first average's."""

    class Bar:
        def __init__(self):
            self.postfix, self.lines, self.n = [], [], 0

        def set_postfix_str(self, text):
            self.postfix.append(text)

        def update(self, n):
            self.n += n

        def write(self, text):
            self.lines.append(text)

    bar = Bar()
    show = show_progress(bar, ["raw", "ema0.9", "ema0.99-debiased"])
    show(0, _record((20.0, 18.0, 17.0)), _State({}, [{}, {}]))
    summary = "train 0.1000  val RMSE raw 20.00  ema0.9 18.00  ema0.99-debiased 17.00"
    assert bar.postfix == [summary] and bar.n == 1
    assert bar.lines == [f"epoch   1  {summary}  (0.5s)"]


def test_a_plain_average_longer_than_the_run_gets_a_note():
    """Issue #19: a 3-epoch run with the old default (plain β = 0.999) scored 45.7 against
    raw's 17.5 without a word. The default is now debiased; a plain average whose initial
    weights keep more than 10 % after the run's steps is named, with that share."""
    assert train_rul.initial_weight_notes(Config(), 81) == []  # the debiased default
    plain = Config(ema_decays=(0.9, 0.999), ema_debias=(False, False))
    (note,) = train_rul.initial_weight_notes(plain, 81)
    assert note.startswith("note: ema0.999 is a plain average") and "92%" in note  # .999**81
    assert train_rul.initial_weight_notes(plain, 2400) == []  # 0.999**2400 = 9 %


def test_the_verdict_compares_the_validation_chosen_average_with_raw():
    def m(val, test):
        return {"val_rmse": val, "rmse": test}

    test = {"last": {"raw": m(20.0, 18.0), "ema0.9": m(19.0, 18.5), "ema0.99": m(19.5, 17.0)}}
    line = train_rul.verdict(test)
    assert line.startswith("final weights: ema0.9 (the average with the lowest validation")
    assert line.endswith(
        "val 19.00 / test 18.50 against raw 20.00 / 18.00: the EMA is lower on validation only"
    )
    test["last"]["ema0.9"] = m(21.0, 17.5)  # now ema0.99 has the lowest validation RMSE
    assert train_rul.verdict(test).endswith("the EMA is lower on both")
    test["last"] = {"raw": m(1.0, 1.0), "ema0.9": m(2.0, 2.0)}
    assert train_rul.verdict(test).endswith("the EMA is not lower")


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


def test_batches_shuffle_full_batches_or_keep_order():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.float32)
    shuffled = list(batches(x, y, 4, np.random.default_rng(0)))
    assert [len(b[1]) for b in shuffled] == [4, 4]  # the partial batch is dropped
    seen = np.concatenate([b[1] for b in shuffled])
    assert len(set(seen.tolist())) == 8
    np.testing.assert_array_equal(np.concatenate([b[0][:, 0] for b in shuffled]), seen)
    ordered = list(batches(x, y, 4, None))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in ordered]), y)


def test_perturbation_probe_matches_quadratic_closed_form():
    """For L(θ) = Σθ², E[L(θ + ε)] − L(θ) = Σ_l n_l·(r·rms θ_l)² = r²·L(θ)."""
    params = {"a": jnp.linspace(-1.0, 2.0, 50), "b": jnp.full((4, 5), 3.0)}

    def loss(p):
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

    out = perturbed_losses(loss, params, [0.1, 0.3], jax.random.key(0), draws=32)
    base = float(loss(params))
    np.testing.assert_allclose(out["0.1"], 0.01 * base, rtol=0.1)
    np.testing.assert_allclose(out["0.3"], 0.09 * base, rtol=0.1)

    # The noise is scaled per leaf: a loss of leaf "a" alone rises by r²·Σa². (One rms over
    # all leaves would give n_a·r²·(Σa² + Σb²)/70, 3.3× as much here.)
    def loss_a(p):
        return jnp.sum(p["a"] ** 2)

    out = perturbed_losses(loss_a, params, [0.3], jax.random.key(1), draws=32)
    np.testing.assert_allclose(out["0.3"], 0.09 * float(loss_a(params)), rtol=0.1)


def test_mean_ci_is_the_t_interval():
    m, h = sweep.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # t_{0.975, 4} = 2.776445 (tables); s = sqrt(2.5)
    assert m == 3.0
    np.testing.assert_allclose(h, 2.776445 * np.sqrt(2.5) / np.sqrt(5), rtol=1e-6)
    assert np.isnan(sweep.mean_ci([4.0])[1])
    with pytest.raises(ValueError, match="at least one value"):
        sweep.mean_ci([])


def _fake(seed, val, test):
    variants = ["raw", "ema0.9"]
    metrics = {
        n: {"val_rmse": v, "rmse": t, "score": 10 * t, "epoch": 3}
        for n, v, t in zip(variants, val, test, strict=True)
    }
    cfg = dataclasses.asdict(Config(epochs=3, batch_size=8, seed=seed, perturb=(0.01,)))
    return {"config": cfg, "rows": [], "test": {"last": metrics, "best": metrics}}


def test_sweep_table_pairs_by_seed_and_selects_on_validation_only():
    # ema0.9 is better on validation but worse on test: the table must still pick it
    runs = {"m": [_fake(s, [14.0 + s, 13.0 + s], [12.0 + s, 12.5 + s]) for s in range(3)]}
    rows = {r["variant"]: r for r in sweep.summarise(runs["m"], "last")}
    np.testing.assert_allclose(rows["ema0.9"]["d_rmse"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(rows["ema0.9"]["d_rmse_pct"], [50 / (12 + s) for s in range(3)])
    text = sweep.markdown(runs, "cmd")
    best = text.split("## Best configuration")[1]
    assert "weights `ema0.9`" in best
    assert "test RMSE 13.50 ± " in best
    # the reproducing command: the flags that differ from the sweep's defaults
    assert (
        "Runs: `python -m experiments.sweep --models m --seeds 3 --epochs 3 --batch-size 8 "
        "--perturb 0.01`" in text
    )


def test_sweep_picks_a_best_configuration_per_rule_without_ranking_the_rules():
    """Under rule ``best`` the validation RMSE is the minimum of the curve it selects on, so
    it would win any comparison with ``last``: each rule gets its own pick instead."""
    runs = {"m": [_fake(s, [14.0, 13.0], [12.0, 12.5]) for s in range(2)]}
    for r in runs["m"]:  # raw's best epoch looks better on validation than anything `last`
        r["test"]["best"] = {**r["test"]["last"], "raw": {**r["test"]["last"]["raw"]}}
        r["test"]["best"]["raw"].update(val_rmse=11.0, rmse=15.0, epoch=1)
    section = sweep.markdown(runs, "cmd").split("## Best configuration per rule")[1]
    last = next(line for line in section.splitlines() if line.startswith("- rule `last`"))
    best = next(line for line in section.splitlines() if line.startswith("- rule `best`"))
    assert "weights `ema0.9`" in last and "test RMSE 12.50" in last
    assert "weights `raw`" in best and "validation RMSE 11.00" in best


def _step_sizes(cfg, steps_per_epoch, n):
    """How far each of the first ``n`` steps moves a weight under a constant gradient: Adam's
    m̂/√v̂ is then 1, so each step moves it by the learning rate of that step."""
    tx = optimizer(cfg, steps_per_epoch=steps_per_epoch)
    params = jnp.zeros(2)
    state = tx.init(params)
    sizes = []
    for _ in range(n):
        updates, state = tx.update(jnp.ones(2), state, params)
        sizes.append(float(-updates[0]))
    return sizes


def test_lr_drop_multiplies_the_step_size_from_the_given_epoch():
    """lr for the first ``lr_drop_epoch`` epochs, lr·factor afterwards."""
    steps = _step_sizes(Config(lr=1e-2, lr_drop_epoch=2, lr_drop_factor=0.1), 3, 9)
    np.testing.assert_allclose(steps[:6], 1e-2, rtol=1e-4)
    np.testing.assert_allclose(steps[6:], 1e-3, rtol=1e-4)


def test_cosine_decays_the_step_size_to_zero_over_all_epochs():
    """``lr·½(1 + cos(π·t/T))`` with T = epochs · steps_per_epoch = 8 (closed form)."""
    steps = _step_sizes(Config(lr=1e-2, cosine=True, epochs=2), 4, 8)
    want = [1e-2 * 0.5 * (1 + np.cos(np.pi * t / 8)) for t in range(8)]
    np.testing.assert_allclose(steps, want, rtol=1e-4, atol=1e-9)


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


def test_sweep_cli_runs_resumes_and_keeps_test_figures_off_the_console(cli_run, tmp_path, capsys):
    """``sweep.main`` end to end (one seed, two epochs): the run JSON, table and plot are
    written; the console names validation RMSE only; a second call trains nothing."""
    _, out, _ = cli_run
    data = json.loads((out / "history.json").read_text())["config"]["data_dir"]
    argv = ["--data-dir", data, "--models", "dcnn", "--seeds", "1", "--epochs", "2"]
    argv += ["--batch-size", "32", "--perturb", "--runs", str(tmp_path / "runs")]
    argv += ["--out", str(tmp_path), "--name", "tiny"]
    sweep.main(argv)
    printed = capsys.readouterr().out
    assert re.search(r"dcnn seed 0: val RMSE raw \d+\.\d\d  ema0\.999 \d+\.\d\d", printed)
    progress = [line for line in printed.splitlines() if " seed " in line]
    assert len(progress) == 1 and "test" not in progress[0].lower()
    stored = json.loads((tmp_path / "runs" / "dcnn" / "seed0.json").read_text())
    assert stored["config"]["epochs"] == 2 and set(stored["test"]) == {"last", "best"}
    table = (tmp_path / "tiny.md").read_text()
    assert "## dcnn: 1 seeds, 2 epochs" in table and "## Best configuration" in table
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep.main(argv)  # resumable: the stored run is reused, nothing is trained again
    assert "seed 0:" not in capsys.readouterr().out
    other = [a if a != "2" else "3" for a in argv]  # --epochs 3 into the same --runs
    with pytest.raises(
        SystemExit, match=r"seed0\.json was run with other settings \(epochs=2 there, 3 now\)"
    ):
        sweep.main(other)


def test_sweep_never_selects_a_refit_run():
    """Refit runs have no validation engines: their monitor column must not win selection,
    and their reproducing command names the schedule and ``--refit-all``."""
    runs = {"m": [_fake(s, [14.0, 13.0], [12.0, 12.5]) for s in range(2)]}
    refit = [_fake(s, [1.0, 1.0], [11.0, 11.0]) for s in range(2)]
    for r in refit:
        r["config"].update(refit_all=True, lr_drop_epoch=2, lr_drop_factor=0.1)
    runs["m" + sweep.REFIT_SUFFIX] = refit
    text = sweep.markdown(runs, "cmd")
    assert "`m`, weights `ema0.9`" in text.split("## Best configuration")[1]
    assert "--models m --seeds 2 --epochs 3 --batch-size 8 --lr-drop-epoch 2 --refit-all" in text
    # the refit section reports the validation-chosen `last` variant of the split runs
    refit_text = text.split("retrained on all training engines")[1]
    assert "(`ema0.9`, 13.00)" in refit_text
    assert "**test RMSE 11.00 ± 0.00**" in refit_text


def test_load_data_applies_window_cap_and_smoothing(cli_run):
    """``window``/``max_rul``/``smooth`` reach ``cmapss.prepare``: window length, capped targets
    (test labels too), and causal smoothing (a window's smoothed values depend on its own and
    earlier cycles only, so its last row matches the hand recursion over the engine's past)."""
    _, out, plain = cli_run
    data = json.loads((out / "history.json").read_text())["config"]["data_dir"]
    ds = load_data(Config(data_dir=data, model="dcnn", window=12, max_rul=80.0, smooth=0.6))
    assert ds.x_train.shape[1:] == (12, plain.x_train.shape[2])
    assert ds.y_train.max() == 80.0 and ds.y_test.max() <= 80.0
    same = load_data(Config(data_dir=data, model="dcnn"))
    np.testing.assert_array_equal(same.x_train, plain.x_train)  # defaults: unchanged
    padded = load_data(Config(data_dir=data, model="dcnn", min_prefix=25))  # windows of 30
    assert len(padded.x_train) == len(plain.x_train) + 5 * len(np.unique(plain.unit_train))
    np.testing.assert_array_equal(padded.x_val, plain.x_val)
    aged = load_data(Config(data_dir=data, model="dcnn", cycle_feature=True))
    assert aged.features == ("cycle", *plain.features)
    np.testing.assert_array_equal(aged.x_train[..., 1:], plain.x_train)
    # the first engine's windows: the unsmoothed last rows are its scaled cycles
    unsmoothed = load_data(Config(data_dir=data, model="dcnn", window=12, max_rul=80.0))
    first = unsmoothed.unit_train == unsmoothed.unit_train[0]
    rows = np.concatenate([unsmoothed.x_train[first][0], unsmoothed.x_train[first][1:, -1]])
    expect = rows.astype(np.float64).copy()
    for t in range(1, len(expect)):
        expect[t] = 0.6 * expect[t - 1] + 0.4 * rows[t]
    got = ds.x_train[ds.unit_train == ds.unit_train[0]][:, -1]
    np.testing.assert_allclose(got, expect[11:], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cmapss.exponential_smoothing(rows, 0.0), rows)
    with pytest.raises(ValueError, match=r"smooth must be a number in \[0, 1\)"):
        cmapss.exponential_smoothing(rows, 1.0)


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


def test_sweep_command_names_non_default_data_options():
    fake = _fake(0, [14.0, 13.0], [12.0, 12.5])
    fake["config"].update(window=40, members=5, min_prefix=31, cycle_feature=True)
    command = sweep.run_command("m", [fake])
    assert command.endswith(
        "--window 40 --members 5 --min-prefix 31 --cycle-feature --perturb 0.01"
    )
    assert "--max-rul" not in command and "--smooth" not in command
    assert Config.from_json(fake["config"]).data_description() == (
        ", window 40, members 5, prefixes from cycle 31, cycle feature"
    )
    assert Config().data_description() == ""
    assert "## m: 1 seeds, 3 epochs, batch 8, Adam lr 0.001, window 40, members 5" in (
        sweep.markdown({"m": [fake]}, "cmd")
    )


def test_window_check_scores_the_truncated_validation_engines(monkeypatch) -> None:
    """``experiments.window_check`` trains like ``train_rul`` and scores every cut of the
    validation engines (cycles >= 31) — the same endpoints for every window length. The
    RMSEs it reports are those of the trained weights on those cuts (float64 NumPy)."""
    from experiments import cmapss, train_rul, window_check
    from experiments.synthetic import generate

    seen = []

    def run_and_keep(cfg, ds):  # the real run; keeps what it trained and scored
        result, state = train_rul.run(cfg, ds)
        seen.append((cfg, ds, state))
        return result, state

    monkeypatch.setattr(window_check, "run", run_and_keep)
    (row,) = window_check.main(
        ["--windows", "35", "--epochs", "1", "--model", "dcnn_li", "--batch-size", "1024"]
    )
    raw = generate(seed=0)
    _, val_units = cmapss.split_units(raw.train[:, 0], 0.2, 0)
    lives = [int((raw.train[:, 0] == u).sum()) for u in val_units]
    assert row["seed"] == 0 and row["window"] == 35
    assert row["endpoints"] == sum(life - 30 for life in lives)
    assert set(row["last"]) == {"raw", "ema0.999-debiased"}
    [(cfg, ds, state)] = seen
    model = make_model(cfg.model)
    (ema,) = state.ema_params  # train_rul keeps its decays as a tuple, here of one
    for name, params in (("raw", state.params), ("ema0.999-debiased", ema)):
        pred = np.asarray(model.apply({"params": params}, ds.x_test), np.float64) * ds.max_rul
        rmse = np.sqrt(np.mean((pred - ds.y_test.astype(np.float64)) ** 2))
        np.testing.assert_allclose(row["last"][name], rmse, rtol=1e-4, atol=1e-3)
    with pytest.raises(SystemExit):
        window_check.main(["--members", "2"])
