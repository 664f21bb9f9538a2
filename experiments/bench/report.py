"""The Markdown report, from the results as ``python -m experiments.bench --json`` writes
them: the update tables (cold and warm), the goals (judged by
:data:`~experiments.bench.goals.GOALS`), and the bandwidth, per-leaf, choices and
XLA-flags tables of the sections that were run.

Each section's :class:`Measured` rows carry the text that says what was measured and the
metrics the goals judge; no threshold appears here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from experiments.bench.bandwidth import UPDATE_BYTES_PER_PARAM
from experiments.bench.bema import bema_section
from experiments.bench.goals import GOALS, Goal
from experiments.bench.placement import offload_section, shard_over_section
from experiments.bench.update import SPEED_PEERS, best_torch

UPDATE_COLUMNS = (
    "ema_jax", "ema_jax guard", "hand lerp", "cond lerp", "flat lerp", "optax.ema", "nnx.EMA",
    "np copy", "torch foreach", "torch foreach 1T",
)  # fmt: skip
"""The implementations in the update tables, in their order (:mod:`experiments.bench.update`)."""
FLAGS_HEADER = (
    "XLA_FLAGS", "ema_jax", "ema_jax guard", "hand lerp", "torch foreach (best)", "adam",
    "adam+ema_jax", "extra B/param", "guard extra B/param",
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


def _quartiles(q: dict[str, float]) -> str:
    return f"{q['ratio']:.2f} ({q['q1']:.2f}–{q['q3']:.2f})"


def update_measured(rows: list[dict[str, Any]]) -> list[Measured]:
    """Per size and cache state: ema_jax's paired speed relative to each peer (peer time /
    ema_jax time; torch: the faster of its settings) and the guard's time over its floor."""
    out = []
    for r in rows:
        for cache in ("cold", "warm"):
            paired = r["paired"][cache]
            metrics = {
                f"speed vs {k}": paired[k]["ratio"] for k in (*SPEED_PEERS, "torch") if k in paired
            }
            metrics["guard / floor"] = paired["guard / floor"]["ratio"]
            detail = "; ".join(
                f"vs {k} {_quartiles(paired[k])}" for k in (*SPEED_PEERS, "torch") if k in paired
            )
            label = (
                f"{r['params']:.0e} params, {r['leaves']} leaves, {cache} caches, paired over "
                f"{r['repeats']} rounds, median (quartiles): {detail}; guard / cond lerp "
                f"{_quartiles(paired['guard / floor'])}"
                + (f"; torch = `{r['torch']}`" if r.get("torch") else "")
            )
            out.append(Measured(label, metrics))
    return out


def nnx_measured(rows: list[dict[str, Any]]) -> list[Measured]:
    """Per size and NNX mode: ema_jax.nnx.EMA's paired speed relative to flax's nnx.EMA
    (same mode) and to the functional update (other time / ema_jax.nnx time)."""
    return [
        Measured(
            f"`{ours}`, {r['params']:.0e} params, {r['leaves']} leaves, cold caches, paired over "
            f"{r['repeats']} rounds: vs nnx.EMA {_quartiles(paired['nnx.EMA'])}, vs ema_jax "
            f"{_quartiles(paired['ema_jax'])}; ms: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["ms"].items()),
            {
                "speed vs nnx.EMA": paired["nnx.EMA"]["ratio"],
                "speed vs ema_jax": paired["ema_jax"]["ratio"],
            },
        )
        for r in rows
        for ours, paired in r["paired"].items()
    ]


def step_measured(rows: list[dict[str, Any]]) -> list[Measured]:
    """The train step with / without EMA, per model and EMA setting: the paired median
    ratio, and the extra time in bytes per param."""
    return [
        Measured(
            f"{p['model']} ({p['params']:.3g} params in {p['leaves']} leaves, batch "
            f"{p['batch']}), {k} / without: {p['ms_per_step']['without EMA']:.2f} vs "
            f"{p['ms_per_step'][k]:.2f} ms/step, median of {p['rounds']} paired blocks of "
            f"{p['steps_per_block']} steps, quartiles {r['q1']:.3f}–{r['q3']:.3f}; extra "
            f"{p['extra_bytes_per_param'][k]:.1f} B/param (an 8 B/param pass: "
            f"{p['pass_8B_ms']:.2f} ms)",
            {"ratio": r["ratio"]},
        )
        for p in rows
        for k, r in p["ratios"].items()
    ]


def p3_measured(p: dict[str, Any]) -> list[Measured]:
    """Live bytes with − without EMA, in copies of the params."""
    w, wo = p["with EMA"], p["without EMA"]
    label = (
        f"live bytes with − without EMA, {p['params']:.0e} params (params+Adam: "
        f"{wo['live_copies']:.3f} copies; +EMA: {w['live_copies']:.3f}; step temp "
        f"{wo['temp_bytes']}/{w['temp_bytes']} B, unaliased outputs "
        f"{wo['unaliased_output_bytes']}/{w['unaliased_output_bytes']} B)"
    )
    return [Measured(label, {"extra copies": p["extra_copies"]})]


def p4_measured(rows: list[dict[str, Any]]) -> list[Measured]:
    """K decays in one update / K separate updates, and its target, per configuration."""
    return [
        Measured(
            f"K={p['K']} decays / K separate updates, {p['params']:.0e} params, "
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
            f"ema_jax update GB/s ({UPDATE_BYTES_PER_PARAM} B/param) / copy GB/s, "
            f"{b['params']:.0e} params, {b['leaves']} leaves, {b['backend']} {b['device']} "
            f"(guard {b['share_of_copy']['ema_jax guard']:.2f}; flat lerp "
            f"{b['share_of_copy']['flat lerp']:.2f}; a checked update's ceiling here, flat "
            f"lerp + sum: {b['checked_ceiling']:.2f})",
            {"share of copy": b["share_of_copy"]["ema_jax"]},
            backend=b["backend"],
        )
        for b in rows
    ]


def posthoc_measured(rows: list[dict[str, Any]]) -> list[Measured]:
    """Per size: one width / reading the files (and the restores' share of it), K widths /
    one width (paired medians)."""
    return [
        Measured(
            f"{r['snapshots']} snapshots of 2 averages of {r['params']:.0e} params "
            f"({r['bytes'] / 1e6:.0f} MB), paired over {r['repeats']} rounds, files in the page "
            f"cache: one width / read {_quartiles(r['one width / read'])} (Orbax's restores alone "
            f"{_quartiles(r['restores / read'])}), {r['K']} widths / one "
            f"{_quartiles(r['K widths / one width'])}; ms: "
            + ", ".join(f"{k} {v:.0f}" for k, v in r["ms"].items()),
            {
                "one width / read": r["one width / read"]["ratio"],
                "restores / read": r["restores / read"]["ratio"],
                "K widths / one width": r["K widths / one width"]["ratio"],
            },
        )
        for r in rows
    ]


MEASURED: dict[str, Callable[[Any], list[Measured]]] = {
    "g1": update_measured,
    "g2": update_measured,
    "g4": step_measured,
    "g5": nnx_measured,
    "p3": p3_measured,
    "p4": p4_measured,
    "bandwidth": bandwidth_measured,
    "posthoc": posthoc_measured,
}
"""Each section's measured rows, by its key in the results (a goal's ``section``)."""


def goal_row(goal: Goal, m: Measured) -> list[str]:
    """One row of the goals table: what, measured, target, met (yes / no / n/a)."""
    met = goal.met(m.metrics, m.backend)
    label = m.label
    if met is None:
        label += f" — the goal is for a {str(goal.backend).upper()}; informative here"
    verdict = "n/a" if met is None else "yes" if met else "no"
    return [
        f"{goal.name}: {label}",
        goal.measured_text(m.metrics),
        goal.target_text(m.metrics),
        verdict,
    ]


def goals_tables(results: dict[str, Any], goals: Sequence[Goal] = GOALS) -> list[str]:
    """One table per goal: the goal against every measured row of its section (sections
    not run, or rows without the goal's metric, e.g. no torch: no rows, no table)."""
    out: list[str] = []
    for goal in goals:
        measured = (
            MEASURED[goal.section](results[goal.section]) if results.get(goal.section) else []
        )
        rows = [goal_row(goal, m) for m in measured if goal.metric_key in m.metrics]
        if rows:
            out += ["", f"#### {goal.name}: {goal.description}"]
            out += table(("measured", "value", "target", "met"), rows)
    return out


# ----------------------------------------------------------------------------- tables


def update_table(rows: list[dict[str, Any]], key: str = "ms") -> list[str]:
    """One update's median ms per implementation and size (``key``: ``"ms"`` cold caches,
    ``"warm_ms"`` warm), ema_jax's GB/s and its speed relative to each peer (peer ms /
    ema_jax ms, from these medians; the goals use the paired ratios)."""
    peers = (*SPEED_PEERS, "torch")
    header = ["params", "leaves", *(f"{c} ms" for c in UPDATE_COLUMNS), "ema_jax GB/s"]
    header += [f"speed vs {k}" for k in peers]
    lines = []
    for r in rows:
        ms = r[key]
        gbps = UPDATE_BYTES_PER_PARAM * r["params"] / (ms["ema_jax"] * 1e-3) / 1e9
        peer_ms = {**{k: ms[k] for k in SPEED_PEERS}, "torch": best_torch(ms)}
        lines.append(
            [
                f"{r['params']:.0e}",
                str(r["leaves"]),
                *(fmt(ms.get(c)) for c in UPDATE_COLUMNS),
                f"{gbps:.1f}",
                *(fmt(peer_ms[k] and peer_ms[k] / ms["ema_jax"]) for k in peers),
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
        "### XLA flags (fresh process each, at the Adam-step size): update ms, "
        "Adam step ms and the EMA's extra B/param in it"
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
            fmt(extra.get("adam+ema_jax guard"), 1),
        ]
        body.append(
            [
                r["flags"],
                *(fmt(ms[k]) for k in ("ema_jax", "ema_jax guard", "hand lerp")),
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
    "p5": shard_over_section,
    "p6": offload_section,
    "p7": bema_section,
}
"""The tables after the goals, each with its heading, for the sections that were run."""


# ----------------------------------------------------------------------------- report


UPDATE_TABLES = {"g1": "G1 and G3", "g2": "G2"}


def report(results: dict[str, Any]) -> str:
    """The whole report, as ``--md`` writes it."""
    out = [f"## EMA benchmark ({results['machine']})", "", f"load before: {results['load']}", ""]
    for key in ("g1", "g2"):
        if results.get(key):
            for cache, ms_key in (("cold", "ms"), ("warm", "warm_ms")):
                out.append(
                    f"### {UPDATE_TABLES[key]}: one update, fp32, ms (median, {cache} caches); "
                    "speed = other ms / ema_jax ms (torch: the faster of its two thread "
                    "settings); > 1: ema_jax is faster"
                )
                out += [*update_table(results[key], ms_key), ""]
    out += ["### Goals", *goals_tables(results)]
    for key, section in SECTIONS.items():
        if results.get(key):
            out += ["", *section(results[key])]
    out += ["", f"load after: {results['load_after']}", ""]
    return "\n".join(out)
