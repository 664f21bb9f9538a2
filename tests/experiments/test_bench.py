"""``experiments/bench`` at toy sizes: every section keeps running and the report keeps its
shape. No timing is asserted (a benchmark is not a test); the memory figure (P3) is a
count of live bytes, exact on any machine, so it is asserted, and so are the goals'
verdicts, the report's rendering of the stored results, and the command line."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import jax
import pytest

from experiments.bench import __main__ as cli
from experiments.bench import flags, goals, harness, memory, multi_decay, report, update
from experiments.bench.bandwidth import bench_bandwidth
from experiments.bench.train_step import bench_mlp_step, bench_train_step

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"


def _goal(name: str) -> goals.Goal:
    return next(g for g in goals.GOALS if g.name == name)


def test_memory_of_params_adam_and_ema_is_exactly_one_extra_copy() -> None:
    out = memory.bench_memory(n=4_000, leaves=4)
    n_bytes = out["param_bytes"]
    assert n_bytes == 4 * 4_000
    # params + Adam's mu and nu + its int32 count; nothing else survives a donated step
    assert out["without EMA"]["live_bytes"] == 3 * n_bytes + 4
    # + the accumulators + count, num_skipped (int32) and weight (float32)
    assert out["extra_bytes"] == n_bytes + 12
    assert out["extra_copies"] == pytest.approx(1 + 12 / n_bytes)


def test_every_section_runs_and_the_report_lists_the_goals() -> None:
    results: dict[str, Any] = {
        "machine": "test",
        "load": "n/a",
        "load_after": "n/a",
        "repeats": 1,
        "g1": [update.bench_goal_row(2_000, 2, 1)],
        "g2": [update.bench_goal_row(2_000, 4, 1)],
        "g4": [bench_mlp_step(8, 1, 4, steps=1, repeats=2), bench_train_step("dcnn_li", 4, 1, 2)],
        "p3": memory.bench_memory(2_000, 2),
        "p4": [multi_decay.bench_multi_decay(3_000, 3, 1, skip_nonfinite=c) for c in (True, False)],
        "leaf_overhead": update.bench_leaf_overhead((2, 3), 1),
        "bandwidth": [bench_bandwidth(2_000, 2, 1)],
        "choices": {"params": 2_000, "leaves": 2, "ms": update.bench_choices(2_000, 2, 1)},
    }
    row = results["g1"][0]
    implementations = {"ema_jax", "ema_jax guard", "hand lerp", "cond lerp", "flat lerp"}
    implementations |= {"optax.ema", "nnx.EMA", "np copy"}
    for key in ("ms", "warm_ms"):
        assert implementations <= set(row[key]) and all(v > 0 for v in row[key].values())
        assert (update.torch is None) == ("torch foreach" not in row[key])
    mlp, rul = results["g4"]
    assert mlp["model"] == "MLP 1×8" and mlp["params"] == 8 * 8 + 8 + 8 + 1
    assert set(mlp["ratios"]) == set(mlp["extra_bytes_per_param"]) == {"with EMA", "with EMA guard"}
    assert rul["params"] > 0 and rul["leaves"] == 14 and mlp["pass_8B_ms"] > 0
    for p in results["p4"]:
        assert p["target"] == pytest.approx(7 / 9) and math.isfinite(p["ratio"])
        assert set(p["ms"]) == {"K decays, one update", "K separate updates"}
    assert set(results["choices"]["ms"]) == {
        "no guard (default)",
        "guard: sum + cond",
        "not donated",
        "update_every=4, per step",
    }
    text = report.report(results)
    for heading in (
        "### G1 and G3: one update",
        "### G2: one update",
        "cold caches",
        "warm caches",
    ):
        assert heading in text
    assert "### Fixed cost per leaf" in text and "| guard: sum + cond |" in text
    two, three = results["leaf_overhead"]
    marginal = next(line for line in text.splitlines() if line.startswith("| 2→3 |"))
    assert (
        marginal.split(" | ")[1]
        == f"{1e3 * (three['ms']['jit no-op'] - two['ms']['jit no-op']):.2f}"
    )
    bandwidth = results["bandwidth"][0]
    assert bandwidth["backend"] == jax.default_backend()
    assert all(share > 0 for share in bandwidth["share_of_copy"].values())
    # Two passes are slower than one: the ceiling is below the flat lerp's own share.
    assert 0 < bandwidth["checked_ceiling"] < bandwidth["share_of_copy"]["flat lerp"]
    assert set(bandwidth["GBps"]) >= {"copy", "scale in place", "sum", "flat lerp"}
    assert "device: ema_jax update GB/s" in text and "### Bandwidth on" in text
    device = next(line for line in text.splitlines() if line.startswith("| device: "))
    assert device.endswith("| ≥ 0.80 | n/a |") == (bandwidth["backend"] != "gpu")
    # Judged rows: per update size and cache state G1 ×3 (+1 with torch), G3, and G2 (torch
    # only); G4 per model and setting; P3; P4 ×2. No G5 section was run.
    rows = [line for line in text.splitlines() if line.endswith(("| yes |", "| no |"))]
    with_torch = update.torch is not None
    expected = 2 * (3 + with_torch + 1) + 2 * with_torch + 4 + 1 + 2
    assert len(rows) == expected + (bandwidth["backend"] == "gpu")
    assert not any(line.startswith("| G5") for line in text.splitlines())


def test_an_update_row_pairs_ema_jax_with_every_peer_cold_and_warm() -> None:
    """Each paired figure is a median of per-round ratios within its quartiles; the report's
    G1 row shows the paired speed vs the hand lerp as its measured value."""
    row = update.bench_goal_row(2_000, 2, 3)
    peers = {"hand lerp", "optax.ema", "nnx.EMA", "guard / floor"}
    peers |= {"torch"} if update.torch is not None else set()
    for cache in ("cold", "warm"):
        paired = row["paired"][cache]
        assert set(paired) == peers
        for q in paired.values():
            assert 0 < q["q1"] <= q["ratio"] <= q["q3"]
    assert (row["torch"] is None) == (update.torch is None)
    results = {"machine": "test", "load": "n/a", "load_after": "n/a", "repeats": 1, "g1": [row]}
    lines = report.report(results).splitlines()
    cold = next(r for r in lines if r.startswith("| G1 vs hand lerp") and "cold caches" in r)
    assert cold.split(" | ")[-3] == f"{row['paired']['cold']['hand lerp']['ratio']:.2f}×"
    assert cold.endswith("| yes |") == (row["paired"]["cold"]["hand lerp"]["ratio"] >= 1.0)


def test_paired_ratios_are_within_their_quartiles_and_name_the_base() -> None:
    calls = {"base": 0, "other": 0}

    def count(name: str) -> harness.Timed:
        return lambda: calls.__setitem__(name, calls[name] + 1)

    out = harness.paired_ratios(count("base"), {"other": count("other")}, repeats=4)
    assert calls == {"base": 2 + 4, "other": 2 + 4}  # two warm-up calls each, one per round
    assert set(out) == {"other", "ms"} and set(out["ms"]) == {"base", "other"}
    assert out["other"]["q1"] <= out["other"]["ratio"] <= out["other"]["q3"]


@pytest.mark.parametrize(
    ("name", "metrics", "verdict", "measured", "target"),
    [
        ("G1 vs hand lerp", {"speed vs hand lerp": 1.0}, True, "1.00×", "≥ 1.00×"),
        ("G1 vs hand lerp", {"speed vs hand lerp": 0.999}, False, "1.00×", "≥ 1.00×"),
        ("G1 floor", {"speed vs hand lerp": 0.95}, True, "0.95×", "≥ 0.95×"),
        ("G1 vs optax.ema", {"speed vs optax.ema": 1.19}, False, "1.19×", "≥ 1.20×"),
        ("G2", {"speed vs torch": 0.9}, True, "0.90×", "≥ 0.90×"),
        ("G3", {"guard / floor": 1.05}, True, "1.050", "≤ 1.05"),
        ("G3", {"guard / floor": 1.051}, False, "1.051", "≤ 1.05"),
        ("G4", {"ratio": 1.051}, False, "1.051", "≤ 1.05"),
        ("G5 vs nnx.EMA", {"speed vs nnx.EMA": 1.5}, True, "1.50×", "≥ 1.50×"),
        ("G5 vs functional", {"speed vs ema_jax": 0.89}, False, "0.89×", "≥ 0.90×"),
        ("P3", {"extra copies": 1.0005}, True, "1.0005 copies", "1 copy"),
        ("P3", {"extra copies": 1.002}, False, "1.0020 copies", "1 copy"),
        ("P4", {"ratio": 0.7, "target": 0.75}, True, "0.700", "≤ 0.750"),
        ("P4", {"ratio": 0.8, "target": 7 / 9}, False, "0.800", "≤ 0.778"),
    ],
)
def test_a_goal_is_judged_and_rendered_from_its_data(
    name: str, metrics: dict[str, float], verdict: bool, measured: str, target: str
) -> None:
    goal = _goal(name)
    assert goal.met(metrics) is verdict
    assert goal.measured_text(metrics) == measured and goal.target_text(metrics) == target


def test_the_device_goal_is_judged_only_on_a_gpu() -> None:
    goal = _goal("device")
    assert goal.met({"share of copy": 0.9}, "cpu") is None
    assert goal.met({"share of copy": 0.9}, "gpu") is True
    assert goal.met({"share of copy": 0.79}, "gpu") is False


def test_every_goal_names_a_section_the_report_measures() -> None:
    assert [g.name for g in goals.GOALS] == [
        "G1 vs hand lerp", "G1 floor", "G1 vs optax.ema", "G1 vs torch", "G2", "G3", "G4",
        "G5 vs nnx.EMA", "G5 vs functional", "P3", "P4", "device", "post-hoc one width",
        "post-hoc K widths",
    ]  # fmt: skip
    for goal in goals.GOALS:
        assert goal.section in report.MEASURED and goal.description


@pytest.mark.parametrize("name", ["bench_cpu", "bandwidth_cpu", "bench_posthoc_cpu"])
def test_the_report_renders_the_stored_results_as_stored(name: str) -> None:
    """The stored Markdown is the report of the stored JSON, as this benchmark renders it."""
    results = json.loads((RESULTS / f"{name}.json").read_text())
    assert report.report(results) == (RESULTS / f"{name}.md").read_text()


def test_the_flags_child_is_a_module_that_reports_json() -> None:
    """One real child process (``python -m experiments.bench.flags``) under XLA's defaults."""
    (row,) = flags.bench_flags(2_000, 2, 1, [""])
    assert set(row) == {"flags", "ms", "adam"} and row["flags"] == "(default)"
    assert row["ms"]["ema_jax"] > 0 and row["adam"]["ms"]["adam"] > 0
    assert report.flags_section([row])[-1].startswith(f"| (default) | {row['ms']['ema_jax']:.2f} |")


def test_a_failing_flags_child_gives_its_last_line_of_stderr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert argv[1:3] == ["-m", "experiments.bench.flags"] and kwargs["env"]["XLA_FLAGS"]
        return subprocess.CompletedProcess(argv, 1, "", "warming up\nUnknown flag --xla_bad\n")

    monkeypatch.setattr(flags.subprocess, "run", run)
    (row,) = flags.bench_flags(2_000, 2, 1, ["--xla_bad"])
    assert row == {"flags": "--xla_bad", "error": "Unknown flag --xla_bad"}
    assert report.flags_section([row])[-1].startswith(
        "| --xla_bad | error: Unknown flag --xla_bad |"
    )


def test_the_command_line_writes_the_report_and_the_results(tmp_path: Path) -> None:
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    results = cli.main(
        ["--quick", "--bandwidth-only", "--repeats", "1", "--md", str(md), "--json", str(js)]
    )
    assert json.loads(js.read_text()) == json.loads(json.dumps(results))
    assert md.read_text() == report.report(results)
    assert [b["params"] for b in results["bandwidth"]] == [n for n, _ in cli.QUICK.bandwidth_sizes]
    assert "g1" not in results and "g4" not in results


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--p2-batch", "0"], ["--p2-model", "x"]])
def test_the_command_line_refuses_bad_counts(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(argv)


def test_the_nnx_section_pairs_ema_jax_nnx_with_flax_and_the_functional_update() -> None:
    """G5 at a toy size: every implementation in both NNX modes, and a judged row per mode."""
    from experiments.bench import nnx_update

    row = nnx_update.bench_nnx(2_000, 2, 2)
    names = {"ema_jax.nnx", "nnx.EMA", "nnx.jit no-op"}
    assert set(row["ms"]) == {n + m for n in names for m in nnx_update.MODES} | {"ema_jax"}
    assert set(row["paired"]) == {"ema_jax.nnx", "ema_jax.nnx tree"}
    results = {"machine": "test", "load": "n/a", "load_after": "n/a", "repeats": 1, "g5": [row]}
    lines = report.report(results).splitlines()
    judged = [r for r in lines if r.startswith("| G5") and r.endswith(("| yes |", "| no |"))]
    assert len(judged) == 4  # two goals × two modes


def test_the_posthoc_section_times_reading_one_width_and_k_widths_side_by_side() -> None:
    """At a toy size (3 snapshots of 2 × 200 params): the four timings (Orbax's restores
    alone among them), the three paired ratios within their quartiles, the bytes read, and
    one judged row per goal."""
    from experiments.bench import posthoc

    row = posthoc.bench_posthoc(200, 2, leaves=2, snapshots=3)
    assert set(row["ms"]) == {"read files", "restores", "one width", "K widths"}
    assert all(v > 0 for v in row["ms"].values()) and row["K"] == len(posthoc.WIDTHS) == 4
    assert row["bytes"] > 3 * 2 * 200 * 4  # at least the arrays themselves
    for key in ("one width / read", "restores / read", "K widths / one width"):
        assert 0 < row[key]["q1"] <= row[key]["ratio"] <= row[key]["q3"]
    results = {"machine": "test", "load": "n/a", "load_after": "n/a", "repeats": 1}
    lines = report.report({**results, "posthoc": [row]}).splitlines()
    judged = [r for r in lines if r.startswith("| post-hoc") and r.endswith(("| yes |", "| no |"))]
    assert len(judged) == 2
    one = next(r for r in judged if r.startswith("| post-hoc one width"))
    assert one.split(" | ")[-3] == f"{row['one width / read']['ratio']:.2f}×"
    assert one.endswith("| yes |") == (row["one width / read"]["ratio"] <= 3.0)


def test_the_posthoc_only_flag_runs_that_section_at_the_sizes_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from experiments.bench import posthoc

    sizes: list[int] = []

    def fake(n: int, repeats: int) -> dict[str, Any]:
        sizes.append(n)
        return posthoc.bench_posthoc(n, 1, leaves=2, snapshots=2)

    monkeypatch.setattr(cli, "bench_posthoc", fake)
    results = cli.main(["--posthoc-only", "--posthoc-sizes", "100", "300", "--repeats", "1"])
    assert sizes == [100, 300] and [r["params"] for r in results["posthoc"]] == [100, 300]
    assert "bandwidth" not in results and "g1" not in results
    with pytest.raises(SystemExit):
        cli.parse_args(["--posthoc-sizes", "0"])
