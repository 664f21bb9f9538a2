"""experiments.posthoc_study: the recording state and the report (no training: cheap)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ema_jax
from ema_jax import posthoc
from experiments import posthoc_study, training
from experiments.config import Config


def test_recording_state_appends_the_power_function_averages(monkeypatch):
    """The run's EMAs first (as train_rul builds them), then pf 0.05 / 0.10, plain."""
    cfg = Config(ema_decays=(0.99, 0.999), ema_debias=(True, True))
    params = {"w": jnp.ones((3, 2))}

    def build(cfg, ds, key):  # training.build's state, without a model to initialise
        tx = ema_jax.ema(cfg.ema_decays, debias=cfg.ema_debias)
        return None, ema_jax.EmaTrainState.create(
            apply_fn=None, params=params, tx=optax.sgd(0.1), ema=tx
        )

    monkeypatch.setattr(training, "build", build)
    _, plain = posthoc_study.recording_state(cfg, None, jax.random.key(0), record=False)
    _, state = posthoc_study.recording_state(cfg, None, jax.random.key(0), record=True)
    assert plain.num_averages == 2 and state.num_averages == 4
    assert state.ema.debias == (True, True, False, False)
    state = state.apply_gradients(grads={"w": jnp.ones((3, 2))})
    state = state.apply_gradients(grads={"w": jnp.ones((3, 2))})
    recorded = posthoc_study.recorded_averages(state, cfg)
    assert len(recorded) == len(posthoc.SIGMA_RELS)
    # Step 2 of pf(σ_rel): β_2 = (1/2)^(γ+1), the average of the params after steps 1 and 2.
    for tree, sigma in zip(recorded, posthoc.SIGMA_RELS, strict=True):
        beta = 0.5 ** (ema_jax.sigma_rel_to_gamma(sigma) + 1)
        np.testing.assert_allclose(tree["w"], beta * 0.9 + (1 - beta) * 0.8, rtol=1e-6)


def _run(seed, val_curve, chosen, test):
    grid = [0.05, 0.1, 0.2]
    return {
        "config": {"seed": seed, "subset": "FD001"},
        "steps_per_epoch": 25,
        "snapshots": 30,
        "snapshot_every_epochs": 5,
        "save_seconds": [0.01, 0.02],
        "epoch_seconds": 2.0,
        "grid": [{"sigma_rel": s, "val_rmse": v} for s, v in zip(grid, val_curve, strict=True)],
        "chosen_sigma_rel": chosen,
        "best_direct": "ema0.999-debiased",
        "val_rmse": {"raw": 14.0, "ema0.999-debiased": 13.0, "pf0.05": 13.2, "posthoc": 12.5},
        "test_rmse": test,
        "synthesis_seconds": [0.2, 0.3, 0.25],
    }


def test_report_tables_the_chosen_sigma_against_raw_and_tracked(tmp_path):
    runs = [
        _run(
            s,
            [13.0, 12.5, 12.9],
            0.1,
            {
                "raw": 13.0 + s,
                "ema0.999-debiased": 12.6 + s,
                "pf0.05": 12.8 + s,
                "posthoc": 12.4 + s,
            },
        )
        for s in range(3)
    ]
    timing = {
        "epochs_per_round": 5,
        "seconds": {"with": [10.4, 10.6], "without": [10.0, 10.0]},
        "ratio": 1.05,
    }
    text = posthoc_study.report(runs, timing, tmp_path, "ph", "python -m experiments.posthoc_study")
    assert "| **post-hoc, chosen σ_rel** | 12.50 ± 0.00 | 13.40 ± 2.48 | -0.60 ± 0.00 |" in text
    assert "Chosen σ_rel per seed: 0.1, 0.1, 0.1" in text
    assert "post-hoc − that EMA on test, paired: -0.20 ± 0.00" in text
    assert "with / without = **1.050**" in text
    assert json.loads((tmp_path / "ph.json").read_text())["timing"]["ratio"] == 1.05
    assert (tmp_path / "ph.png").stat().st_size > 0


def test_the_cost_line_reports_the_grid_in_one_pass_and_reads_older_runs():
    one_pass = {**_run(0, [13.0, 12.5, 12.9], 0.1, {}), "grid_seconds": 0.5}
    del one_pass["synthesis_seconds"]
    line = posthoc_study.synthesis_cost([one_pass, {**one_pass, "grid_seconds": 0.7}])
    assert "grid of 3 σ_rel in one pass, each of the 30 snapshots read once" in line
    assert "0.60 ± " in line
    older = posthoc_study.synthesis_cost([_run(0, [13.0, 12.5, 12.9], 0.1, {})])
    assert "0.250 ± " in older and "s per σ_rel; the grid of 3: 0.8 ± " in older
    assert "seeds" not in line + older


def test_the_cost_line_names_the_seeds_of_each_kind_when_runs_mix_them():
    """Runs recorded before the one-pass synthesis (one pass per σ_rel) next to newer ones:
    each kind's time over its own seeds."""
    older = _run(0, [13.0, 12.5, 12.9], 0.1, {})
    newer = {**_run(5, [13.0, 12.5, 12.9], 0.1, {}), "grid_seconds": 0.5}
    del newer["synthesis_seconds"]
    line = posthoc_study.synthesis_cost([older, newer])
    assert "read once (seeds 5): 0.50" in line
    assert "once per σ_rel (seeds 0): 0.250" in line and "the grid of 3: 0.8" in line
