"""What the checkpoint tests share: running the worker, bitwise comparisons, small states,
damaging files. Not collected by pytest (no ``test_`` prefix)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ckpt_worker as w
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ema_jax
from ema_jax import checkpoint as ckpt

WORKER = str(Path(__file__).with_name("ckpt_worker.py"))
ROOT = str(Path(__file__).resolve().parents[3])
TIMEOUT = 180


def worker_env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_worker(*args: Any) -> None:
    proc = subprocess.run(
        [sys.executable, WORKER, *map(str, args)],
        env=worker_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def kill_worker_inside(args: list[str], marker: str, inside: Callable[[], bool]) -> int:
    """Runs the worker with ``args``; once it printed ``marker`` and ``inside()`` holds
    (polled every millisecond, 60 s at most), kills it with SIGKILL. Its return code."""
    proc = subprocess.Popen(
        [sys.executable, WORKER, *args],
        env=worker_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == marker:
                break
        else:
            raise AssertionError(f"worker exited (rc={proc.wait()}) before {marker}")
        deadline = time.monotonic() + 60
        while not inside():
            assert time.monotonic() < deadline, f"the worker never got there after {marker}"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def load_pickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f)  # type: ignore[no-any-return]


def assert_bitwise(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert list(expected) == list(actual)
    for key, value in expected.items():
        got = actual[key]
        if key == ".step":  # a fresh target's Python-int step comes back as a Python int
            assert int(value) == int(got)
            continue
        assert np.asarray(value).dtype == np.asarray(got).dtype, key
        assert np.shape(value) == np.shape(got), key
        assert np.asarray(value).tobytes() == np.asarray(got).tobytes(), key


def assert_trees_bitwise(expected: Any, actual: Any) -> None:
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    assert_bitwise(w.host_leaves(expected), w.host_leaves(actual))


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def saved(directory: Path, state: Any, step: int = 3) -> None:
    with ckpt.manager(directory) as mngr:
        assert ckpt.save(mngr, step, state)


def small_state(seed: float = 0.0) -> ema_jax.EmaTrainState:
    """One average of ``{"w": 1024 values, "b": 3 values}``, all ``seed`` + their index."""
    params = {"w": jnp.arange(1024.0) + seed, "b": jnp.full((3,), seed, jnp.float32)}
    return ema_jax.EmaTrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(0.1), ema=ema_jax.ema(0.9)
    )


def flip_a_byte(directory: Path) -> None:
    """Flips one bit in the middle of the largest data file under ``directory``."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"]
    data = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
