"""ema_jax.checkpoint: misuse is loud: a target that differs from the checkpoint, no
checkpoint, bad arguments, the wrong kind of directory, each named with the fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ckpt_worker as w
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ckpt_support import saved, small_state

import ema_jax
from ema_jax import checkpoint as ckpt
from ema_jax import posthoc


def other_params(change: str) -> Any:
    params = w.make_params()
    if change == "extra_layer":
        params["zz"] = {"b": jnp.zeros(2)}
    elif change == "missing_layer":
        del params["out"]
    elif change == "shape":
        params["hidden"]["b"] = jnp.zeros(17)
    return params


MISMATCHES = {
    "single decay vs two": (
        lambda: w.make_state(ema=ema_jax.ema(0.9)),
        r"state\.ema_state\.weight has shape \(2,\) in the checkpoint, \(\) in the target",
    ),
    "three decays vs two": (
        lambda: w.make_state(ema=ema_jax.ema((0.9, 0.99, 0.999))),
        r"state\.ema_state\.weight has shape \(2,\) in the checkpoint, \(3,\) in the target",
    ),
    "bf16 accumulators": (
        lambda: w.make_state(ema=ema_jax.ema((0.9, 0.9), accumulator_dtype=jnp.bfloat16)),
        r"state\.ema_state\.ema\.hidden\.b has dtype float32 in the checkpoint, "
        r"bfloat16 in the target",
    ),
    "bf16 params": (
        lambda: w.make_state(dtype=jnp.bfloat16),
        r"state\.params\.hidden\.b has dtype float32 in the checkpoint, bfloat16",
    ),
    "extra layer": (
        lambda: w.make_state(params=other_params("extra_layer")),
        r"state\.params\.zz\.b is in the target but not in the checkpoint",
    ),
    "missing layer": (
        lambda: w.make_state(params=other_params("missing_layer")),
        r"out\.b is in the checkpoint but not in the target",
    ),
    "leaf shape": (
        lambda: w.make_state(params=other_params("shape")),
        r"state\.params\.hidden\.b has shape \(16,\) in the checkpoint, \(17,\) in the target",
    ),
    "param_dtypes": (
        lambda: w.make_state().replace(
            ema_state=w.make_state().ema_state.replace(param_dtypes=(np.dtype("float16"),) * 4)
        ),
        r"ema_state\.param_dtypes is \['float32', 'float32', 'float32', 'float32'\] in the "
        r"checkpoint, \['float16'",
    ),
}


@pytest.mark.filterwarnings("ignore:accumulator_dtype=bfloat16 is narrower")
@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatched_target_is_loud(saved_dir: Path, case: str) -> None:
    make_target, message = MISMATCHES[case]
    target = make_target()
    with ckpt.manager(saved_dir) as mngr:
        with pytest.raises(ValueError, match=message):
            ckpt.restore(mngr, target)
        with pytest.raises(ValueError, match=message):
            ckpt.restore(mngr, jax.eval_shape(lambda: target))


PARAMS_MISMATCHES: dict[str, tuple[Callable[[Path, Any], Any], str]] = {
    "ema_params of another shape": (
        lambda d, trained: ckpt.load_ema_params(d, target=(other_params("shape"), w.make_params())),
        r"ema_params\.0\.hidden\.b has shape \(16,\)",
    ),
    "ema_params of another dtype": (
        lambda d, trained: ckpt.load_ema_params(
            d, target=jax.tree.map(jnp.bfloat16, trained.ema_params)
        ),
        r"ema_params\.0\.hidden\.b has dtype float32 in the c",
    ),
    "export with an extra layer": (
        lambda d, trained: ckpt.load_exported(d / "deploy", other_params("extra_layer")),
        r"params\.zz\.b is in the target but not",
    ),
}


@pytest.fixture(scope="module")
def exported_dir(saved_dir: Path, trained: Any) -> Path:
    """``saved_dir``, with ``trained``'s export in ``saved_dir / "deploy"``."""
    if not (saved_dir / "deploy").exists():
        ckpt.export_ema_params(saved_dir / "deploy", trained)
    return saved_dir


@pytest.mark.parametrize("case", list(PARAMS_MISMATCHES))
def test_mismatched_params_target_is_loud(exported_dir: Path, trained: Any, case: str) -> None:
    load, message = PARAMS_MISMATCHES[case]
    with pytest.raises(ValueError, match=message):
        load(exported_dir, trained)


NOTHING_THERE: dict[str, tuple[Callable[[Path], Any], str]] = {
    "restore from an empty directory": (
        lambda d: ckpt.restore(ckpt.manager(d / "empty", read_only=True), w.make_state()),
        "no checkpoint in",
    ),
    "load_ema_params of an empty directory": (
        lambda d: ckpt.load_ema_params(d / "empty"),
        "no checkpoint in",
    ),
    "load_ema_params of a step not saved": (
        lambda d: ckpt.load_ema_params(d / "empty", step=7),
        "step 7 is not in",
    ),
    "load_ema_params of no directory": (
        lambda d: ckpt.load_ema_params(d / "never_created"),
        "no checkpoint in",
    ),
    "load_exported of nothing": (
        lambda d: ckpt.load_exported(d / "nothing"),
        "no Orbax checkpoint at",
    ),
}


@pytest.mark.parametrize("case", list(NOTHING_THERE))
def test_no_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path, case: str) -> None:
    with ckpt.manager(tmp_path / "empty") as mngr:
        assert mngr.latest_step() is None
    load, message = NOTHING_THERE[case]
    with pytest.raises(FileNotFoundError, match=message):
        load(tmp_path)


BAD_ARGUMENTS: dict[str, tuple[Callable[[Path, Any], Any], type[Exception], str]] = {
    "max_to_keep 0": (
        lambda d, mngr: ckpt.manager(d / "other", max_to_keep=0),
        ValueError,
        "max_to_keep must be >= 1",
    ),
    "save_interval_steps not an int": (
        lambda d, mngr: ckpt.manager(d / "other", save_interval_steps=1.5),
        TypeError,
        "save_interval_steps must be an int",
    ),
    "async_save not a bool": (
        lambda d, mngr: ckpt.manager(d / "other", async_save="yes"),
        TypeError,
        "async_save must be a bool",
    ),
    "negative step": (
        lambda d, mngr: ckpt.save(mngr, -1, w.make_state()),
        ValueError,
        "step must be >= 0",
    ),
    "a dict for a state": (
        lambda d, mngr: ckpt.save(mngr, 0, {"params": 1}),
        TypeError,
        "state must be an EmaTrainState or an NNX object",
    ),
    "a string step": (
        lambda d, mngr: ckpt.restore(mngr, w.make_state(), step="last"),
        TypeError,
        "step must be an int >= 0",
    ),
    "a path for a manager": (
        lambda d, mngr: ckpt.restore(str(d), None),
        TypeError,
        r"mngr must be .*CheckpointManager.*got str",
    ),
    "ema_index past the averages": (
        lambda d, mngr: ckpt.deploy_params(w.make_state(), ema_index=2),
        ValueError,
        r"ema_index must be in \[0, 2\)",
    ),
    "ema_index past the averages, cast": (
        lambda d, mngr: ckpt.deploy_params(w.make_state(), dtype=jnp.float32, ema_index=5),
        ValueError,
        r"ema_index must be in \[0, 2\)",
    ),
    "an integer deploy dtype": (
        lambda d, mngr: ckpt.deploy_params(w.make_state(), dtype=jnp.int32),
        TypeError,
        "dtype must be a floating dtype",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_named(tmp_path: Path, case: str) -> None:
    call, error, message = BAD_ARGUMENTS[case]
    with ckpt.manager(tmp_path) as mngr, pytest.raises(error, match=message):
        call(tmp_path, mngr)


@pytest.fixture(scope="module")
def three_kinds(tmp_path_factory: Any) -> Path:
    """A training checkpoint ``ckpt``, an export ``export``, post-hoc ``snapshots``, and
    ``other``, a directory of something else."""
    root = tmp_path_factory.mktemp("kinds")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("not a checkpoint")
    saved(root / "ckpt", small_state(), step=1)
    ckpt.export_ema_params(root / "export", small_state())
    with posthoc.snapshot_manager(root / "snapshots", async_save=False) as mngr:
        posthoc.save_snapshot(mngr, 10, [small_state().params] * 2)
    return root  # type: ignore[no-any-return]


WRONG_KINDS: dict[str, tuple[Callable[[Path], Any], str]] = {
    "load_exported of a training checkpoint": (
        lambda d: ckpt.load_exported(d / "ckpt"),
        r"ckpt is a training checkpoint: .*load_ema_params\(.*; it is not an export",
    ),
    "load_exported of snapshots": (
        lambda d: ckpt.load_exported(d / "snapshots"),
        r"is a post-hoc snapshot directory: .*synthesize_from\(.*; it is not an export",
    ),
    "load_ema_params of an export": (
        lambda d: ckpt.load_ema_params(d / "export"),
        r"is an export .*load_exported\(.*; it is not a training checkpoint",
    ),
    "load_ema_params of snapshots": (
        lambda d: ckpt.load_ema_params(d / "snapshots"),
        r"is a post-hoc snapshot directory: .*; it is not a training checkpoint",
    ),
    "synthesize_from a training checkpoint": (
        lambda d: posthoc.synthesize_from(d / "ckpt", 0.1),
        r"is a training checkpoint: .*; it is not a post-hoc snapshot directory",
    ),
    "synthesize_from an export": (
        lambda d: posthoc.synthesize_from(d / "export", 0.1),
        r"is an export .*; it is not a post-hoc snapshot directory",
    ),
    "load_exported of a step of a training checkpoint": (
        lambda d: ckpt.load_exported(d / "ckpt" / "1"),
        r"ckpt/1 is step 1 of .*ckpt, which is a training checkpoint: .*load_ema_params\(.*"
        r"step=1 picks this step.*; it is not an export",
    ),
    "load_ema_params of a step of a training checkpoint": (
        lambda d: ckpt.load_ema_params(d / "ckpt" / "1"),
        r"is step 1 of .*, which is a training checkpoint: .*; it is not a training checkpoint",
    ),
}


NOT_EMA_JAX: dict[str, Callable[[Path], Any]] = {
    "load_exported": lambda d: ckpt.load_exported(d / "other"),
    "load_ema_params": lambda d: ckpt.load_ema_params(d / "other"),
    "synthesize_from": lambda d: posthoc.synthesize_from(d / "other", 0.1),
}


@pytest.mark.parametrize("reader", list(NOT_EMA_JAX))
def test_a_directory_of_something_else_is_named_no_ema_jax_directory(
    three_kinds: Path, reader: str
) -> None:
    """Nothing the reader wants is there (``FileNotFoundError``, as for an empty
    directory), and the error says why: it holds something else, check the path."""
    with pytest.raises(
        FileNotFoundError, match=r"other: it is not an ema_jax directory: it holds no export, "
        r"no training checkpoint and no post-hoc snapshots .*check the path$"
    ) as caught:  # fmt: skip
        NOT_EMA_JAX[reader](three_kinds)
    assert "damaged" not in str(caught.value)


def test_restore_from_an_export_says_what_it_is(three_kinds: Path) -> None:
    with (
        ckpt.manager(three_kinds / "export", read_only=True) as mngr,
        pytest.raises(FileNotFoundError, match=r"no checkpoint in .*export: it is an export .*"
                      r"load_exported\("),
    ):  # fmt: skip
        ckpt.restore(mngr, small_state())


@pytest.mark.parametrize("case", list(WRONG_KINDS))
def test_wrong_kind_of_directory_says_what_it_is_and_what_reads_it(
    three_kinds: Path, case: str
) -> None:
    read, message = WRONG_KINDS[case]
    with pytest.raises(ValueError, match=message) as caught:
        read(three_kinds)
    assert "damaged" not in str(caught.value) and "_METADATA" not in str(caught.value)
