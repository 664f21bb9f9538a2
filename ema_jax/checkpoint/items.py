"""One Orbax item, written and read the one way ema_jax does it.

:func:`save_args` is what every item is written with (a training step's two items, a
post-hoc snapshot, an export): the arrays with ema_jax's metadata and their checksums.
:func:`read` is the one read: the item's metadata, the check against the target (before any
array is read), the restore onto the target's placement, the checksums verified after. It
serves :func:`~ema_jax.checkpoint.restore`, :func:`~ema_jax.checkpoint.load_ema_params`,
:func:`~ema_jax.checkpoint.load_exported` and post-hoc synthesis.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ema_jax.checkpoint import atomic, integrity


def save_args(
    tree: Any,
    custom_metadata: Mapping[str, Any] | None = None,
    *,
    checksum: bool = True,
    compress: bool = True,
) -> ocp.args.StandardSave | ocp.args.PyTreeSave:
    """Orbax's save arguments of ``tree`` as one item, with ``custom_metadata`` and (with
    ``checksum``) the checksum of every array in ema_jax's entry of it; for the
    :func:`handler` of the same ``compress``."""
    custom = dict(custom_metadata or {})
    if checksum:
        entry = {**custom.get(integrity.META_KEY, {}), **integrity.checksum_entry(tree)}
        custom[integrity.META_KEY] = entry
    if compress:
        return ocp.args.StandardSave(tree, custom_metadata=custom)
    return ocp.args.PyTreeSave(tree, custom_metadata=custom)


def handler(*, compress: bool = True) -> ocp.handlers.CheckpointHandler:
    """The Orbax handler writing an item's arrays: zstd-compressed (Orbax's standard
    handler), or, without ``compress``, stored as they are (its PyTree handler), so that
    reading them back costs a copy rather than a decompression (float32 weights are ~10%
    larger on disk). Either kind is read the same way (:func:`read`): the codec is in each
    array's metadata."""
    if compress:
        return ocp.StandardCheckpointHandler()
    return ocp.PyTreeCheckpointHandler(use_compression=False)


def write(path: str, tree: Any, *, force: bool = False) -> None:
    """Writes ``tree`` as the standalone item at ``path`` (blocking), with its checksums;
    ``force`` replaces an existing one.

    Atomic: the item is written to a hidden sibling (:func:`atomic.staged`) and only then
    put at ``path`` (:func:`atomic.replace`), so an existing artefact stays until the new
    one is complete, whatever kills the write. In multi-process runs every process calls
    this; process 0 commits.
    """
    if os.path.lexists(path) and not force:
        raise ValueError(f"{path} already exists: pass force=True to overwrite it")
    new = atomic.staged(path, "new")
    if jax.process_index() == 0:
        atomic.clear(path)
    ocp.multihost.sync_global_processes("ema_jax.checkpoint.items.write:clear")
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        checkpointer.save(new, args=save_args(tree))
    if jax.process_index() == 0:
        atomic.replace(new, path)
    ocp.multihost.sync_global_processes("ema_jax.checkpoint.items.write:commit")


def metadata(
    path: str, where: str | None = None, item: str | None = None, earlier: list[int] | None = None
) -> Any:
    """Orbax's metadata of the item at ``path`` (its saved tree and custom metadata), or a
    ``ValueError`` naming the damaged file (see :func:`integrity.read_metadata`)."""
    handler = ocp.StandardCheckpointHandler()
    return integrity.read_metadata(
        lambda: handler.metadata(epath.Path(path)), path if where is None else where, item, earlier
    )


def custom(saved: Any, key: str = integrity.META_KEY) -> Any:
    """The entry ``key`` of an item's custom metadata (``None`` when it has none)."""
    return (saved.custom_metadata or {}).get(key)


def fallback() -> jax.sharding.Sharding:
    """Where leaves without a sharding go when the devices they were saved from are gone."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def local_target(saved_tree: Any) -> Any:
    """Abstract arrays for every saved leaf, on this process's first device."""
    sharding = fallback()
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), saved_tree
    )


def read(
    path: str,
    target: Any,
    item: str | None = None,
    *,
    where: str | None = None,
    earlier: list[int] | None = None,
    static: Mapping[str, Any] | None = None,
    saved: Any = None,
    checkpointer: ocp.Checkpointer | None = None,
) -> Any:
    """The item at ``path``, checked against ``target`` first, its checksums verified after.

    Args:
      path: the item's directory.
      target: arrays or ``jax.ShapeDtypeStruct`` leaves giving the tree, the dtypes and
        where each leaf lands; ``None``: the saved tree on this process's first device.
      item: the item's name in a step (``None``: a standalone artefact), for the errors.
      where: the step, for the errors (``"step 3 in DIR"``; default ``path``).
      earlier: the steps before it, for the error of a damaged one.
      static: ema_jax's static metadata the item must hold (e.g. the params' dtypes).
      saved: the item's metadata when the caller read it already (:func:`metadata`).
      checkpointer: an open ``ocp.Checkpointer(ocp.StandardCheckpointHandler())`` to read
        with (one for many reads saves its setup on each); ``None``: one for this read.

    Raises:
      ValueError: the item is damaged, differs from ``target`` (first differing path
        named) or is corrupt (the leaf whose checksum differs named).
    """
    try:
        return _read(path, target, item, where, earlier, static, saved, checkpointer)
    except Exception as e:
        if os.path.isdir(path):
            raise
        raise FileNotFoundError(
            f"{path if where is None else where} was deleted while it was read: its writer "
            "pruned it (max_to_keep) or replaced it. Read the newest step (a read_only "
            "manager's latest_step() re-reads the directory)"
        ) from e


def _read(
    path: str,
    target: Any,
    item: str | None,
    where: str | None,
    earlier: list[int] | None,
    static: Mapping[str, Any] | None,
    saved: Any,
    checkpointer: ocp.Checkpointer | None,
) -> Any:
    if saved is None:
        saved = metadata(path, where, item, earlier)
    if target is None:
        target = local_target(saved.tree)
    else:
        integrity.check_matches("params" if item is None else item, saved.tree, target)
    entry = custom(saved)
    if static is not None:
        integrity.check_static(entry, dict(static))
    placed, loose = _placement(target, saved.tree)
    args = ocp.args.StandardRestore(placed, strict=True, fallback_sharding=fallback())
    whole = path if where is None else where if item is None else f"the {item} item of {where}"
    try:
        if checkpointer is None:
            with reader() as checkpointer:
                restored = checkpointer.restore(path, args=args)
        else:
            restored = checkpointer.restore(path, args=args)
    except Exception as e:
        raise integrity.damaged(
            path if where is None else where,
            f"its {item or 'arrays'} could not be read ({integrity.first_line(e)})",
            earlier,
        ) from e
    if loose:  # read to the host: put where a freshly created array goes
        restored = jax.tree.map(lambda x, t: jax.device_put(x) if t else x, restored, loose)
    integrity.verify(restored, entry, whole)
    return restored


def reader() -> ocp.Checkpointer:
    """A checkpointer reading items (:func:`read`), compressed or not; close it after."""
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _placement(target: Any, saved_tree: Any) -> tuple[Any, Any]:
    """What Orbax restores each leaf as, and which leaves are *loose*: the target gives no
    placement (an uncommitted array, a ``ShapeDtypeStruct`` without sharding) and the leaf
    was saved from one device. Loose leaves are read to the host and put on the default
    device uncommitted, like the arrays of a freshly created state, so a jitted step
    compiled for one is not compiled again for the restored state."""
    saved = ocp.tree.to_flat_dict(saved_tree)
    flat = ocp.tree.to_flat_dict(target)
    placed, loose = [], []
    for key, leaf in flat.items():
        is_loose = (
            (isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None)
            or (isinstance(leaf, jax.Array) and not leaf.committed)
        ) and (
            not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            and isinstance(
                getattr(saved.get(key), "sharding", None),
                (ocp.metadata.SingleDeviceShardingMetadata, type(None)),
            )
        )
        placed.append(np.empty(leaf.shape, leaf.dtype) if is_loose else leaf)
        loose.append(is_loose)
    treedef = jax.tree.structure(target)
    if not any(loose):
        return target, None
    return jax.tree.unflatten(treedef, placed), jax.tree.unflatten(treedef, loose)


def read_params(
    path: str,
    target: Any,
    item: str | None = None,
    *,
    where: str | None = None,
    earlier: list[int] | None = None,
) -> Any:
    """:func:`read` of an item holding a params tree (pure dicts: an export, the
    ``ema_params`` item); an ``nnx.State`` target comes back as that State holding the saved
    values (new Variables: the target is not changed)."""
    from flax import nnx

    if not isinstance(target, nnx.State):
        return read(path, target, item, where=where, earlier=earlier)
    values = read(path, nnx.to_pure_dict(target), item, where=where, earlier=earlier)
    filled = jax.tree.map(lambda x: x, target)
    nnx.replace_by_pure_dict(filled, values)
    return filled
