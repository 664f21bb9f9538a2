"""The benchmark's goals as data: what each measures, the comparison and the threshold.

The report (:mod:`experiments.bench.report`) turns each section of the results into
measured rows, each with named metrics; a :class:`Goal` names its section and metric
and judges every row of it. Thresholds live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Comparison = Literal[">=", "<=", "=="]

_SYMBOLS: dict[Comparison, str] = {">=": "≥ ", "<=": "≤ ", "==": ""}


@dataclass(frozen=True)
class Goal:
    """One goal: ``metric_key`` of every measured row of ``section`` compared with
    ``threshold``.

    ``threshold`` is a number, or the name of a metric of the row that holds it (P4's
    target depends on the row's K). ``"=="`` holds within ``tolerance``. A goal with a
    ``backend`` is judged only on that JAX backend; elsewhere it is informative (n/a).
    The formats render the measured value and the target as the report shows them.
    """

    name: str
    description: str
    section: str
    metric_key: str
    comparison: Comparison
    threshold: float | str
    value_format: str = ".2f"
    unit: str = ""
    target_format: str = ".2f"
    target_unit: str | None = None
    tolerance: float = 0.0
    backend: str | None = None

    def target(self, metrics: Mapping[str, float]) -> float:
        """The threshold for a row with these metrics."""
        if isinstance(self.threshold, str):
            return metrics[self.threshold]
        return self.threshold

    def met(self, metrics: Mapping[str, float], backend: str | None = None) -> bool | None:
        """Whether the row meets the goal; ``None`` where it is not judged (``backend``)."""
        if self.backend is not None and backend != self.backend:
            return None
        value, target = metrics[self.metric_key], self.target(metrics)
        if self.comparison == ">=":
            return value >= target
        if self.comparison == "<=":
            return value <= target
        return abs(value - target) <= self.tolerance

    def measured_text(self, metrics: Mapping[str, float]) -> str:
        """The row's value as the report shows it, e.g. ``0.45×``."""
        return f"{metrics[self.metric_key]:{self.value_format}}{self.unit}"

    def target_text(self, metrics: Mapping[str, float]) -> str:
        """The target as the report shows it, e.g. ``≥ 1.0×``."""
        unit = self.unit if self.target_unit is None else self.target_unit
        return f"{_SYMBOLS[self.comparison]}{self.target(metrics):{self.target_format}}{unit}"


GOALS = (
    Goal(
        name="G1 vs hand lerp",
        description="the default update at least as fast as a hand-written, jitted, donated "
        "jax.tree.map lerp over the same leaves",
        section="g1",
        metric_key="speed vs hand lerp",
        comparison=">=",
        threshold=1.0,
        unit="×",
    ),
    Goal(
        name="G1 floor",
        description="the default update no slower than 0.95× the hand-written lerp",
        section="g1",
        metric_key="speed vs hand lerp",
        comparison=">=",
        threshold=0.95,
        unit="×",
    ),
    Goal(
        name="G1 vs optax.ema",
        description="the default update at least 1.2× optax.ema (jitted, not donated)",
        section="g1",
        metric_key="speed vs optax.ema",
        comparison=">=",
        threshold=1.2,
        unit="×",
    ),
    Goal(
        name="G1 vs torch",
        description="the default update at least as fast as torch's _foreach_lerp_ (the "
        "faster of its thread settings)",
        section="g1",
        metric_key="speed vs torch",
        comparison=">=",
        threshold=1.0,
        unit="×",
    ),
    Goal(
        name="G2",
        description="many small leaves: 10M params in 1000 leaves at least 0.9× torch",
        section="g2",
        metric_key="speed vs torch",
        comparison=">=",
        threshold=0.9,
        unit="×",
    ),
    Goal(
        name="G3",
        description="the opt-in NaN/Inf guard within 5 % of a plain lax.cond(isfinite(Σ)) "
        "around the hand lerp",
        section="g1",
        metric_key="guard / floor",
        comparison="<=",
        threshold=1.05,
        value_format=".3f",
    ),
    Goal(
        name="G4",
        description="an Adam train step with the EMA at most 5 % slower than without",
        section="g4",
        metric_key="ratio",
        comparison="<=",
        threshold=1.05,
        value_format=".3f",
    ),
    Goal(
        name="G5 vs nnx.EMA",
        description="ema_jax.nnx.EMA's update under nnx.jit at least 1.5× flax's nnx.EMA",
        section="g5",
        metric_key="speed vs nnx.EMA",
        comparison=">=",
        threshold=1.5,
        unit="×",
    ),
    Goal(
        name="G5 vs functional",
        description="ema_jax.nnx.EMA within 10 % of the functional update on the same params",
        section="g5",
        metric_key="speed vs ema_jax",
        comparison=">=",
        threshold=0.9,
        unit="×",
    ),
    Goal(
        name="P3",
        description="params + Adam + EMA, donated, hold exactly one copy of the params more "
        "than params + Adam",
        section="p3",
        metric_key="extra copies",
        comparison="==",
        threshold=1,
        value_format=".4f",
        unit=" copies",
        target_format=".0f",
        target_unit=" copy",
        tolerance=1e-3,
    ),
    Goal(
        name="P4",
        description="K decays in one update take at most (1+2K)/(3K) of K separate updates "
        "(the bytes they move)",
        section="p4",
        metric_key="ratio",
        comparison="<=",
        threshold="target",
        value_format=".3f",
        target_format=".3f",
    ),
    Goal(
        name="device",
        description="on a GPU the update reaches at least 80 % of the copy bandwidth",
        section="bandwidth",
        metric_key="share of copy",
        comparison=">=",
        threshold=0.8,
        backend="gpu",
    ),
    Goal(
        name="post-hoc one width",
        description="synthesize_from of one width at most 3× the time of reading the "
        "snapshot files as plain bytes",
        section="posthoc",
        metric_key="one width / read",
        comparison="<=",
        threshold=3.0,
        unit="×",
    ),
    Goal(
        name="post-hoc K widths",
        description="synthesize_from of K = 4 widths (one pass) at most 1.6× one width",
        section="posthoc",
        metric_key="K widths / one width",
        comparison="<=",
        threshold=1.6,
        unit="×",
    ),
)
"""Issue 18's goals (G1–G5), issue 5's that still stand (P3, P4, device) and the post-hoc
synthesis's, in the order the report lists them."""
