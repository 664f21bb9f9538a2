"""``python -m ema_jax.posthoc DIRECTORY --sigma-rel S --out PATH``: synthesize the
power-function EMA of ``S`` from a snapshot directory and export it for
:func:`ema_jax.checkpoint.load_exported`. Bad input exits with status 2 and one line naming
the flag or the directory."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np

from ema_jax import _checks
from ema_jax.posthoc.solver import SIGMA_REL_GAMMA0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ema_jax.posthoc",
        description="Synthesize a power-function EMA of any sigma_rel from the snapshots that "
        "ema_jax.posthoc.save_snapshot wrote, and export it for ema_jax.checkpoint.load_exported.",
    )
    p.add_argument("directory", help="the snapshot directory")
    p.add_argument(
        "--sigma-rel",
        type=float,
        required=True,
        help=f"relative width of the EMA to synthesize, in (0, {SIGMA_REL_GAMMA0:.4f})",
    )
    p.add_argument("--step", type=int, default=None, help="step to synthesize at (default: last)")
    p.add_argument("--out", required=True, help="path of the export (an Orbax checkpoint)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (argparse exits with 2 on bad input)."""
    from ema_jax import checkpoint
    from ema_jax.posthoc.streaming import synthesize_from

    parser = _parser()
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    try:  # the flags first, in their own names, before anything is read or written
        _checks.real(
            "--sigma-rel",
            args.sigma_rel,
            low=0.0,
            high=SIGMA_REL_GAMMA0,
            low_open=True,
            high_open=True,
        )
        if args.step is not None:
            _checks.integer("--step", args.step, 1)
        if os.path.exists(out) and not args.force:
            raise ValueError(f"--out {out} already exists: pass --force to overwrite it")
        params = synthesize_from(args.directory, args.sigma_rel, args.step)
        checkpoint.export_params(out, params, force=args.force)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    leaves = jax.tree.leaves(params)
    print(
        f"wrote {out}: sigma_rel {args.sigma_rel:g}, "
        f"{len(leaves)} arrays, {sum(math.prod(np.shape(x)) for x in leaves)} values"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
