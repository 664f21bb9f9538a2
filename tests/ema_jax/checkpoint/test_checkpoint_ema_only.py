"""ema_jax.checkpoint: the EMA weights alone: ``load_ema_params`` reads only the
``ema_params`` item (the latest, a chosen or the best step), exports hold one average."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import ckpt_worker as w
import jax.numpy as jnp
import numpy as np
import pytest
from ckpt_support import assert_trees_bitwise, disk_bytes, saved, small_state

import ema_jax
from ema_jax import checkpoint as ckpt


def test_load_ema_params_reads_only_the_ema_item(tmp_path: Path, capsys: Any) -> None:
    # An Adam-trained model big enough for array bytes to dominate the metadata.
    state = w.train(w.make_state(extra=65536, ema=ema_jax.ema(0.999)), 0, 2)
    saved(tmp_path, state, step=2)
    step_dir = tmp_path / "2"
    total, ema_bytes = disk_bytes(step_dir), disk_bytes(step_dir / ckpt.EMA_PARAMS)
    ratio = ema_bytes / total
    with capsys.disabled():
        print(
            f"\n[checkpoint size] step dir {total} B, ema_params item {ema_bytes} B "
            f"= {100 * ratio:.1f}% (Adam, {ckpt.STATE} item {disk_bytes(step_dir / 'state')} B)"
        )
    assert ratio <= 0.40

    # Corrupt every file of the "state" item: only "ema_params" may be read.
    for f in (step_dir / ckpt.STATE).rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with ckpt.manager(tmp_path) as mngr, pytest.raises(Exception):  # noqa: B017
        ckpt.restore(mngr, state)  # the corruption is real
    for target in (None, state.ema_params):
        loaded = ckpt.load_ema_params(tmp_path, target=target)
        assert_trees_bitwise(state.ema_params, loaded)
    assert_trees_bitwise(state.ema_params, ckpt.load_ema_params(tmp_path, step=2))


def test_load_ema_params_multi_decay_tree(tmp_path: Path, trained: Any) -> None:
    saved(tmp_path, trained)
    assert_trees_bitwise(
        trained.ema_params, ckpt.load_ema_params(tmp_path, trained.ema_params, step=3)
    )
    # Without a target the tree is Orbax's: the K-tuple comes back as a list.
    loaded = ckpt.load_ema_params(tmp_path)
    assert isinstance(loaded, list)
    assert_trees_bitwise(trained.ema_params, tuple(loaded))


def test_load_ema_params_takes_the_target_second_like_load_exported(
    tmp_path: Path, trained: Any
) -> None:
    """``(where, target, step)``, as ``load_exported(path, target)`` and ``restore(mngr,
    target, step)``: no warning."""
    saved(tmp_path, trained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = ckpt.load_ema_params(tmp_path, trained.ema_params, 3)
    assert_trees_bitwise(trained.ema_params, loaded)


@pytest.mark.parametrize("with_target", [True, False], ids=["step, target", "step alone"])
def test_load_ema_params_in_the_earlier_order_warns_and_loads(
    tmp_path: Path, trained: Any, with_target: bool
) -> None:
    """The order of earlier versions, a step second, still loads, with a
    ``DeprecationWarning`` naming the new order."""
    saved(tmp_path, trained)
    args = (3, trained.ema_params) if with_target else (3,)
    with pytest.warns(DeprecationWarning, match=r"load_ema_params\(directory, target, step"):
        loaded = ckpt.load_ema_params(tmp_path, *args)
    assert_trees_bitwise(trained.ema_params, loaded if with_target else tuple(loaded))


def test_export_picks_one_average(tmp_path: Path, trained: Any) -> None:
    ckpt.export_ema_params(tmp_path / "second", trained, ema_index=1)
    assert_trees_bitwise(trained.ema_params[1], ckpt.load_exported(tmp_path / "second"))
    assert_trees_bitwise(trained.ema_params[0], ckpt.deploy_params(trained))


def test_export_into_an_existing_path_says_force(tmp_path: Path) -> None:
    ckpt.export_ema_params(tmp_path / "export", small_state())
    with pytest.raises(ValueError, match="already exists: pass force=True"):
        ckpt.export_ema_params(tmp_path / "export", small_state())
    ckpt.export_ema_params(tmp_path / "export", small_state(1.0), force=True)
    np.testing.assert_array_equal(ckpt.load_exported(tmp_path / "export")["b"], np.ones(3))


def test_deploy_params_index_none_is_the_first_average(trained: Any) -> None:
    """``ema_index=None`` is the first average, for one decay and for several, with and
    without a cast."""
    one = small_state()
    assert_trees_bitwise(one.ema_params, ckpt.deploy_params(one, ema_index=None))
    assert_trees_bitwise(one.ema_params, ckpt.deploy_params(one, ema_index=0))
    assert_trees_bitwise(
        trained.accumulators(0), ckpt.deploy_params(trained, dtype=jnp.float32, ema_index=None)
    )


def test_best_step_is_read_without_orbax_warnings(tmp_path: Path, caplog: Any) -> None:
    """Loading the best step of a writable directory logs no ``Given directory is read
    only`` (nor any other warning): the ranking reads the steps' metrics, opens no
    read-only manager."""
    with ckpt.manager(tmp_path, best_metric="val", async_save=False) as mngr:
        for step, val in ((1, 0.3), (2, 0.1), (3, 0.2)):
            ckpt.save(mngr, step, small_state(step), metrics={"val": val})
    with caplog.at_level(logging.WARNING):
        best = ckpt.load_ema_params(tmp_path, step="best")
    np.testing.assert_array_equal(best["b"], np.full(3, 2.0))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
