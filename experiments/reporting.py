"""What ``train_rul`` writes and prints: history files, the curves plot, the exported
averages, the results table, the verdict line and the notes before training."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.config import Config, variant_name

if TYPE_CHECKING:
    import ema_jax


def write_history(result: dict[str, Any], out: Path) -> None:
    """``history.json`` (everything) and ``history.csv`` (the per-epoch rows)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(result, indent=1))
    rows = result["rows"]
    with open(out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(result: dict[str, Any], path: Path, variants: Sequence[str] | None = None) -> None:
    """Training loss and validation RMSE per epoch, raw vs each EMA variant (or only
    ``variants``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    epochs = [r["epoch"] for r in rows]
    if variants is None:
        variants = ["raw"] + [
            k[len("val_rmse_") :] for k in rows[0] if k.startswith("val_rmse_ema")
        ]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    ax0.plot(epochs, [r["train_loss"] for r in rows], color="k")
    ax0.set(xlabel="epoch", ylabel="train loss (normalised MSE)", yscale="log")
    for name in variants:
        style = {"color": "k", "lw": 1.0, "alpha": 0.6} if name == "raw" else {"lw": 1.4}
        ax1.plot(epochs, [r[f"val_rmse_{name}"] for r in rows], label=name, **style)
    ax1.set(xlabel="epoch", ylabel="validation RMSE (cycles)")
    lo = min(r[f"val_rmse_{n}"] for r in rows for n in variants)
    ax1.set_ylim(lo * 0.95, lo * 1.6)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def export_ema(state: ema_jax.EmaTrainState, variants: Sequence[str], path: Path) -> list[Path]:
    """Each EMA variant's weights, ``<path>/<variant>``, by ``ema_jax.checkpoint``.

    Standalone Orbax checkpoints of the params tree; read one back with
    ``ema_jax.checkpoint.load_exported(path / variant)``.
    """
    from ema_jax import checkpoint

    written = []
    for index, name in enumerate(variants[1:]):
        target = path / name
        checkpoint.export_ema_params(target, state, ema_index=index, force=True)
        written.append(target)
    return written


def results_table(test: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The final table: per rule and variant, the epoch, validation and test RMSE, PHM08."""
    lines = [
        f"{'weights':<22} {'rule':<5} {'epoch':>5} {'val RMSE':>9} {'test RMSE':>10} {'PHM08':>9}"
    ]
    for rule, variants in test.items():
        for name, m in variants.items():
            lines.append(
                f"{name:<22} {rule:<5} {m['epoch']:>5d} {m['val_rmse']:>9.2f} "
                f"{m['rmse']:>10.2f} {m['score']:>9.1f}"
            )
    return "\n".join(lines)


def initial_weight_notes(cfg: Config, steps: int) -> list[str]:
    """A note for each plain average that, after ``steps`` updates, still gives the initial
    weights a share ``β^steps`` of more than 10 %: a run shorter than its window."""
    return [
        f"note: {variant_name(decay, False)} is a plain average (--no-ema-debias) and this run "
        f"has {steps} steps, so {decay**steps:.0%} of its weight stays on the initial weights; "
        "the debiased default has no such share"
        for decay, debias in zip(cfg.ema_decays, cfg.ema_debias, strict=True)
        if not debias and decay**steps > 0.1
    ]


def verdict(test: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """One line: under rule ``last``, the average with the lowest validation RMSE against the
    raw weights, on validation and test."""
    last = test["last"]
    raw = last["raw"]
    name = min((n for n in last if n != "raw"), key=lambda n: last[n]["val_rmse"])
    ema = last[name]
    lower = [s for s, k in (("validation", "val_rmse"), ("test", "rmse")) if ema[k] < raw[k]]
    outcome = {0: "not lower", 2: "lower on both"}.get(len(lower)) or f"lower on {lower[0]} only"
    return (
        f"final weights: {name} (the average with the lowest validation RMSE) "
        f"val {ema['val_rmse']:.2f} / test {ema['rmse']:.2f} against raw "
        f"{raw['val_rmse']:.2f} / {raw['rmse']:.2f}: the EMA is {outcome}"
    )


__all__ = [
    "export_ema",
    "initial_weight_notes",
    "plot_curves",
    "results_table",
    "verdict",
    "write_history",
]
