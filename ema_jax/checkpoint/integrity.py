"""What is checked before and after a read: live leaves, the saved tree against the target,
checksums of the arrays; and the errors that name what is wrong and where."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ema_jax import _checks

#: The key of ema_jax's entry in an Orbax item's custom metadata.
META_KEY = "ema_jax"
#: The key, in that entry, of the arrays' checksums.
CHECKSUMS = "checksums"


def check_alive(tree: Any, name: str) -> None:
    """A ``ValueError`` naming the first leaf whose buffer was deleted (donated)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and leaf.is_deleted():
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} was deleted (donated to a jitted step, "
                "e.g. make_train_step's): save the state that step returned, not its input"
            )


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """``Σ (2i+1)·u_i mod 2^32`` over the bits ``u`` of ``x`` (as uint32 words, ``i`` their
    position): any change confined to one element changes it (odd multipliers are
    invertible mod 2^32), and so does nearly every other change, swaps included. One
    integer reduction on the devices, whatever the sharding (the same on any mesh)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize < 4:
        unsigned = jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    words = words.ravel()
    odd = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
    return jnp.sum(words * odd, dtype=jnp.uint32)


@jax.jit
def _leaf_checksums(leaves: list[Any]) -> list[jax.Array]:
    return [_leaf_checksum(x) for x in leaves]


def checksums(tree: Any) -> dict[str, int]:
    """``{"a.b": checksum}`` for every leaf, in Orbax's flat key paths (a typed PRNG key's
    over its key data)."""
    flat = ocp.tree.to_flat_dict(tree)
    sums = jax.device_get(_leaf_checksums([_key_data(jnp.asarray(x)) for x in flat.values()]))
    return {".".join(k): int(c) for k, c in zip(flat, sums, strict=True)}


def _key_data(x: jax.Array) -> jax.Array:
    """Typed PRNG keys (NNX's RNG state) as their raw key data (what Orbax stores)."""
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def verify(tree: Any, saved: Any, where: str) -> None:
    """A ``ValueError`` naming the first leaf of ``tree`` whose checksum differs from the
    one written at save (nothing to check for artefacts written without one)."""
    if not saved:
        return
    for path, value in checksums(tree).items():
        if saved.get(path) != value:
            raise ValueError(
                f"{where} is corrupt: {path} does not match the checksum written at save "
                f"({saved.get(path)} saved, {value} read); its files were changed or damaged "
                "after writing. Restore an earlier step or re-export"
            )


def flat(tree: Any, prefix: str | None = None) -> dict[str, Any]:
    """``{"prefix.a.b": leaf}`` (``"a.b"`` without a prefix): Orbax's flattening, the key
    paths it writes, in ``jax.tree.leaves`` order; typed PRNG keys (NNX's RNG state) as the
    raw key data Orbax stores for them."""
    head = () if prefix is None else (prefix,)
    return {
        ".".join((*head, *key)): _as_stored(leaf)
        for key, leaf in ocp.tree.to_flat_dict(tree).items()
    }


def _as_stored(leaf: Any) -> Any:
    if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.eval_shape(jax.random.key_data, leaf)
    return leaf


def check_matches(item: str, saved_tree: Any, target: Any) -> None:
    """A ``ValueError`` naming the first path where ``target`` and the saved tree (Orbax's
    metadata) differ in paths, shapes or floating dtypes, before any array is read."""
    problem = _checks.first_difference(
        flat(target, item),
        flat(saved_tree, item),
        expected_name="target",
        got_name="checkpoint",
        compare_dtypes=True,
    )
    if problem is not None:
        raise ValueError(f"checkpoint does not match the target: {problem}")


def check_static(saved: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    """A ``ValueError`` when ema_jax's saved static metadata differs from the target's."""
    if saved is None:
        raise ValueError("checkpoint has no ema_jax metadata: was it written by ema_jax.save?")
    for name, value in expected.items():
        if saved.get(name) != value:
            raise ValueError(
                f"checkpoint does not match the target: ema_state.{name} is {saved.get(name)} "
                f"in the checkpoint, {value} in the target"
            )


def read_metadata(
    read: Callable[[], Any], where: str, item: str | None, earlier: list[int] | None
) -> Any:
    """``read()``, Orbax's metadata of ``item`` (``None``: a standalone artefact); a
    ``ValueError`` naming the checkpoint and the file when that file is missing, truncated
    or unreadable, and the latest of the ``earlier`` steps (``None``: not a step of a
    manager's directory)."""
    try:
        metadata = read()
        problem = None if getattr(metadata, "tree", None) is not None else "missing or empty"
    except FileNotFoundError:
        problem = "missing or empty"
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
        problem = f"unreadable: {type(e).__name__}: {e}"
    if problem is None:
        return metadata
    hint = (
        f"; an earlier step restores: step={max(earlier)} (saved: {sorted(earlier)})"
        if earlier
        else ("; no earlier step is saved" if earlier is not None else "")
    )
    file = "_METADATA" if item is None else f"{item}/_METADATA"
    raise ValueError(
        f"{where} is damaged: its {file} file (the tree of the saved arrays) is {problem}{hint}"
    )
