"""ema_jax.checkpoint: the life of a run in a directory: reopened, resumed after a crash,
gone back, overwritten, closed, lost to an exception; best-N directories; the compiled
step reused after a restore."""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path
from typing import Any

import ckpt_worker as w
import jax
import numpy as np
import pytest
from ckpt_support import small_state

from ema_jax import checkpoint as ckpt


def saved_bs(mngr: Any) -> list[float]:
    """The ``b`` value (the seed ``small_state`` was made with) of every step on disk."""
    return [
        float(ckpt.restore(mngr, small_state(), step=s).params["b"][0]) for s in mngr.all_steps()
    ]


# Best-N directories ------------------------------------------------------------------


def test_a_reopened_best_n_run_keeps_its_steps_and_resumes_from_the_latest(
    tmp_path: Path,
) -> None:
    """Run 1 saves steps 1-3 (step 3 the worst) and crashes. Reopened with the same
    ``best_metric``, the latest step is still there, ``restore`` resumes from it, and the
    next save deletes nothing the policy keeps: the best two and the latest."""
    losses = {1: 0.2, 2: 0.1, 3: 0.9}
    with ckpt.manager(tmp_path, best_metric="loss", max_to_keep=2, async_save=False) as m:
        for step, loss in losses.items():
            ckpt.save(m, step, small_state(step), metrics={"loss": loss})
        assert m.all_steps() == [1, 2, 3]
    with ckpt.manager(tmp_path, best_metric="loss", max_to_keep=2, async_save=False) as m:
        assert m.all_steps() == [1, 2, 3]
        resumed = ckpt.restore(m, small_state())
        np.testing.assert_array_equal(resumed.params["b"], np.full(3, 3.0))  # not step 2
        assert ckpt.save(m, 4, small_state(4.0), metrics={"loss": 0.5})
        assert m.all_steps() == [1, 2, 4]  # the best two, and the latest
    assert ckpt.load_ema_params(tmp_path, step="best")["b"][0] == 2.0


UNRANKED = {
    "saved without best_metric": (None, r"\{1: 'none', 2: 'none'\}"),
    "saved with another best_metric": ("acc", r"\{1: \['acc'\], 2: \['acc'\]\}"),
}


@pytest.mark.parametrize("case", list(UNRANKED))
def test_a_best_n_manager_refuses_steps_it_cannot_rank(tmp_path: Path, case: str) -> None:
    """Steps without the manager's metric would be deleted at its first save (the step
    just restored included) or break the ranking: opening refuses, naming the steps and
    the fix, and deletes nothing."""
    other, listed = UNRANKED[case]
    metrics = None if other is None else {"acc": 0.5}
    with ckpt.manager(tmp_path, async_save=False, best_metric=other) as m:
        for step in (1, 2):
            ckpt.save(m, step, small_state(step), metrics=metrics)
    with pytest.raises(ValueError, match=rf"without the metric 'loss' .*{listed}.*new directory"):
        ckpt.manager(tmp_path, best_metric="loss", max_to_keep=1)
    with ckpt.manager(tmp_path, read_only=True) as m:
        assert m.all_steps() == [1, 2]
    ckpt.manager(tmp_path).close()  # the refused manager took no lock


# Saving: checked first, no silent rewrite --------------------------------------------


def test_saving_a_step_already_saved_after_going_back_is_refused(tmp_path: Path) -> None:
    """After ``restore(step=1)`` of steps 1-3, saving step 3 itself is refused (the
    abandoned run's step 3 would stay); ``overwrite=True`` replaces it. Saving again the
    step this manager just saved or restored is a no-op (``False``)."""
    with ckpt.manager(tmp_path, async_save=False) as mngr:
        for step in (1, 2, 3):
            ckpt.save(mngr, step, small_state(step))
        assert not ckpt.save(mngr, 3, small_state(3.0))  # this run's step 3, saved
        ckpt.restore(mngr, small_state(), step=1)
        with pytest.raises(ValueError, match=r"cannot save step 3 .*steps \[3\] are saved"):
            ckpt.save(mngr, 3, small_state(30.0))
        assert ckpt.save(mngr, 3, small_state(30.0), overwrite=True)
        assert mngr.all_steps() == [1, 2, 3] and saved_bs(mngr) == [1.0, 2.0, 30.0]
    with (
        ckpt.manager(tmp_path, async_save=False) as mngr,  # another run, nothing restored
        pytest.raises(ValueError, match=r"steps \[3\] are saved already"),
    ):
        ckpt.save(mngr, 3, small_state(300.0))


OVERWRITES_THAT_FAIL = {
    "a step not due": (dict(save_interval_steps=2), 3, {}, None),
    "force not a bool": ({}, 2, dict(force="yes"), (TypeError, "force must be a bool")),
    "a metric that is no number": (
        {}, 2, dict(metrics={"loss": "low"}), (TypeError, r"metrics\['loss'\] must be a number")
    ),
    "the best metric missing": (
        dict(best_metric="loss"), 2, dict(metrics={"acc": 1.0}), (ValueError, "no 'loss'")
    ),
    "metrics without a best metric": (
        {}, 2, dict(metrics={"loss": 1.0}), (ValueError, "would not be recorded")
    ),
    "a deleted state": ({}, 2, dict(state="deleted"), (ValueError, "was deleted")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OVERWRITES_THAT_FAIL))
def test_an_overwrite_that_cannot_save_deletes_nothing(tmp_path: Path, case: str) -> None:
    """``save(..., overwrite=True)`` checks everything (and whether the step is due)
    before it deletes the later steps."""
    options, step, kwargs, error = OVERWRITES_THAT_FAIL[case]
    metrics = {"loss": 1.0} if "best_metric" in options else None
    with ckpt.manager(tmp_path, async_save=False, **options) as mngr:
        for s in (2, 4, 6):
            ckpt.save(mngr, s, small_state(s), metrics=metrics)
        ckpt.restore(mngr, small_state(), step=2)
        state = small_state(9.0)
        if kwargs.pop("state", None) == "deleted":
            jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else x, state)
        kwargs.setdefault("metrics", metrics)
        if error is None:
            assert not ckpt.save(mngr, step, state, overwrite=True, **kwargs)
        else:
            with pytest.raises(error[0], match=error[1]):
                ckpt.save(mngr, step, state, overwrite=True, **kwargs)
        assert mngr.all_steps() == [2, 4, 6]


def test_a_closed_manager_refuses_to_save(tmp_path: Path) -> None:
    mngr = ckpt.manager(tmp_path, async_save=False)
    ckpt.save(mngr, 1, small_state())
    mngr.close()
    with pytest.raises(ValueError, match=r"is closed: open a new one, manager\("):
        ckpt.save(mngr, 2, small_state())
    with ckpt.manager(tmp_path) as again:  # nothing written, and the directory is free
        assert again.all_steps() == [1]


# The writer lock goes with its manager ------------------------------------------------


def test_a_manager_lost_to_an_exception_releases_the_directory(tmp_path: Path) -> None:
    """A writer that is garbage-collected unclosed (a cell that raised, in a notebook)
    finishes its save and releases the lock; ``with`` releases it too."""

    def train_and_fail() -> None:
        mngr = ckpt.manager(tmp_path)
        ckpt.save(mngr, 1, small_state(1.0))
        raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        train_and_fail()
    gc.collect()
    with ckpt.manager(tmp_path) as mngr:  # no "already open for writing"
        assert mngr.all_steps() == [1]
        with pytest.raises(RuntimeError, match="already open for writing"):
            ckpt.manager(tmp_path)
    ckpt.manager(tmp_path).close()


# A restored state reuses the compiled step --------------------------------------------


@pytest.mark.parametrize("target", ["abstract", "concrete"])
def test_a_restored_state_reuses_the_compiled_train_step(
    tmp_path: Path, caplog: Any, target: str
) -> None:
    """Restored leaves land where a created state's do (uncommitted, on the default
    device) unless the target places them, so the train step compiled for a created
    state is not compiled again."""
    state = w.train(w.make_state(), 0, 1)
    with ckpt.manager(tmp_path, async_save=False) as mngr:
        ckpt.save(mngr, 1, state)
        made = jax.eval_shape(w.make_state) if target == "abstract" else w.make_state()
        restored = ckpt.restore(mngr, made)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        w.train(restored, 1, 2)
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == [], compiled
