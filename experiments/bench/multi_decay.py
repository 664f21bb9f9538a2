"""P4: K decays in one update vs K separate single-decay updates.

One update with K decays reads the params once and reads and writes K averages, side by
side in one ``[..., K]`` array per leaf: ``4 + 8K`` B/param against ``12K`` for K
separate updates, so the goal is a time ratio ≤ (1 + 2K) / (3K).
"""

from __future__ import annotations

from typing import Any

import ema_jax
from experiments.bench.harness import Donated, Timed, device_params, ema_update, median_ms

DECAYS = (0.99, 0.999, 0.9999, 0.99999)
"""The first K of these are measured."""


def target_ratio(k: int) -> float:
    """The bytes moved by one K-decay update over those of K single-decay updates."""
    return (1 + 2 * k) / (3 * k)


def bench_multi_decay(
    n: int, leaves: int, repeats: int, k: int = 3, skip_nonfinite: bool = True
) -> dict[str, Any]:
    """``ema(decay=(β_1..β_K))`` vs K separate single-decay updates, in median ms, and
    their ratio next to :func:`target_ratio`."""
    params = device_params(n, leaves)
    decays = DECAYS[:k]

    def donated(decay: Any) -> Donated:
        tx = ema_jax.ema(decay, skip_nonfinite=skip_nonfinite)
        return Donated(ema_update(tx), tx.init(params), params)

    separate = [donated(d) for d in decays]

    def run_separate() -> None:
        for step in separate:
            step()

    fns: dict[str, Timed] = {
        "K decays, one update": donated(decays),
        "K separate updates": run_separate,
    }
    ms = median_ms(fns, repeats)
    return {
        "K": k,
        "params": n,
        "leaves": leaves,
        "skip_nonfinite": skip_nonfinite,
        "ms": ms,
        "ratio": ms["K decays, one update"] / ms["K separate updates"],
        "target": target_ratio(k),
    }
