"""What is checked before and after a read: live leaves, the saved tree against the target,
checksums of the arrays; and the errors that name what is wrong and where."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ema_jax import _checks

#: The key of ema_jax's entry in an Orbax item's custom metadata.
META_KEY = "ema_jax"
#: The key, in that entry, of the arrays' checksums.
CHECKSUMS = "checksums"


def check_alive(tree: Any, name: str) -> None:
    """A ``ValueError`` naming the first leaf whose buffer was deleted (donated)."""
    deleted = _checks.deleted_leaf(tree)
    if deleted is not None:
        raise ValueError(
            f"{name}{deleted} was deleted (donated to a jitted step, e.g. make_train_step's): "
            "save the state that step returned, not its input"
        )


#: The key, in that entry, of the checksum function's name (absent: :data:`WORD_SUM`).
CHECKSUM_KIND = "checksum_kind"
#: ``Σ (2i+1)·u_i mod 2^32``, what ema_jax 0.1.0 wrote: misses some two-element changes
#: (negating two weights). Verified on old artefacts, never written.
WORD_SUM = "word-sum-2^32"
#: The exact sum and position-weighted sum of the words of each word plane: detects every
#: change of one or two elements. What ema_jax writes.
MOMENTS = "word-moments"


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as 32-bit words: ``(*x.shape, k)``, ``k`` the words of one element
    (1 up to 32 bits, 2 for complex64 and 64-bit types, 4 for complex128); narrower
    elements zero-extended. No axis of ``x`` is reshaped, so a sharded leaf (explicit mesh
    axes included) keeps its layout."""
    x = jnp.asarray(x)
    shape = x.shape
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize < 4:
        unsigned = jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    k = math.prod(words.shape[len(shape) :])
    return words.reshape(*shape, k)  # only the word axes (never sharded) are merged


def _flat_index(shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """The row-major position of every element of an array of ``shape``, without a reshape."""
    index = jnp.zeros(shape, dtype)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(dtype, shape, axis) * jnp.asarray(stride, dtype)
        stride *= shape[axis]
    return index


def _word_sum(x: jax.Array) -> jax.Array:
    """:data:`WORD_SUM`: ``Σ (2i+1)·u_i mod 2^32`` over the words ``u`` in order."""
    words = _words(x)
    odd = 2 * _flat_index(words.shape, jnp.uint32) + 1
    return jnp.sum(words * odd, dtype=jnp.uint32)


def _moments(x: jax.Array) -> jax.Array:
    """:data:`MOMENTS`, for each word plane ``j`` (the ``j``-th word of every element): the
    exact integers ``A_j = Σ u_ij`` and ``B_j = Σ (i+1)·u_ij``, ``i`` the element's
    row-major position, returned as ``[A, low, high]`` with ``B = high·2^32 + low`` (each a
    uint64 sum that cannot overflow for fewer than ``2^32`` elements).

    A change of one or two elements changes some plane in at most two rows ``i != l``, by
    ``d_i, d_l`` not both zero. Unchanged ``A`` and ``B`` would need ``d_i + d_l = 0`` and
    ``(i+1)·d_i + (l+1)·d_l = 0``, so ``(i-l)·d_i = 0``: impossible. Needs 64-bit
    integers: run under ``jax.enable_x64``."""
    words = _words(x)
    position = _flat_index(words.shape[:-1], jnp.uint64) + jnp.uint64(1)
    return jnp.stack(
        [_plane_moments(words[..., j], position) for j in range(words.shape[-1])]
    ).reshape(-1, 3)


def _plane_moments(words: jax.Array, position: jax.Array) -> jax.Array:
    """``[A, low, high]`` of one word plane, in one pass: a single variadic reduction, so
    nothing the size of the leaf is materialized (three ``jnp.sum`` calls would keep the
    64-bit products in memory, and run 40 times slower on CPU)."""
    u = words.astype(jnp.uint64)
    weighted = u * position  # < 2^64: factors < 2^32
    zero = jnp.uint64(0)
    sums = jax.lax.reduce(
        (u, weighted & jnp.uint64(0xFFFFFFFF), weighted >> jnp.uint64(32)),
        (zero, zero, zero),
        lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]),
        tuple(range(u.ndim)),
    )
    return jnp.stack(sums)


_KINDS: dict[str, Callable[[jax.Array], jax.Array]] = {
    WORD_SUM: _word_sum,
    MOMENTS: _moments,
}


@functools.partial(jax.jit, static_argnames="kind")
def _leaf_checksums(leaves: list[Any], kind: str) -> list[jax.Array]:
    return [_KINDS[kind](x) for x in leaves]


def _as_int(sums: np.ndarray, kind: str) -> int:
    """One integer per leaf: the word-sum itself, or every plane's ``A`` and ``B`` as the
    digits of one number (equal exactly when every ``A`` and ``B`` is equal)."""
    if kind == WORD_SUM:
        return int(sums)
    value = 0
    for a, low, high in np.asarray(sums, dtype=np.uint64).reshape(-1, 3).tolist():
        value = (value << 160) | ((high << 32) + low) << 64 | a  # A < 2^64, B < 2^96
    return value


def checksums(tree: Any, kind: str = MOMENTS) -> dict[str, int]:
    """``{"a.b": checksum}`` for every leaf, in Orbax's flat key paths (a typed PRNG key's
    over its key data); ``kind`` one of :data:`MOMENTS` (written) and :data:`WORD_SUM`
    (0.1.0's, for verifying)."""
    flat = ocp.tree.to_flat_dict(tree)
    with jax.enable_x64(kind == MOMENTS):
        leaves = [_key_data(jnp.asarray(x)) for x in flat.values()]
        sums = jax.device_get(_leaf_checksums(leaves, kind))
    return {".".join(k): _as_int(c, kind) for k, c in zip(flat, sums, strict=True)}


def _key_data(x: jax.Array) -> jax.Array:
    """Typed PRNG keys (NNX's RNG state) as their raw key data (what Orbax stores)."""
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def checksum_entry(tree: Any) -> dict[str, Any]:
    """What an item's ema_jax metadata holds to verify ``tree``: its checksums and their
    kind."""
    return {CHECKSUMS: checksums(tree), CHECKSUM_KIND: MOMENTS}


def verify(tree: Any, entry: Any, where: str) -> None:
    """A ``ValueError`` naming the first leaf of ``tree`` whose checksum differs from the
    one written at save (``entry``: the item's ema_jax metadata; nothing to check for
    artefacts written without checksums). Checksums of 0.1.0 are verified with its
    function."""
    saved = (entry or {}).get(CHECKSUMS)
    if not saved:
        return
    for path, value in checksums(tree, entry.get(CHECKSUM_KIND, WORD_SUM)).items():
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
    file = "_METADATA" if item is None else f"{item}/_METADATA"
    what = f"its {file} file (the tree of the saved arrays) is"
    try:
        metadata = read()
    except FileNotFoundError as e:
        raise damaged(where, f"{what} missing or empty", earlier) from e
    except Exception as e:  # Orbax's and TensorStore's errors, whatever their type
        raise damaged(where, f"{what} unreadable: {first_line(e)}", earlier) from e
    if getattr(metadata, "tree", None) is None:
        raise damaged(where, f"{what} missing or empty", earlier)
    return metadata


def damaged(where: str, problem: str, earlier: list[int] | None) -> ValueError:
    """The error of a damaged artefact: what is wrong, and what restores instead (the
    latest of the ``earlier`` steps; ``None``: not a step of a manager's directory). The
    caller raises it ``from`` the original error."""
    hint = (
        f"; an earlier step restores: step={max(earlier)} (saved: {sorted(earlier)})"
        if earlier
        else ("; no earlier step is saved" if earlier is not None else "")
    )
    return ValueError(f"{where} is damaged: {problem}{hint}")


def first_line(error: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 300 characters, TensorStore's spec
    dropped), for an error of Orbax or TensorStore, whose messages can run to pages."""
    line = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {line[:300]}{'...' if len(line) > 300 else ''}"
