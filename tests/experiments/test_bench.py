"""``experiments/bench_ema.py`` at toy sizes: the benchmark keeps running and its report
keeps its shape. No timing is asserted (a benchmark is not a test); the memory figure
(P3) is a count of live bytes, exact on any machine, so it is asserted."""

from __future__ import annotations

import math

import jax
import pytest

from experiments import bench_ema as bench


def test_memory_of_params_adam_and_ema_is_exactly_one_extra_copy() -> None:
    out = bench.bench_memory(n=4_000, leaves=4)
    n_bytes = out["param_bytes"]
    assert n_bytes == 4 * 4_000
    # params + Adam's mu and nu + its int32 count; nothing else survives a donated step
    assert out["without EMA"]["live_bytes"] == 3 * n_bytes + 4
    # + the accumulators + count, num_skipped (int32) and weight (float32)
    assert out["extra_bytes"] == n_bytes + 12


def test_every_section_runs_and_the_report_lists_the_goals() -> None:
    results = {
        "machine": "test",
        "load": "n/a",
        "load_after": "n/a",
        "repeats": 1,
        "p1": [{"params": 2_000, "leaves": 2, "ms": bench.bench_update(2_000, 2, 1)}],
        "p2_model": bench.bench_train_step("dcnn_li", batch=4, steps=1, repeats=2),
        "p2_adam": bench.bench_adam_step(2_000, 2, 1),
        "p3": bench.bench_memory(2_000, 2),
        "p4": [bench.bench_multi_decay(3_000, 3, 1, skip_nonfinite=c) for c in (True, False)],
        "leaf_overhead": bench.bench_leaf_overhead((2, 3), 1),
        "bandwidth": [bench.bench_bandwidth(2_000, 2, 1)],
    }
    p1 = results["p1"][0]["ms"]
    for key in ("ema_jax", "ema_jax nochk", "flat lerp", "flat lerp+chk", "optax.ema", "np copy"):
        assert p1[key] > 0
    # the flags section's row, as bench_flags builds it in each subprocess (not spawned here)
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
        assert set(p["ms"]) == {"K decays, one update", "K trees, one jit", "K separate updates"}
    text = bench.report(results)
    for goal in ("P2 train step with EMA /", "P2 adam+ema_jax − adam", "P3 live bytes", "P4 K=3"):
        assert goal in text
    assert "### Fixed cost per leaf" in text and "| (default) |" in text
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


def test_p1_paired_with_torch_reports_speeds_and_quartiles() -> None:
    """Without torch there is nothing to pair with; with it, each speed is a median of
    per-round torch/ema_jax ratios and lies within its quartiles, and the report shows it."""
    p1 = bench.bench_p1(2_000, 2, 3)
    paired = p1["paired"]
    assert p1["ms"]["ema_jax"] > 0
    if bench.torch is None:
        assert paired == {}
        return
    faster = min(("torch foreach", "torch foreach 1T"), key=p1["ms"].__getitem__)
    assert paired["torch"] == faster and paired["rounds"] == 3
    for key in ("ema_jax", "ema_jax nochk"):
        assert 0 < paired[key]["q1"] <= paired[key]["speed"] <= paired[key]["q3"]
    results = {"machine": "test", "load": "n/a", "load_after": "n/a", "repeats": 1}
    results["p1"] = [{"params": 2_000, "leaves": 2, **p1}]
    row = next(r for r in bench.report(results).splitlines() if r.startswith("| P1 throughput"))
    assert f"paired with `{faster}` over 3 rounds" in row
    assert row.split(" | ")[-3] == f"{paired['ema_jax']['speed']:.2f}×"
