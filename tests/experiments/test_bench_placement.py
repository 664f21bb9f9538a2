"""``experiments/bench/placement``: the P5 row's bytes per device are exact counts, so they
are asserted (1/N of the EMA up to the unsplittable bias, no collective); P6 says "not
measured" without a GPU."""

from __future__ import annotations

import jax

from experiments.bench import placement, report


def test_shard_over_row_holds_one_nth_of_the_ema_per_device_and_no_collective() -> None:
    row = placement.bench_shard_over(n=8_000, leaves=2)
    devices = row["devices"]
    assert devices == jax.device_count() == 8
    bias = row["unsplittable_bytes"]
    assert row["replicated"]["ema_bytes_per_device"] == 4 * 8_000 + bias
    assert row["shard_over"]["ema_bytes_per_device"] == 4 * 8_000 // devices + bias
    assert row["replicated"]["collectives"] == row["shard_over"]["collectives"] == []
    text = "\n".join(placement.shard_over_section(row))
    assert 'shard_over="data"' in text and "none" in text


def test_offload_row_is_not_measured_without_a_gpu() -> None:
    row = placement.bench_offload(1_000, 2, repeats=1)
    assert jax.default_backend() != "gpu" and "not measured" in row["status"]
    assert "not measured" in "\n".join(report.SECTIONS["p6"](row))
