"""``python -m ema_jax.posthoc DIRECTORY --sigma-rel S [--sigma-rel S2 ...] --out PATH``:
synthesize the power-function EMA of each ``S`` from a snapshot directory, in one pass over
the snapshots, and export it for :func:`ema_jax.checkpoint.load_exported`: with one
``--sigma-rel`` the export is ``PATH``; with several, ``PATH/sigma_rel_<S>`` for each.
Bad input, and any error reading the snapshots (a damaged or corrupt file included),
exits with status 2 and one line naming the flag or the directory; nothing is written."""

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
        description="Synthesize power-function EMAs of any sigma_rel from the snapshots that "
        "ema_jax.posthoc.save_snapshot wrote (one pass for all of them), and export each "
        "for ema_jax.checkpoint.load_exported.",
    )
    p.add_argument("directory", help="the snapshot directory")
    p.add_argument(
        "--sigma-rel",
        type=float,
        action="append",
        required=True,
        help=f"relative width of an EMA to synthesize, in (0, {SIGMA_REL_GAMMA0:.4f}); "
        "repeat it for several (one export each, in --out/sigma_rel_<S>)",
    )
    p.add_argument("--step", type=int, default=None, help="step to synthesize at (default: last)")
    p.add_argument(
        "--out",
        required=True,
        help="path of the export (an Orbax checkpoint); with several --sigma-rel, the "
        "directory holding one export per sigma_rel, sigma_rel_<S>",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing exports")
    return p


def export_name(sigma_rel: float) -> str:
    """The folder under ``--out`` of the export of ``sigma_rel`` when several are asked."""
    return f"sigma_rel_{sigma_rel:g}"


def _check_out(path: str, force: bool, flag: str = "--out") -> None:
    """Refuses to write over anything but an export, and over an export without ``force``."""
    from ema_jax.checkpoint import layout

    if not os.path.exists(path):
        return
    found = layout.kind(path) if os.path.isdir(path) else None
    if found is not None and found != layout.EXPORT:
        raise ValueError(
            f"{flag} {path} is {layout.describe(path, found).split(':')[0]}: refusing to "
            "write over it (--force replaces only an export); choose another --out"
        )
    if not force:
        raise ValueError(f"{flag} {path} already exists: pass --force to overwrite it")
    if found is None and os.path.isdir(path) and os.listdir(path):
        raise ValueError(
            f"{flag} {path} is a directory that is not an export: refusing to delete it "
            "(--force replaces only an export); choose another --out"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (argparse exits with 2 on bad input)."""
    from ema_jax import checkpoint
    from ema_jax.posthoc.streaming import synthesize_from

    parser = _parser()
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    sigmas = args.sigma_rel
    try:  # the flags first, in their own names, before anything is read or written
        for s in sigmas:
            _checks.real(
                "--sigma-rel", s, low=0.0, high=SIGMA_REL_GAMMA0, low_open=True, high_open=True
            )
        if len(set(sigmas)) != len(sigmas):
            raise ValueError(f"--sigma-rel is given twice for the same value: {sigmas}")
        if args.step is not None:
            _checks.integer("--step", args.step, 1)
        if len(sigmas) == 1:
            paths = [out]
            _check_out(out, args.force)
        else:
            if os.path.exists(out) and not os.path.isdir(out):
                raise ValueError(
                    f"--out {out} is a file: with several --sigma-rel it is a directory"
                )
            found = checkpoint.layout.kind(out) if os.path.isdir(out) else None
            if found is not None:
                raise ValueError(
                    f"--out {out} is {checkpoint.layout.describe(out, found).split(':')[0]}: with "
                    "several --sigma-rel, --out is a directory holding one export per sigma_rel"
                )
            paths = [os.path.join(out, export_name(s)) for s in sigmas]
            for path in paths:
                _check_out(path, args.force, "--out's")
        params = synthesize_from(args.directory, sigmas, args.step)
        for path, tree in zip(paths, params, strict=True):
            checkpoint.export_params(path, tree, force=args.force)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        parser.error(_one_line(e))
    except Exception as e:  # Orbax / TensorStore raise bare Exceptions: one line, status 2
        parser.error(f"reading {args.directory} failed: {_one_line(e)}")
    for path, s, tree in zip(paths, sigmas, params, strict=True):
        leaves = jax.tree.leaves(tree)
        print(
            f"wrote {path}: sigma_rel {s:g}, "
            f"{len(leaves)} arrays, {sum(math.prod(np.shape(x)) for x in leaves)} values"
        )
    return 0


def _one_line(error: BaseException) -> str:
    """The error's message on one line (Orbax's may span many), with its type when it is
    not one of ema_jax's own (``ValueError``, ``TypeError``, ``FileNotFoundError``)."""
    text = " ".join(str(error).split()) or repr(error)
    if type(error) in (ValueError, TypeError, FileNotFoundError):
        return text
    return f"{type(error).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
