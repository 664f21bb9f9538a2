"""The update (P1) and the Adam step (P2) under other XLA_FLAGS, each in a fresh process.

XLA reads its flags when the backend starts, so each setting runs this module as a child
process, which prints its measurements as one JSON line::

    XLA_FLAGS=--xla_cpu_enable_fast_math=true python -m experiments.bench.flags 1000000 100 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from experiments.bench.train_step import bench_adam_step
from experiments.bench.update import bench_update

FLAG_SETS = (
    "",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_enable_fast_math=true",
    # XLA:CPU's multi-output fusion pass is a backend option, not a flag of its own.
    "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion",
)
"""The settings compared; ``""`` is XLA's default."""

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_MODULE = "experiments.bench.flags"
"""This module, as ``python -m`` names it."""


def measure(n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """What the child measures under the XLA_FLAGS it was started with: ``ms`` per
    implementation of one update (P1) and the Adam step with and without EMA (P2)."""
    return {"ms": bench_update(n, leaves, repeats), "adam": bench_adam_step(n, leaves, repeats)}


def _run_child(flags: str, n: int, leaves: int, repeats: int) -> dict[str, Any]:
    """:func:`measure` in a fresh process under ``flags``; ``{"error": ...}`` if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", CHILD_MODULE, str(n), str(leaves), str(repeats)],
        env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return {"error": lines[-1]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def bench_flags(n: int, leaves: int, repeats: int, flag_sets: list[str]) -> list[dict[str, Any]]:
    """One row per setting: ``flags`` (``"(default)"`` for XLA's), and :func:`measure`'s
    results or the child's last line of stderr as ``error``."""
    return [
        {"flags": flags or "(default)", **_run_child(flags, n, leaves, repeats)}
        for flags in flag_sets
    ]


def main(argv: list[str] | None = None) -> None:
    """The child's entry point: print :func:`measure`'s results as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("params", type=int)
    parser.add_argument("leaves", type=int)
    parser.add_argument("repeats", type=int)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.params, args.leaves, args.repeats)))


if __name__ == "__main__":
    main()
