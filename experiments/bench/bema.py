"""P7: what BEMA costs next to the EMA: time of one update and bytes of its state.

BEMA (``ema_jax.bema``) keeps the EMA's accumulators and the anchor θ₀: two fp32 copies of
fp32 params where the EMA keeps one. Its update is the EMA's (the anchor is only written
during the burn-in), so in a train step, whose EMA output is not used, it should cost what
the EMA's does; reading its shadow (``α·(θ − θ₀) + EMA``) is one more pass, paid when the
weights are evaluated or exported, not per step.

    python -m experiments.bench.bema
"""

from __future__ import annotations

from typing import Any

import jax

import ema_jax
from experiments.bench.harness import DECAY, Donated, device_params, ema_update, median_ms


def bench_bema(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """Median ms of a donated EMA update, BEMA update, and BEMA update that also returns
    its shadow; the rules' state bytes in copies of the params."""
    params = device_params(n, leaves)
    ema, bema = ema_jax.ema(DECAY), ema_jax.bema()

    def bema_with_shadow(params: Any, state: Any) -> Any:
        return bema.update(params, state)  # (shadow, state): both outputs kept

    class WithShadow(Donated):
        def __call__(self) -> None:
            shadow, self.state = self.fn(*self.args, self.state)
            jax.block_until_ready((shadow, self.state))

    ms = median_ms(
        {
            "EMA update": Donated(ema_update(ema), ema.init(params), params),
            "BEMA update": Donated(ema_update(bema), bema.init(params), params),
            "BEMA update + shadow": WithShadow(bema_with_shadow, bema.init(params), params),
        },
        repeats,
    )
    param_bytes = sum(x.nbytes for x in params)

    def copies(state: Any) -> float:
        return sum(x.nbytes for x in jax.tree.leaves(state)) / param_bytes

    return {
        "params": n,
        "leaves": leaves,
        "ms": ms,
        "ratio": ms["BEMA update"] / ms["EMA update"],
        "state_copies": {"EMA": copies(ema.init(params)), "BEMA": copies(bema.init(params))},
    }


def bema_section(p: dict[str, Any]) -> list[str]:
    """The P7 table."""
    ms, copies = p["ms"], p["state_copies"]
    return [
        f"### P7: BEMA next to the EMA, {p['params']:.0e} fp32 params, {p['leaves']} leaves "
        "(ms, median, donated)",
        "",
        "| EMA update | BEMA update | BEMA / EMA | BEMA update + shadow | state: EMA | "
        "state: BEMA |",
        "|---|---|---|---|---|---|",
        f"| {ms['EMA update']:.2f} | {ms['BEMA update']:.2f} | {p['ratio']:.2f} | "
        f"{ms['BEMA update + shadow']:.2f} | {copies['EMA']:.2f} copies | "
        f"{copies['BEMA']:.2f} copies |",
    ]


if __name__ == "__main__":
    for size in (1_000_000, 10_000_000):
        print("\n".join(bema_section(bench_bema(size, 10, 15))), "\n", sep="")
