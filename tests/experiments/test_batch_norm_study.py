"""experiments.batch_norm_study: the configuration it trains and its report's pairing."""

from experiments import batch_norm_study as study


def _run(seed, rmses):
    test = {v: {"rmse": r, "score": 10 * r} for v, r in zip(study.VARIANTS, rmses, strict=True)}
    return {"config": {"seed": seed, "epochs": 150}, "test": test, "seconds": 1.0}


def test_the_configuration_is_the_chosen_one_with_batch_norm_refit():
    cfg = study.config(None, 150, 3)
    assert (cfg.model, cfg.refit_all, cfg.seed, cfg.epochs) == ("cnn_gru_bn", True, 3, 150)
    assert (cfg.ema_decays, cfg.ema_debias, cfg.early_stopping) == ((0.999,), (True,), None)
    assert (cfg.window, cfg.cycle_feature, cfg.lr_drop_epoch) == (40, True, 100)


def test_the_report_pairs_the_variants_by_seed():
    runs = [_run(0, (13.0, 14.0, 12.5, 12.0)), _run(1, (12.0, 13.0, 11.9, 11.7))]
    text = study.markdown(runs, "CMD")
    # recalibrated - raw: (-1.0, -0.3): mean -0.65, t(0.975, 1) * s / sqrt(2) = 12.706 * 0.35
    assert "| ema + recalibrated | 11.85 ± 1.91 |" in text
    assert "-0.65 ± 4.45" in text and "2 of 2" in text
    # recalibrated - averaged: (-0.5, -0.2): mean -0.35 ± 12.706 * 0.15 = 1.91
    assert "**Recalibrated − averaged statistics, paired**: -0.35 ± 1.91" in text
    assert "| 1 | 12.00 | 13.00 | 11.90 | 11.70 | 1 |" in text
