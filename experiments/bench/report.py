"""The Markdown report, from the results as ``python -m experiments.bench --json`` writes
them: the P1 table, the goals (judged by :data:`~experiments.bench.goals.GOALS`), and the
bandwidth, per-leaf, choices and XLA-flags tables of the sections that were run.

Each section's :class:`Measured` rows carry the text that says what was measured and the
metrics the goals judge; no threshold appears here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from experiments.bench.bandwidth import UPDATE_BYTES_PER_PARAM
from experiments.bench.goals import GOALS, Goal
from experiments.bench.update import best_torch

P1_COLUMNS = (
    "ema_jax", "ema_jax nochk", "flat lerp", "flat lerp+chk", "optax.ema", "np copy",
    "torch foreach", "torch foreach 1T", "torch foreach+guard",
)  # fmt: skip
"""The implementations in the P1 table, in its order (:mod:`experiments.bench.update`)."""
P1_SPEEDS = ("ema_jax speed vs torch", "nochk speed vs torch", "ema_jax speed vs optax.ema")
FLAGS_HEADER = (
    "XLA_FLAGS", "ema_jax", "ema_jax nochk", "flat lerp", "torch foreach (best)", "adam",
    "adam+ema_jax", "extra B/param", "nochk extra B/param",
)  # fmt: skip


@dataclass(frozen=True)
class Measured:
    """One row of the goals table: what was measured (``label``), its ``metrics``, and the
    JAX backend it ran on where a goal depends on it."""

    label: str
    metrics: dict[str, float]
    backend: str | None = None


def fmt(x: float | None, digits: int = 2) -> str:
    """``x`` to ``digits`` decimals; ``—`` for a missing value."""
    return "—" if x is None else f"{x:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


# ----------------------------------------------------------------------------- goals


def _paired_detail(paired: dict[str, Any]) -> str:
    a, b = paired["ema_jax"], paired["ema_jax nochk"]
    return (
        f"; paired with `{paired['torch']}` over {paired['rounds']} rounds: "
        f"{a['speed']:.2f}× ({a['q1']:.2f}–{a['q3']:.2f}), skip_nonfinite=False "
        f"{b['speed']:.2f}× ({b['q1']:.2f}–{b['q3']:.2f})"
    )


def p1_measured(rows: list[dict[str, Any]]) -> list[Measured]:
    """ema_jax's speed relative to torch per size (none without torch): the paired median
    where measured (the better estimate), else the ratio of the round-robin medians."""
    out = []
    for r in rows:
        ms, torch_ms = r["ms"], best_torch(r["ms"])
        if torch_ms is None:
            continue
        medians = torch_ms / ms["ema_jax"]
        paired = r.get("paired") or {}
        label = (
            f"P1 throughput ema_jax / torch foreach, {r['params']:.0e} params, "
            f"{r['leaves']} leaves (ratio of medians {medians:.2f}×, "
            f"skip_nonfinite=False {torch_ms / ms['ema_jax nochk']:.2f}×; both guarded: "
            f"{ms['torch foreach+guard'] / ms['ema_jax']:.2f}×; one guarded flat buffer vs "
            f"torch: {torch_ms / ms['flat lerp+chk']:.2f}×"
            f"{_paired_detail(paired) if paired else ''})"
        )
        speed = paired["ema_jax"]["speed"] if paired else medians
        out.append(Measured(label, {"speed vs torch": speed}))
    return out


def p2_model_measured(p: dict[str, Any]) -> list[Measured]:
    """The train step with / without EMA, per EMA setting: the paired median ratio."""
    return [
        Measured(
            f"P2 train step {k} / without ({p['model']}, {p['params']} params in "
            f"{p['leaves']} leaves, batch {p['batch']}: {p['ms_per_step']['without EMA']:.3f}"
            f" vs {p['ms_per_step'][k]:.3f} ms/step; median of {p['rounds']} paired blocks "
            f"of {p['steps_per_block']} steps, quartiles {r['q1']:.3f}–{r['q3']:.3f})",
            {"ratio": r["ratio"]},
        )
        for k, r in p["ratios"].items()
    ]


def p2_adam_measured(p: dict[str, Any]) -> list[Measured]:
    """The EMA's extra bytes per param in an Adam step, per ema_jax setting: the paired
    estimate (the better one), with the difference of medians and the references."""
    refs, paired = p["extra_bytes_per_param"], p["paired_extra_bytes_per_param"]
    out = []
    for k in ("adam+ema_jax", "adam+ema_jax nochk"):
        b = paired[k]
        label = (
            f"P2 {k} − adam, {p['params']:.0e} params, at {p['bandwidth_GBps']:.1f} GB/s:"
            f" extra {b['ratio']:.1f} B/param paired back to back (quartiles {b['q1']:.1f}–"
            f"{b['q3']:.1f}; difference of medians {p['extra_ms'][k]:.2f} ms = "
            f"{refs[k]:.1f} B/param; references: a bare lerp after Adam "
            f"{paired['adam+lerp']['ratio']:.1f} paired, {refs['adam+lerp']:.1f} of medians, "
            f"the same in a cond {refs['adam+lerp in cond']:.1f})"
        )
        out.append(Measured(label, {"extra B/param": b["ratio"]}))
    return out


def p3_measured(p: dict[str, Any]) -> list[Measured]:
    """Live bytes with − without EMA, in copies of the params."""
    w, wo = p["with EMA"], p["without EMA"]
    label = (
        f"P3 live bytes with − without EMA, {p['params']:.0e} params (params+Adam: "
        f"{wo['live_copies']:.3f} copies; +EMA: {w['live_copies']:.3f}; step temp "
        f"{wo['temp_bytes']}/{w['temp_bytes']} B, unaliased outputs "
        f"{wo['unaliased_output_bytes']}/{w['unaliased_output_bytes']} B)"
    )
    return [Measured(label, {"extra copies": p["extra_copies"]})]


def p4_measured(rows: list[dict[str, Any]]) -> list[Measured]:
    """K decays in one update / K separate updates, and its target, per configuration."""
    return [
        Measured(
            f"P4 K={p['K']} decays / K separate updates, {p['params']:.0e} params, "
            f"{p['leaves']} leaves, skip_nonfinite={p['skip_nonfinite']} "
            f"({p['ms']['K decays, one update']:.2f} / {p['ms']['K separate updates']:.2f} ms)",
            {"ratio": p["ratio"], "target": p["target"]},
        )
        for p in rows
    ]


def bandwidth_measured(rows: list[dict[str, Any]]) -> list[Measured]:
    """ema_jax's share of the copy bandwidth per size, with the references' shares."""
    return [
        Measured(
            f"device goal: ema_jax update GB/s ({UPDATE_BYTES_PER_PARAM} B/param) / copy GB/s, "
            f"{b['params']:.0e} params, {b['leaves']} leaves, {b['backend']} {b['device']} "
            f"(nochk {b['share_of_copy']['ema_jax nochk']:.2f}; flat lerp "
            f"{b['share_of_copy']['flat lerp']:.2f}; a checked update's ceiling here, flat "
            f"lerp + sum: {b['checked_ceiling']:.2f})",
            {"share of copy": b["share_of_copy"]["ema_jax"]},
            backend=b["backend"],
        )
        for b in rows
    ]


MEASURED: dict[str, Callable[[Any], list[Measured]]] = {
    "p1": p1_measured,
    "p2_model": p2_model_measured,
    "p2_adam": p2_adam_measured,
    "p3": p3_measured,
    "p4": p4_measured,
    "bandwidth": bandwidth_measured,
}
"""Each section's measured rows, by its key in the results (a goal's ``section``)."""


def goal_row(goal: Goal, m: Measured) -> list[str]:
    """One row of the goals table: what, measured, target, met (yes / no / n/a)."""
    met = goal.met(m.metrics, m.backend)
    label = m.label
    if met is None:
        label += f" — the goal is for a {str(goal.backend).upper()}; informative here"
    verdict = "n/a" if met is None else "yes" if met else "no"
    return [label, goal.measured_text(m.metrics), goal.target_text(m.metrics), verdict]


def goals_table(results: dict[str, Any], goals: Sequence[Goal] = GOALS) -> list[str]:
    """Every goal against every measured row of its section (sections not run: no rows)."""
    rows = [
        goal_row(goal, m)
        for goal in goals
        if results.get(goal.section)
        for m in MEASURED[goal.section](results[goal.section])
    ]
    return table(("goal", "measured", "target", "met"), rows)


# ----------------------------------------------------------------------------- tables


def p1_table(rows: list[dict[str, Any]]) -> list[str]:
    """One update's ms per implementation and size, GB/s and speeds relative to ema_jax."""
    header = ["params", "leaves", *(f"{c} ms" for c in P1_COLUMNS), "ema_jax GB/s", *P1_SPEEDS]
    lines = []
    for r in rows:
        ms, torch_ms = r["ms"], best_torch(r["ms"])
        gbps = UPDATE_BYTES_PER_PARAM * r["params"] / (ms["ema_jax"] * 1e-3) / 1e9
        lines.append(
            [
                f"{r['params']:.0e}",
                str(r["leaves"]),
                *(fmt(ms.get(c)) for c in P1_COLUMNS),
                f"{gbps:.1f}",
                fmt(torch_ms and torch_ms / ms["ema_jax"]),
                fmt(torch_ms and torch_ms / ms["ema_jax nochk"]),
                fmt(ms["optax.ema"] / ms["ema_jax"]),
            ]
        )
    return table(header, lines)


def bandwidth_section(rows: list[dict[str, Any]]) -> list[str]:
    """GB/s of each reference and update, per size."""
    first, names = rows[0], list(rows[0]["GBps"])
    heading = (
        f"### Bandwidth on {first['backend']} ({first['device']}): GB/s (copy, scale: "
        "8 B/param; sum: 4 B/param, read only; updates: 12 B/param)"
    )
    body = [
        [f"{b['params']:.0e}", str(b["leaves"]), *(f"{b['GBps'][k]:.1f}" for k in names)]
        for b in rows
    ]
    return [heading, *table(["params", "leaves", *names], body)]


def leaf_overhead_section(rows: list[dict[str, Any]]) -> list[str]:
    """µs per leaf at each leaf count, then the marginal cost of each leaf added."""
    heading = (
        "### Fixed cost per leaf (one-element leaves: no memory traffic), µs per leaf: "
        "time / leaves; `a→b`: the cost of each leaf added from a to b leaves (the "
        "per-call cost cancels)"
    )
    names = list(rows[0]["ms"])
    body = [[str(r["leaves"]), *(f"{r['us_per_leaf'][k]:.2f}" for k in names)] for r in rows]
    body += [
        [
            f"{a['leaves']}→{b['leaves']}",
            *(
                f"{1e3 * (b['ms'][k] - a['ms'][k]) / (b['leaves'] - a['leaves']):.2f}"
                for k in names
            ),
        ]
        for a, b in itertools.pairwise(rows)
    ]
    return [heading, *table(["leaves", *names], body)]


def choices_section(choices: dict[str, Any]) -> list[str]:
    """ms per step of each implementation choice."""
    return [
        f"### Choices ({choices['params']:.0e} params, {choices['leaves']} leaves): ms per step",
        *table(("variant", "ms"), [[k, f"{v:.2f}"] for k, v in choices["ms"].items()]),
    ]


def flags_section(rows: list[dict[str, Any]]) -> list[str]:
    """Per XLA_FLAGS setting: update ms (P1), Adam step ms and the EMA's extra B/param."""
    heading = (
        "### XLA flags (fresh process each, at the P2 Adam size): update ms (P1), "
        "Adam step ms and the EMA's extra B/param in it (P2)"
    )
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["flags"], f"error: {r['error']}", *[""] * (len(FLAGS_HEADER) - 2)])
            continue
        ms, adam = r["ms"], r.get("adam")
        extra = adam["extra_bytes_per_param"] if adam else {}
        adam_cells = [
            fmt(adam["ms"]["adam"] if adam else None),
            fmt(adam["ms"]["adam+ema_jax"] if adam else None),
            fmt(extra.get("adam+ema_jax"), 1),
            fmt(extra.get("adam+ema_jax nochk"), 1),
        ]
        body.append(
            [
                r["flags"],
                *(fmt(ms[k]) for k in ("ema_jax", "ema_jax nochk", "flat lerp")),
                fmt(best_torch(ms)),
                *adam_cells,
            ]
        )
    return [heading, *table(FLAGS_HEADER, body)]


SECTIONS: dict[str, Callable[[Any], list[str]]] = {
    "bandwidth": bandwidth_section,
    "leaf_overhead": leaf_overhead_section,
    "choices": choices_section,
    "flags": flags_section,
}
"""The tables after the goals, each with its heading, for the sections that were run."""


# ----------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> str:
    """The whole report, as ``--md`` writes it."""
    out = [f"## EMA benchmark ({results['machine']})", "", f"load before: {results['load']}", ""]
    if results.get("p1"):
        out.append(
            "### P1: one update, fp32, ms (median); speed = other ms / ema_jax ms (torch: the "
            "faster of its two thread settings); > 1: ema_jax is faster"
        )
        out += p1_table(results["p1"])
    out += ["", "### Goals", *goals_table(results)]
    for key, section in SECTIONS.items():
        if results.get(key):
            out += ["", *section(results[key])]
    out += ["", f"load after: {results['load_after']}", ""]
    return "\n".join(out)
