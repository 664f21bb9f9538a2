"""Post-hoc synthesis against the time of reading its snapshot files.

20 snapshots of two recorded averages (``posthoc.SIGMA_RELS``) of ``n`` fp32 params are
written once; then, side by side in one run (paired, back to back in each round, the files
in the page cache for all): reading every file of the snapshot directory as plain
bytes, ``synthesize_from`` of one width, and of K = 4 widths in its one pass. The goals
judge one width / read (≤ 3) and K widths / one width (≤ 1.6).

A fourth timing, *restores*, is the part of a synthesis that is Orbax's: every snapshot's
metadata found and each snapshot restored (checksums verified), with no arithmetic. Its
ratio to the read is the floor the one-width ratio cannot go under with Orbax snapshots.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from experiments.bench.harness import host_params, paired_ratios

SNAPSHOTS = 20
WIDTHS = (0.03, 0.08, 0.12, 0.2)
"""The K = 4 widths; the first alone is the one-width case."""


def read_files(directory: str) -> int:
    """Reads every file under ``directory`` as plain bytes; the bytes read."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                total += len(f.read())
    return total


def write_snapshots(directory: str, n: int, leaves: int, snapshots: int) -> None:
    """``snapshots`` snapshots (steps 100, 200, ...) of two averages of ``n`` fp32 params."""
    from ema_jax import posthoc

    base = [jnp.asarray(x) for x in host_params(n, leaves)]
    with posthoc.snapshot_manager(directory, async_save=False) as mngr:
        for s in range(1, snapshots + 1):
            trees = [[x + 0.01 * s + j for x in base] for j in range(2)]
            posthoc.save_snapshot(mngr, 100 * s, trees)


def bench_posthoc(
    n: int, repeats: int, *, leaves: int = 10, snapshots: int = SNAPSHOTS
) -> dict[str, Any]:
    """Median ms of reading the files, the restores, one width and K widths, and the paired
    ratios one width / read, restores / read and K widths / one width (with their
    quartiles)."""
    from ema_jax import posthoc
    from ema_jax.checkpoint import items
    from ema_jax.posthoc.snapshots import find

    with tempfile.TemporaryDirectory(prefix="bench-posthoc-") as directory:
        write_snapshots(directory, n, leaves, snapshots)
        size = read_files(directory)

        def read() -> None:
            read_files(directory)

        def restores() -> None:
            found = find(directory)
            like = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), found[0].saved.tree
            )
            with items.reader() as checkpointer:
                for snapshot in found:
                    jax.block_until_ready(snapshot.read(like, checkpointer))

        def one() -> None:
            jax.block_until_ready(posthoc.synthesize_from(directory, WIDTHS[0]))

        def widths() -> None:
            jax.block_until_ready(posthoc.synthesize_from(directory, list(WIDTHS)))

        vs_read = paired_ratios(read, {"one width": one, "restores": restores}, repeats, cold=False)
        vs_one = paired_ratios(one, {"K widths": widths}, repeats, cold=False)
    return {
        "params": n,
        "leaves": leaves,
        "snapshots": snapshots,
        "K": len(WIDTHS),
        "bytes": size,
        "repeats": repeats,
        "ms": {
            "read files": vs_read["ms"]["base"],
            "restores": vs_read["ms"]["restores"],
            "one width": vs_one["ms"]["base"],
            "K widths": vs_one["ms"]["K widths"],
        },
        "one width / read": vs_read["one width"],
        "restores / read": vs_read["restores"],
        "K widths / one width": vs_one["K widths"],
    }
