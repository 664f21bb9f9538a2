"""ema_jax.checkpoint: what earlier versions wrote keeps loading, and the documented resume
recipe survives being resumed.

``saved_layout/`` holds checkpoints written by ema_jax 0.1.0 (``write_saved_layout.py``,
run with that version's code): a Linen training checkpoint (two averages, a best metric,
the state's checksum), an NNX one, an export and post-hoc snapshots, with the arrays they
hold in ``expected.npz``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import ckpt_worker as w
import jax
import ml_dtypes
import numpy as np
import pytest
from helpers import tree_allclose

from ema_jax import checkpoint as ckpt
from ema_jax import posthoc

SAVED = Path(__file__).with_name("saved_layout")


@pytest.fixture(scope="module")
def saved_layout(tmp_path_factory: Any) -> Path:
    """A copy of ``saved_layout/`` (readers leave it as it is; the copy makes sure)."""
    copy = tmp_path_factory.mktemp("layout") / "saved"
    shutil.copytree(SAVED, copy)
    return copy  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    """The saved arrays; NumPy stores bfloat16 as 2-byte voids: viewed as bfloat16 again."""
    with np.load(SAVED / "expected.npz") as arrays:
        return {
            k: v.view(ml_dtypes.bfloat16) if v.dtype == np.dtype("V2") else v
            for k, v in arrays.items()
        }


def prefixed(expected: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}


def assert_leaves_equal(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert list(want) == list(got)
    for key, value in want.items():
        assert value.dtype == got[key].dtype, key
        assert value.tobytes() == np.asarray(got[key]).tobytes(), key


def nnx_worker() -> ModuleType:
    """tests/ema_jax/nnx_worker.py: the NNX model the saved NNX checkpoint holds."""
    path = Path(__file__).parents[1] / "nnx_worker.py"
    spec = importlib.util.spec_from_file_location("nnx_worker", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linen_checkpoint_of_0_1_0_restores_bitwise(saved_layout: Path, expected: Any) -> None:
    with ckpt.manager(saved_layout / "linen", read_only=True) as mngr:
        assert mngr.all_steps() == [1, 2]
        for step in (1, 2):
            restored = ckpt.restore(mngr, jax.eval_shape(w.make_state), step=step)
            assert_leaves_equal(prefixed(expected, f"linen/{step}"), w.host_leaves(restored))
    first = ckpt.restore(ckpt.manager(saved_layout / "linen", read_only=True), w.make_state(), 1)
    best = ckpt.load_ema_params(saved_layout / "linen", first.ema_params, step="best")
    assert_leaves_equal(w.host_leaves(first.ema_params), w.host_leaves(best))  # val 0.5 < 0.7


def test_nnx_checkpoint_of_0_1_0_restores_bitwise(saved_layout: Path, expected: Any) -> None:
    from flax import nnx

    worker = nnx_worker()
    with ckpt.manager(saved_layout / "nnx", read_only=True) as mngr:
        restored = ckpt.restore(mngr, nnx.eval_shape(worker.make))
    got = {f"[{i}]": leaf for i, leaf in enumerate(worker.leaves(restored))}
    assert_leaves_equal(prefixed(expected, "nnx"), got)


def test_export_of_0_1_0_loads_bitwise(saved_layout: Path, expected: Any) -> None:
    exported = ckpt.load_exported(saved_layout / "export")
    assert_leaves_equal(prefixed(expected, "export"), w.host_leaves(exported))


def test_snapshots_of_0_1_0_synthesize(saved_layout: Path, expected: Any) -> None:
    got = w.host_leaves(posthoc.synthesize_from(saved_layout / "posthoc", 0.08))
    want = prefixed(expected, "posthoc")
    assert list(want) == list(got)
    assert [v.dtype for v in want.values()] == [v.dtype for v in got.values()]
    tree_allclose(got, want, rtol=1e-6)


def test_docs_resume_recipe_runs_twice_in_one_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/checkpointing.md's blocks, run as one program twice in the same folder: the
    second run resumes from the first run's checkpoint and exports again."""
    from test_docs import ROOT, blocks

    monkeypatch.chdir(tmp_path)
    code = [b for b in blocks(ROOT / "docs" / "checkpointing.md") if b.lang == "python"]
    for _ in range(2):
        namespace: dict[str, object] = {"__name__": "__main__"}
        for block in code:
            exec(compile(block.code, f"docs/checkpointing.md:{block.line}", "exec"), namespace)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ckpt", "deploy"]
