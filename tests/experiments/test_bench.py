"""``experiments/bench`` at toy sizes: every section keeps running and the report keeps its
shape. No timing is asserted (a benchmark is not a test); the memory figure (P3) is a
count of live bytes, exact on any machine, so it is asserted, and so are the goals'
verdicts, the report's rendering of the stored results, and the command line."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import jax
import pytest

from experiments.bench import __main__ as cli
from experiments.bench import flags, goals, harness, memory, multi_decay, report, update
from experiments.bench.bandwidth import bench_bandwidth
from experiments.bench.train_step import bench_adam_step, bench_train_step

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
        "p1": [{"params": 2_000, "leaves": 2, "ms": update.bench_update(2_000, 2, 1)}],
        "p2_model": bench_train_step("dcnn_li", batch=4, steps=1, repeats=2),
        "p2_adam": bench_adam_step(2_000, 2, 1),
        "p3": memory.bench_memory(2_000, 2),
        "p4": [multi_decay.bench_multi_decay(3_000, 3, 1, skip_nonfinite=c) for c in (True, False)],
        "leaf_overhead": update.bench_leaf_overhead((2, 3), 1),
        "bandwidth": [bench_bandwidth(2_000, 2, 1)],
        "choices": {"params": 2_000, "leaves": 2, "ms": update.bench_choices(2_000, 2, 1)},
    }
    p1 = results["p1"][0]["ms"]
    for key in ("ema_jax", "ema_jax nochk", "flat lerp", "flat lerp+chk", "optax.ema", "np copy"):
        assert p1[key] > 0
    assert (update.torch is None) == ("torch foreach" not in p1)
    # the flags section's row, as bench_flags builds it from each child (spawned below)
    results["flags"] = [{"flags": "(default)", "ms": p1, "adam": results["p2_adam"]}]
    for row in results["leaf_overhead"]:
        assert {"jit no-op", "ema_jax", "ema_jax nochk"} <= set(row["us_per_leaf"])
    adam = results["p2_adam"]["paired_extra_bytes_per_param"]
    assert set(adam) == {"adam+ema_jax", "adam+ema_jax nochk", "adam+lerp"}
    assert all(b["q1"] <= b["ratio"] <= b["q3"] for b in adam.values())
    p2 = results["p2_model"]
    assert set(p2["ratios"]) == {"with EMA", "with EMA nochk"}
    assert all(math.isfinite(r["ratio"]) and r["q1"] <= r["q3"] for r in p2["ratios"].values())
    assert p2["params"] > 0 and p2["leaves"] == 14
    for p in results["p4"]:
        assert p["target"] == pytest.approx(7 / 9) and math.isfinite(p["ratio"])
        assert set(p["ms"]) == {"K decays, one update", "K separate updates"}
    assert set(results["choices"]["ms"]) == {
        "sum guard + cond",
        "no guard",
        "not donated",
        "update_every=4, per step",
    }
    text = report.report(results)
    for goal in ("P2 train step with EMA /", "P2 adam+ema_jax − adam", "P3 live bytes", "P4 K=3"):
        assert goal in text
    assert "### Fixed cost per leaf" in text and "| (default) |" in text
    assert "| no guard |" in text
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
    assert "device goal: ema_jax update GB/s" in text and "### Bandwidth on" in text
    device = next(line for line in text.splitlines() if line.startswith("| device goal"))
    assert device.endswith("| ≥ 0.80 | n/a |") == (bandwidth["backend"] != "gpu")
    # every goal but P1 (torch-only) has a row per measured item, judged yes or no
    rows = [line for line in text.splitlines() if line.endswith(("| yes |", "| no |"))]
    expected = 2 + 2 + 1 + 2 + (1 if update.torch is not None else 0)
    assert len(rows) == expected + (bandwidth["backend"] == "gpu")


def test_p1_paired_with_torch_reports_speeds_and_quartiles() -> None:
    """Without torch there is nothing to pair with; with it, each speed is a median of
    per-round torch/ema_jax ratios and lies within its quartiles, and the report shows it."""
    p1 = update.bench_p1(2_000, 2, 3)
    paired = p1["paired"]
    assert p1["ms"]["ema_jax"] > 0
    if update.torch is None:
        assert paired == {}
        return
    faster = min(("torch foreach", "torch foreach 1T"), key=p1["ms"].__getitem__)
    assert paired["torch"] == faster and paired["rounds"] == 3
    for key in ("ema_jax", "ema_jax nochk"):
        assert 0 < paired[key]["q1"] <= paired[key]["speed"] <= paired[key]["q3"]
    results = {"machine": "test", "load": "n/a", "load_after": "n/a", "repeats": 1}
    results["p1"] = [{"params": 2_000, "leaves": 2, **p1}]
    row = next(r for r in report.report(results).splitlines() if r.startswith("| P1 throughput"))
    assert f"paired with `{faster}` over 3 rounds" in row
    assert row.split(" | ")[-3] == f"{paired['ema_jax']['speed']:.2f}×"
    assert row.endswith("| yes |") == (paired["ema_jax"]["speed"] >= 1.0)


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
        ("P1", {"speed vs torch": 1.0}, True, "1.00×", "≥ 1.0×"),
        ("P1", {"speed vs torch": 0.999}, False, "1.00×", "≥ 1.0×"),
        ("P2 train step", {"ratio": 1.03}, True, "1.030", "≤ 1.03"),
        ("P2 train step", {"ratio": 1.031}, False, "1.031", "≤ 1.03"),
        ("P2 Adam step", {"extra B/param": 8.0}, True, "8.0 B/param", "≤ 8 B/param"),
        ("P2 Adam step", {"extra B/param": 8.2}, False, "8.2 B/param", "≤ 8 B/param"),
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
        "P1", "P2 train step", "P2 Adam step", "P3", "P4", "device"
    ]  # fmt: skip
    for goal in goals.GOALS:
        assert goal.section in report.MEASURED and goal.description


@pytest.mark.parametrize("name", ["bench_cpu", "bandwidth_cpu"])
def test_the_report_renders_the_stored_results_as_stored(name: str) -> None:
    """The stored Markdown was rendered from the stored JSON (by the former single-file
    benchmark); the P4 rows have since lost the removed K-trees detail, and nothing else."""
    results = json.loads((RESULTS / f"{name}.json").read_text())
    stored = (RESULTS / f"{name}.md").read_text()
    assert report.report(results) == re.sub(r"; the former K-trees layout: [\d.]+ ms", "", stored)


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
    assert results["p1"] == [] and "p2_model" not in results


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--p2-batch", "0"], ["--p2-model", "x"]])
def test_the_command_line_refuses_bad_counts(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
