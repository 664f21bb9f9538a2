"""Post-hoc EMA (Karras et al. 2024, EDM2): choose the EMA length after training.

Track two power-function EMAs during training (σ_rel 0.05 and 0.10 by default), write a
snapshot of them every N steps, and afterwards *synthesize* the power-function EMA of any
other ``σ_rel`` (with γ > 0, so ``σ_rel < 0.2887``) as a linear combination of the
snapshots, by least squares on their averaging profiles. The recipe, the formulas and the
command line are in ``docs/posthoc.md``; the profile of ``update_every = k`` in
``docs/semantics.md``.

* :func:`solve_coefficients` (:mod:`~ema_jax.posthoc.solver`, NumPy): the weights, from the
  profiles' closed-form inner products.
* :func:`synthesize` (:mod:`~ema_jax.posthoc.synthesis`): the synthesized params from
  snapshots in memory.
* :func:`snapshot_manager`, :func:`save_snapshot` (:mod:`~ema_jax.posthoc.snapshots`):
  snapshots written with a checkpoint manager into their own directory (next to the
  training checkpoint, never inside it), all kept.
* :func:`synthesize_from` (:mod:`~ema_jax.posthoc.streaming`): the same from that
  directory, in one pass for any number of widths, snapshot by snapshot, so memory stays
  at about two snapshots plus the outputs.
* ``python -m ema_jax.posthoc DIRECTORY --sigma-rel 0.08 --out PATH``
  (:mod:`ema_jax.posthoc.__main__`): an export that
  :func:`ema_jax.checkpoint.load_exported` reads.

Orbax is imported only with the names that read or write a directory (on first use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ema_jax.posthoc.solver import MAX_CONDITION, SIGMA_REL_GAMMA0, SIGMA_RELS, solve_coefficients
from ema_jax.posthoc.synthesis import synthesize

if TYPE_CHECKING:
    from ema_jax.posthoc.__main__ import main
    from ema_jax.posthoc.snapshots import ITEM, save_snapshot, snapshot_manager
    from ema_jax.posthoc.streaming import synthesize_from

_ON_FIRST_USE = {
    "ITEM": "snapshots",
    "save_snapshot": "snapshots",
    "snapshot_manager": "snapshots",
    "synthesize_from": "streaming",
    "main": "__main__",
}

__all__ = [
    "ITEM",
    "MAX_CONDITION",
    "SIGMA_RELS",
    "SIGMA_REL_GAMMA0",
    "main",
    "save_snapshot",
    "snapshot_manager",
    "solve_coefficients",
    "synthesize",
    "synthesize_from",
]


def __getattr__(name: str) -> Any:
    """The names that read or write a directory (they import Orbax) load on first use."""
    if name in _ON_FIRST_USE:
        module = importlib.import_module(f"ema_jax.posthoc.{_ON_FIRST_USE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'ema_jax.posthoc' has no attribute {name!r}")
