"""Post-hoc EMA (Karras et al. 2024, EDM2): choose the EMA length after training.

Track two power-function EMAs during training (σ_rel 0.05 and 0.10 by default), write a
snapshot of them every N steps, and afterwards *synthesize* the power-function EMA of any
other ``σ_rel`` (with γ > 0, so ``σ_rel < 0.2887``) as a linear combination of the
snapshots, by least squares on their averaging profiles. The recipe, the formulas and the
command line are in ``docs/posthoc.md``; the profile of ``update_every = k`` in
``docs/semantics.md``.

* :func:`solve_coefficients`: the weights, from the profiles' closed-form inner products.
* :func:`synthesize`: the synthesized params from snapshots in memory.
* :func:`snapshot_manager`, :func:`save_snapshot`: snapshots written with Orbax into their
  own directory (next to the training checkpoint, never inside it), all kept.
* :func:`synthesize_from`: the same from that directory, snapshot by snapshot, so memory
  stays at about one snapshot plus the output.
* ``python -m ema_jax.posthoc DIRECTORY --sigma-rel 0.08 --out PATH``: an export that
  :func:`ema_jax.checkpoint.load_exported` reads.

Orbax is imported only by the functions that read or write a directory.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ema_jax import _checks, _dtypes, window
from ema_jax.transform import EmaState, Params, accumulators, num_averages

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

#: The σ_rel of the two EMAs recorded during training (EDM2's defaults).
SIGMA_RELS = (0.05, 0.10)
#: σ_rel of γ = 0 (a uniform average), ``sqrt(1/12)``: synthesized σ_rel must be below it.
SIGMA_REL_GAMMA0 = window.gamma_to_sigma_rel(0.0)
#: Largest condition number of the snapshots' Gram matrix that is still solved.
MAX_CONDITION = 1e13
#: The Orbax item holding one snapshot's averages, and the metadata key of its description.
ITEM = "snapshot"
_META_KEY = "ema_jax.posthoc"


# --------------------------------------------------------------------------- the solver


def _profile_inner_products(
    a_steps: np.ndarray, a_gammas: np.ndarray, b_steps: np.ndarray, b_gammas: np.ndarray
) -> np.ndarray:
    """``<p_a, p_b>`` of power-function profiles ``p(τ) = (γ+1)·τ^γ / t^(γ+1)`` on
    ``[0, t]``, broadcast: with ``t_a ≤ t_b`` it is
    ``(γ_a+1)(γ_b+1) / ((γ_a+γ_b+1)·t_b) · (t_a/t_b)^γ_b``."""
    first = a_steps <= b_steps
    t_lo = np.where(first, a_steps, b_steps)
    t_hi = np.where(first, b_steps, a_steps)
    g_hi = np.where(first, b_gammas, a_gammas)
    scale = (a_gammas + 1.0) * (b_gammas + 1.0) / (a_gammas + b_gammas + 1.0)
    return np.asarray(scale / t_hi * (t_lo / t_hi) ** g_hi, np.float64)


def solve_coefficients(
    in_steps: Sequence[float],
    in_sigma_rels: Sequence[float],
    out_step: float,
    out_sigma_rel: float,
) -> np.ndarray:
    """The weights that synthesize the power-function EMA ``(out_step, out_sigma_rel)``.

    Snapshot ``i`` is the power-function EMA of relative width ``in_sigma_rels[i]`` at step
    ``in_steps[i]``. The weights minimise the L2 distance between the target's averaging
    profile and the weighted sum of the snapshots' (EDM2's Algorithm 3: a linear system of
    the profiles' inner products), then are normalised to sum to 1. Snapshots after
    ``out_step`` get weight 0.

    Returns:
      float64 ``[len(in_steps)]``, summing to 1.

    Raises:
      ValueError: ``out_sigma_rel`` not finite in ``(0, SIGMA_REL_GAMMA0)``; an input
        σ_rel outside ``(0, SIGMA_REL_MAX]``; steps not finite and > 0; lengths differing;
        no snapshot at or before ``out_step``; identical snapshots or a near-singular system.
    """
    steps = np.asarray(
        [_checks.positive(f"in_steps[{i}]", s) for i, s in enumerate(in_steps)], np.float64
    )
    sigmas = [
        _checks.real(f"in_sigma_rels[{i}]", s, low=0.0, high=window.SIGMA_REL_MAX, low_open=True)
        for i, s in enumerate(in_sigma_rels)
    ]
    if len(sigmas) != len(steps):
        raise ValueError(
            f"in_steps and in_sigma_rels must have one entry per snapshot, got {len(steps)} "
            f"and {len(sigmas)}"
        )
    out_step = _checks.positive("out_step", out_step)
    out_sigma_rel = _checks.real(
        "out_sigma_rel",
        out_sigma_rel,
        low=0.0,
        high=SIGMA_REL_GAMMA0,
        low_open=True,
        high_open=True,
    )
    if not len(steps):
        raise ValueError("no snapshots: in_steps is empty")
    used = np.flatnonzero(steps <= out_step)
    if not len(used):
        raise ValueError(
            f"every snapshot is after out_step={out_step:g} (the earliest is at step "
            f"{steps.min():g}): a synthesized EMA uses only snapshots at or before its step"
        )
    gammas = np.asarray([window.sigma_rel_to_gamma(s) for s in sigmas], np.float64)
    seen: dict[tuple[float, float], int] = {}
    for i in used.tolist():
        twin = seen.setdefault((float(steps[i]), sigmas[i]), i)
        if twin != i:
            raise ValueError(
                f"snapshots {twin} and {i} are the same EMA (step {steps[i]:g}, sigma_rel "
                f"{sigmas[i]:g}): their profiles are identical, so the system is singular"
            )
    t, g = steps[used] / out_step, gammas[used]  # steps relative to out_step: same solution
    gram = _profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
    target = _profile_inner_products(
        t, g, np.ones(()), np.full((), window.sigma_rel_to_gamma(out_sigma_rel))
    )
    condition = np.linalg.cond(gram)
    if not condition < MAX_CONDITION:
        raise ValueError(
            f"the snapshots' profiles are nearly linearly dependent (condition number "
            f"{condition:.3g} > {MAX_CONDITION:g}): use fewer or more distinct snapshots"
        )
    weights = np.linalg.solve(gram, target)
    total = weights.sum()
    if not np.isfinite(total) or abs(total) < 1e-12:
        raise ValueError(f"the least-squares weights sum to {total:g}: cannot normalise them")
    out = np.zeros(len(steps), np.float64)
    out[used] = weights / total
    return out


# --------------------------------------------------------------------------- combining


def _accumulator_dtype(dtype: Any) -> np.dtype:
    """float32 or wider for floating leaves; other leaves keep their dtype."""
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return np.dtype(jnp.promote_types(dtype, jnp.float32))
    return dtype


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(total: Params, trees: Sequence[Params], weights: jax.Array) -> Params:
    """``total + Σ_k weights[k]·trees[k]`` for floating leaves (in ``total``'s dtypes);
    other leaves take the last tree's value. ``total`` is donated: updated in place."""

    def leaf(acc: jax.Array, *xs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(acc.dtype, jnp.inexact):
            return xs[-1].astype(acc.dtype)
        terms = [
            w.astype(acc.dtype) * x.astype(acc.dtype)
            for w, x in zip(list(weights), xs, strict=True)
        ]
        return acc + functools.reduce(jnp.add, terms)

    return jax.tree.map(leaf, total, *trees)


def _zeros(tree: Params) -> Params:
    """Zeros in the accumulator dtypes, placed like ``tree``'s leaves."""
    return jax.tree.map(
        lambda x: jnp.zeros(
            np.shape(x), _accumulator_dtype(jnp.result_type(x)), device=getattr(x, "sharding", None)
        ),
        tree,
    )


def synthesize(
    snapshots: Sequence[tuple[int, float, Params]], sigma_rel: float, step: int | None = None
) -> Params:
    """The power-function EMA of ``sigma_rel`` at ``step``, from snapshots in memory.

    Args:
      snapshots: ``(step, sigma_rel, params)`` triples: the power-function EMA of that
        σ_rel at that step (e.g. ``ema_jax.accumulators(state, i)``), all with the same
        tree, shapes and dtypes.
      sigma_rel: the σ_rel to synthesize, in ``(0, SIGMA_REL_GAMMA0)``.
      step: the step to synthesize at; ``None`` = the last snapshot's step. Snapshots after
        it are not used.

    Returns:
      A tree like the snapshots' params: ``Σ_i c_i·params_i`` with the weights of
      :func:`solve_coefficients`, accumulated in float32 or wider and returned in the
      snapshots' dtypes. Integer and bool leaves come from the last snapshot used.
    """
    snapshots = list(snapshots)
    if not snapshots:
        raise ValueError("snapshots is empty: synthesizing needs at least one snapshot")
    for i, item in enumerate(snapshots):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise TypeError(f"snapshots[{i}] must be a (step, sigma_rel, params) triple")
    first = _checks.shapes_by_path(snapshots[0][2])
    for i, (_, _, tree) in enumerate(snapshots[1:], start=1):
        problem = _checks.first_difference(
            first,
            _checks.shapes_by_path(tree),
            expected_name="snapshots[0]",
            got_name=f"snapshots[{i}]",
            compare_dtypes=True,
        )
        if problem is not None:
            raise ValueError(f"snapshots do not match: {problem}")
    steps = [s for s, _, _ in snapshots]
    out_step = max(steps) if step is None else step
    weights = solve_coefficients(steps, [s for _, s, _ in snapshots], out_step, sigma_rel)
    order = sorted((i for i in range(len(snapshots)) if weights[i] != 0.0), key=steps.__getitem__)
    total = _zeros(snapshots[0][2])
    for i in order:
        total = _accumulate(total, [snapshots[i][2]], jnp.asarray(weights[i : i + 1]))
    return _dtypes.cast_back(total, [x.dtype for x in first.values()])


# --------------------------------------------------------------------------- Orbax


def snapshot_manager(
    directory: str | os.PathLike[str], *, async_save: bool = True
) -> ocp.CheckpointManager:
    """An Orbax ``CheckpointManager`` for :func:`save_snapshot`: ``directory/<step>``,
    every snapshot kept (no ``max_to_keep``).

    Give it its own directory, next to the training checkpoint (e.g. ``run/checkpoints``
    and ``run/posthoc``): the training manager prunes old steps, this one must not. With
    ``async_save`` writes continue in the background; call ``mngr.wait_until_finished()``
    (or ``mngr.close()``) before reading.
    """
    import orbax.checkpoint as ocp

    _checks.flag("async_save", async_save)
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=options,
        item_handlers={ITEM: ocp.StandardCheckpointHandler()},
    )


def _flat_keys(tree: Params) -> list[str]:
    """Orbax's flattened key of each leaf, in ``jax.tree.leaves`` order."""
    import orbax.checkpoint as ocp

    return [".".join(key) for key in ocp.tree.to_flat_dict(tree)]


def save_snapshot(
    mngr: ocp.CheckpointManager,
    step: int,
    averages: EmaState | Sequence[Params],
    sigma_rels: Sequence[float] = SIGMA_RELS,
    *,
    dtype: Any = jnp.float32,
) -> bool:
    """Writes the power-function EMAs at ``step`` as one snapshot (all kept).

    Args:
      mngr: from :func:`snapshot_manager`.
      step: the optimizer step the averages are at: with ``update_every = k``, a multiple
        of k (the step of the last update), so the snapshot is that step's profile.
      averages: an :class:`~ema_jax.EmaState` of ``ema((power_function(sigma_rel=s), ...))``
        (Linen: ``state.ema_state``; its full-precision accumulators are written), or a
        sequence of params trees, one per σ_rel (e.g. ``state.accumulators(i)`` for chosen
        ``i`` when other averages share the state; NNX: the averages' ``nnx.State``).
      sigma_rels: the σ_rel of each average, in order.
      dtype: the floating leaves are written in this dtype (float32 by default); others
        keep theirs. The params' own dtypes are recorded: synthesis returns them.

    Returns:
      Whether a save was started (Orbax's answer).
    """
    import orbax.checkpoint as ocp

    step = _checks.integer("step", step, 1)  # type: ignore[assignment]
    dtype = _checks.floating_dtype("dtype", dtype)
    sigmas = [
        _checks.real(f"sigma_rels[{i}]", s, low=0.0, high=window.SIGMA_REL_MAX, low_open=True)
        for i, s in enumerate(sigma_rels)
    ]
    if isinstance(averages, EmaState):
        k = num_averages(averages)
        trees = [accumulators(averages, i) for i in range(k)]
        param_dtypes = [np.dtype(d) for d in averages.param_dtypes]
    else:
        trees = list(averages)
        param_dtypes = (
            [np.dtype(jnp.result_type(x)) for x in jax.tree.leaves(trees[0])] if trees else []
        )
    if len(trees) != len(sigmas):
        raise ValueError(
            f"averages holds {len(trees)} averages but sigma_rels gives {len(sigmas)} σ_rel"
        )

    def stored(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else x

    description = {
        "step": step,
        "sigma_rels": sigmas,
        "param_dtypes": dict(
            zip(_flat_keys(trees[0]), [d.name for d in param_dtypes], strict=True)
        ),
    }
    args = ocp.args.Composite(
        **{
            ITEM: ocp.args.StandardSave(
                [jax.tree.map(stored, t) for t in trees],
                custom_metadata={_META_KEY: description},
            )
        }
    )
    return bool(mngr.save(step, args=args))


def _snapshot_paths(directory: str) -> list[tuple[int, str]]:
    """``(step, path of its item)`` of every finished snapshot, by step."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no snapshot directory at {directory}")
    found = ocp.path.step.standard_name_format().find_all(directory)
    paths = sorted((int(m.step), os.fspath(m.path / ITEM)) for m in found)
    if not paths:
        raise FileNotFoundError(f"no snapshots in {directory}")
    return paths


def _describe(path: str) -> tuple[dict[str, Any], Any]:
    """A snapshot's description (σ_rels, params' dtypes) and its Orbax tree metadata."""
    import orbax.checkpoint as ocp
    from etils import epath

    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
    description = (metadata.custom_metadata or {}).get(_META_KEY)
    if description is None:
        raise ValueError(f"{path} is not a snapshot written by ema_jax.posthoc.save_snapshot")
    return description, metadata.tree


def synthesize_from(
    directory: str | os.PathLike[str],
    sigma_rel: float,
    step: int | None = None,
    target: Params | None = None,
) -> Params:
    """:func:`synthesize` from the snapshots in ``directory`` (written by
    :func:`save_snapshot`), read one snapshot at a time.

    Only the snapshots' metadata is read to solve for the weights; then each snapshot with
    a non-zero weight is restored, added to the running sum and dropped, so peak memory is
    about one snapshot plus the output, however many snapshots there are.

    Args:
      directory: the snapshot directory.
      sigma_rel: the σ_rel to synthesize, in ``(0, SIGMA_REL_GAMMA0)``.
      step: ``None`` = the last snapshot's step; snapshots after ``step`` are not read.
      target: a params-like tree of arrays or ``jax.ShapeDtypeStruct`` (with shardings to
        land sharded): gives the tree type and where each leaf goes, checked first (paths,
        shapes). Without it the saved tree (dicts, lists) lands on this process's first
        device.

    Returns:
      The synthesized params, in the dtypes the params had when recorded.
    """
    from ema_jax import checkpoint

    directory = os.path.abspath(directory)
    snapshots = _snapshot_paths(directory)
    described = [(s, p, *_describe(p)) for s, p in snapshots]
    first_step, _, first_description, first_tree = described[0]
    reference = checkpoint._flat("averages", first_tree[0])
    for s, _, _, tree in described:
        for k, average in enumerate(tree):
            problem = _checks.first_difference(
                reference,
                checkpoint._flat("averages", average),
                expected_name=f"snapshot of step {first_step}",
                got_name=f"snapshot of step {s} (average {k})",
                compare_dtypes=True,
            )
            if problem is not None:
                raise ValueError(f"snapshots do not match: {problem}")
    in_steps = [s for s, _, d, _ in described for _ in d["sigma_rels"]]
    in_sigmas = [x for _, _, d, _ in described for x in d["sigma_rels"]]
    out_step = snapshots[-1][0] if step is None else _checks.integer("step", step, 1)
    weights = solve_coefficients(in_steps, in_sigmas, out_step, sigma_rel)  # type: ignore[arg-type]

    if target is None:
        placed = checkpoint._local_target(first_tree[0])
    else:
        problem = _checks.first_difference(
            checkpoint._flat("averages", target),
            reference,
            expected_name="target",
            got_name="snapshots",
        )
        if problem is not None:
            raise ValueError(f"target does not match the snapshots: {problem}")
        placed = target
    keys = list(checkpoint._flat("averages", placed))  # "averages.<orbax key>", leaf order
    stored = [reference[k].dtype for k in keys]
    leaves, treedef = jax.tree.flatten(placed)
    one = jax.tree.unflatten(
        treedef,
        [
            jax.ShapeDtypeStruct(tuple(x.shape), d, sharding=getattr(x, "sharding", None))
            for x, d in zip(leaves, stored, strict=True)
        ],
    )
    total = _zeros(one)
    offset = 0
    for _, path, description, _ in described:
        k = len(description["sigma_rels"])
        w = weights[offset : offset + k]
        offset += k
        if not np.any(w):
            continue
        averages = checkpoint._load_tree(path, [one] * k, ITEM)
        # Wait for the sum before reading the next snapshot: this one's buffers are freed.
        total = jax.block_until_ready(_accumulate(total, averages, jnp.asarray(w)))
        del averages
    names = first_description["param_dtypes"]
    dtypes = [np.dtype(names[k.removeprefix("averages.")]) for k in keys]
    return _dtypes.cast_back(total, dtypes)


# --------------------------------------------------------------------------- command line


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
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        params = synthesize_from(args.directory, args.sigma_rel, args.step)
        from ema_jax import checkpoint

        checkpoint.export_params(args.out, params, force=args.force)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    leaves = jax.tree.leaves(params)
    print(
        f"wrote {os.path.abspath(args.out)}: sigma_rel {args.sigma_rel:g}, "
        f"{len(leaves)} arrays, {sum(math.prod(np.shape(x)) for x in leaves)} values"
    )
    return 0


__all__ = [
    "ITEM",
    "SIGMA_RELS",
    "SIGMA_REL_GAMMA0",
    "save_snapshot",
    "snapshot_manager",
    "solve_coefficients",
    "synthesize",
    "synthesize_from",
]

if __name__ == "__main__":
    sys.exit(main())
