"""Command line: ``python -m experiments.bench`` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import dataclass
from typing import Any

import jax

import experiments.bench as package
from experiments.bench.bandwidth import bench_bandwidth
from experiments.bench.bema import bench_bema
from experiments.bench.flags import FLAG_SETS, bench_flags
from experiments.bench.memory import bench_memory
from experiments.bench.multi_decay import bench_multi_decay
from experiments.bench.nnx_update import bench_nnx
from experiments.bench.placement import bench_offload, bench_shard_over
from experiments.bench.posthoc import bench_posthoc
from experiments.bench.report import report
from experiments.bench.train_step import bench_mlp_step, bench_train_step
from experiments.bench.update import bench_choices, bench_goal_row, bench_leaf_overhead, torch
from experiments.models import MODELS

Size = tuple[int, int]
"""``(params, leaves)``"""


@dataclass(frozen=True)
class Plan:
    """The sizes and repeats of one run: ``--quick`` or the full table."""

    g1_sizes: tuple[Size, ...]
    g2_sizes: tuple[Size, ...]
    g5_sizes: tuple[Size, ...]
    bandwidth_sizes: tuple[Size, ...]
    repeats: int
    adam_size: Size
    mlp: tuple[int, int, int]  # G4's model: width, depth, batch
    mlp_rounds: int
    train_rounds: int
    flag_sets: tuple[str, ...]
    posthoc_sizes: tuple[int, ...]  # params per recorded average, 20 snapshots of 2


QUICK = Plan(
    g1_sizes=((1_000_000, 100),),
    g2_sizes=((1_000_000, 1000),),
    g5_sizes=((1_000_000, 100),),
    bandwidth_sizes=((1_000_000, 10),),
    repeats=5,
    adam_size=(1_000_000, 100),
    mlp=(256, 2, 32),
    mlp_rounds=3,
    train_rounds=4,
    flag_sets=FLAG_SETS[:2],
    posthoc_sizes=(200_000,),
)
FULL = Plan(
    g1_sizes=((10_000_000, 100), (100_000_000, 100)),
    g2_sizes=((10_000_000, 1000),),
    g5_sizes=((10_000_000, 100), (1_000_000, 1000)),
    bandwidth_sizes=((10_000_000, 100), (100_000_000, 100)),
    repeats=30,
    adam_size=(10_000_000, 100),
    mlp=(1600, 4, 256),
    mlp_rounds=11,
    train_rounds=41,
    flag_sets=FLAG_SETS,
    posthoc_sizes=(2_000_000, 10_000_000),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags of ``python -m experiments.bench``; invalid counts are usage errors."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    parser.add_argument("--md", metavar="PATH", help="write the printed tables as Markdown")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per measurement")
    parser.add_argument("--no-flags", action="store_true", help="skip the XLA_FLAGS section")
    parser.add_argument(
        "--bandwidth-only",
        action="store_true",
        help="only the device goal (update vs copy bandwidth) on JAX's default backend: "
        "the section to run on a GPU",
    )
    parser.add_argument(
        "--p2-model",
        default="dcnn_li",
        choices=sorted(MODELS),
        help="RUL model of the G4 train step (default dcnn_li, the one the FD001 results use)",
    )
    parser.add_argument(
        "--p2-batch", type=int, default=512, help="batch of the G4 RUL train step (default 512)"
    )
    parser.add_argument(
        "--posthoc-only",
        action="store_true",
        help="only the post-hoc section (synthesis vs reading the snapshot files)",
    )
    parser.add_argument(
        "--posthoc-sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="params per recorded average of the post-hoc section's 20 snapshots "
        "(default 2000000 10000000; --quick 200000)",
    )
    args = parser.parse_args(argv)
    if args.posthoc_sizes is not None and min(args.posthoc_sizes) < 10:
        parser.error("--posthoc-sizes must be >= 10")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.p2_batch < 1:
        parser.error("--p2-batch must be >= 1")
    return args


def load_average() -> str:
    """The 1/5/15-minute load, to say how busy the machine was around the run."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:  # pragma: no cover
        return "n/a"


def machine() -> str:
    """The processor, CPU count and library versions the figures belong to."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, torch {torch.__version__ if torch else 'not installed'}"
    )


def measure_updates(sizes: tuple[Size, ...], repeats: int) -> list[dict[str, Any]]:
    """G1–G3 rows at each size (a third of the rounds at 100M params, at least 3), printed
    as they go."""
    rows = []
    for n, k in sizes:
        reps = max(3, repeats // 3) if n >= 100_000_000 else repeats
        row = bench_goal_row(n, k, reps)
        rows.append(row)
        print(
            f"update {n:.0e} params / {k} leaves: "
            + ", ".join(f"{a} {b:.2f}" for a, b in row["ms"].items()),
            flush=True,
        )
    return rows


def measure_goals(args: argparse.Namespace, plan: Plan, repeats: int) -> dict[str, Any]:
    """G1–G5, P3, P4, the per-leaf cost, the choices and (unless ``--no-flags``) the XLA
    flags."""
    n, leaves = plan.adam_size
    out: dict[str, Any] = {
        "g1": measure_updates(plan.g1_sizes, repeats),
        "g2": measure_updates(plan.g2_sizes, repeats),
    }
    width, depth, batch = plan.mlp
    out["g4"] = [
        bench_mlp_step(width, depth, batch, steps=2, repeats=plan.mlp_rounds),
        bench_train_step(args.p2_model, args.p2_batch, steps=20, repeats=plan.train_rounds),
    ]
    print("G4:", out["g4"], flush=True)
    out["g5"] = [bench_nnx(n, k, repeats) for n, k in plan.g5_sizes]
    print("G5:", [r["ms"] for r in out["g5"]], flush=True)
    out["p3"] = bench_memory(n, leaves)
    out["p4"] = [
        bench_multi_decay(n, k, repeats, skip_nonfinite=chk)
        for k in (leaves, 10)
        for chk in (True, False)
    ]
    out["p7"] = bench_bema(n, leaves, repeats)
    print("P7:", out["p7"]["ms"], flush=True)
    out["p5"] = bench_shard_over(n, leaves)
    print("P5:", out["p5"]["ratio"], out["p5"]["shard_over"]["collectives"], flush=True)
    out["leaf_overhead"] = bench_leaf_overhead((10, 100, 1000), repeats)
    out["choices"] = {"params": n, "leaves": leaves, "ms": bench_choices(n, leaves, repeats)}
    if not args.no_flags:
        out["flags"] = bench_flags(n, leaves, max(5, repeats // 2), list(plan.flag_sets))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the report, write ``--md`` / ``--json``; the results."""
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    repeats = args.repeats or plan.repeats
    results: dict[str, Any] = {"machine": machine(), "load": load_average(), "repeats": repeats}
    posthoc_sizes = args.posthoc_sizes or plan.posthoc_sizes
    if not args.posthoc_only:
        results["bandwidth"] = [bench_bandwidth(n, k, repeats) for n, k in plan.bandwidth_sizes]
        results["p6"] = bench_offload(*plan.adam_size, repeats)  # "not measured" without a GPU
    if not (args.bandwidth_only or args.posthoc_only):
        results.update(measure_goals(args, plan, repeats))
    if not args.bandwidth_only:
        results["posthoc"] = [bench_posthoc(n, max(3, repeats // 3)) for n in posthoc_sizes]
        print("post-hoc:", [r["ms"] for r in results["posthoc"]], flush=True)
    results["load_after"] = load_average()
    text = report(results)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
