"""Deployment: the EMA weights alone, as a standalone Orbax item that needs no EMA code."""

from __future__ import annotations

import os
from typing import Any

from ema_jax import _checks
from ema_jax.checkpoint import adapters, integrity, items, layout
from ema_jax.transform import Params


def deploy_params(state: Any, *, dtype: Any = None, ema_index: int | None = None) -> Params:
    """The params-shaped tree that :func:`export_ema_params` writes.

    ``dtype=None``: the shadow (the params' dtypes). Otherwise the floating leaves are
    cast to ``dtype`` straight from the accumulators, so ``dtype=jnp.float32`` keeps the
    full fp32 average of bf16 params (complex leaves keep their dtype). ``ema_index`` picks
    one of several decays (``None``: the first, as everywhere). For an NNX training state
    (see :func:`~ema_jax.checkpoint.save`): the averaged Variables' values as a pure dict
    (``nnx.to_pure_dict``).
    """
    return adapters.deploy(adapters.adapt(state), dtype, ema_index)


def export_ema_params(
    path: str | os.PathLike[str],
    state: Any,
    *,
    dtype: Any = None,
    ema_index: int | None = None,
    force: bool = False,
) -> None:
    """Writes the EMA weights alone, as a standalone Orbax checkpoint at ``path``.

    The artefact is a params-shaped tree (see :func:`deploy_params` for ``dtype`` and
    ``ema_index``), with no optimizer or EMA state: load it with :func:`load_exported` (or
    any Orbax ``StandardCheckpointer``). Blocks until written; ``force=True`` overwrites an
    existing ``path`` (else ``ValueError``), atomically as :func:`export_params`. A
    checksum of the arrays is written with them and verified by :func:`load_exported`. In
    multi-process training every process calls this.
    """
    adapter = adapters.adapt(state)
    integrity.check_alive(adapter.arrays, "state")
    export_params(path, adapters.deploy(adapter, dtype, ema_index), force=force)


def export_params(path: str | os.PathLike[str], params: Params, *, force: bool = False) -> None:
    """Writes a params tree as the standalone artefact :func:`load_exported` reads (what
    :func:`export_ema_params` writes; e.g. a synthesized post-hoc EMA), with a checksum of
    its arrays that :func:`load_exported` verifies. Blocks until written; ``force=True``
    overwrites an existing ``path`` (else ``ValueError``).

    Atomic: the new artefact is written beside ``path`` and swapped in once complete, so
    the old one stays readable until then; a kill at any moment (``kill -9`` included)
    leaves the old artefact or the new one. The one export routine: ``export_ema_params``
    and the post-hoc command line's ``--out ... --force`` write through it."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not _checks.flag("force", force):
        raise ValueError(f"{path} already exists: pass force=True to overwrite it")
    integrity.check_alive(params, "params")
    items.write(path, params, force=force)


def load_exported(path: str | os.PathLike[str], target: Params | None = None) -> Params:
    """The params written by :func:`export_ema_params`. For NNX, ``target`` may be an
    ``nnx.State`` (e.g. ``nnx.state(nnx.eval_shape(make_model), nnx.Param)``): the result is
    that State with the exported values (``nnx.update(model, it)`` or ``nnx.merge``).

    ``target`` as in :func:`~ema_jax.checkpoint.load_ema_params`; a target whose paths,
    shapes or floating dtypes differ from the artefact raises ``ValueError`` naming the
    first differing path. A training checkpoint or a post-hoc snapshot directory raises
    ``ValueError`` naming what it is and what reads it.
    """
    path = layout.expect(path, layout.EXPORT, "no Orbax checkpoint at")
    return items.read_params(path, target)
