"""Several decays in one update: ``ema(decay=(β_1, ..., β_K))``.

Each of the K averages must be the single-decay EMA run alone with the same settings (the
same float32 formula: bitwise but for XLA:CPU contracting a multiply-add into an FMA in one
loop and not in the other, so floats to a few ulp), and the train state / eval steps must
pick the k-th average by index.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import f32, mse_loss, np_plain_ema, regression_batches, scan_runner
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ema_jax
from ema_jax import schedules

STEPS = 24


def _sequence(seed: int = 0, nan_at: tuple[int, ...] = ()) -> dict[str, jax.Array]:
    """A params trajectory ``[STEPS+1, ...]``: float32 weights, a bf16 leaf, an int leaf."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(STEPS + 1, 3, 2)).astype(np.float32)
    for t in nan_at:
        w[t, 1, 0] = np.nan if t % 2 else np.inf
    return {
        "w": jnp.asarray(w),
        "h": jnp.asarray(rng.normal(size=(STEPS + 1, 4)), jnp.bfloat16),
        "n": jnp.asarray(np.arange(STEPS + 1)[:, None] * np.ones((1, 2), np.int32)),
    }


def _run(tx: ema_jax.EmaTransform, seq: dict[str, jax.Array]):
    init = jax.tree.map(lambda x: x[0], seq)
    rest = jax.tree.map(lambda x: x[1:], seq)
    return scan_runner(tx)(init, rest)


def _assert_trees_equal(got, want):
    chex.assert_trees_all_equal(got, want, strict=True)  # same trees, shapes, dtypes, values


def _assert_same_average(got, want):
    """Same trees, shapes and dtypes; integers bitwise, floats to a few ulp of their dtype at
    the leaf's scale (the difference an FMA contraction makes)."""
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            x, y, tol = (
                np.asarray(x, np.float64),
                np.asarray(y, np.float64),
                4 * jnp.finfo(x.dtype).eps,
            )
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol * np.abs(y).max())
        else:
            np.testing.assert_array_equal(x, y)


CONFIGS = {
    "plain": ((0.5, 0.9, 0.99), False, {}),
    "mixed debias": ((0.5, 0.9, 0.99), (False, True, True), {}),
    "schedules": (
        (schedules.tf_warmup(0.999), schedules.power_function(gamma=7.0), 0.95),
        (True, False, False),
        {},
    ),
    "every 3, start 4, NaN skipped": (
        (0.8, 0.97),
        (True, False),
        {"update_every": 3, "start_step": 4, "skip_nonfinite": True},
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_average_equals_the_single_decay_run(name):
    """Every shadow (after every step) and every final accumulator of the K-decay EMA is
    the one of ``ema(β_k, debias=d_k, ...)`` run alone (to a few ulp); count, num_skipped and
    weight[k] agree too. The last config also skips two non-finite updates (steps 6 and 12,
    due with ``update_every=3``); the NaN at step 11, where no update is due, is not read."""
    decays, debias, kwargs = CONFIGS[name]
    guarded = kwargs.get("skip_nonfinite", False)
    seq = _sequence(nan_at=(6, 11, 12) if guarded else ())
    debiases = debias if isinstance(debias, tuple) else (debias,) * len(decays)
    shadows, state = _run(ema_jax.ema(decays, debias=debias, **kwargs), seq)
    assert isinstance(shadows, tuple) and len(shadows) == len(decays)
    assert state.weight.shape == (len(decays),)
    assert ema_jax.num_averages(state) == len(decays)
    for k, (decay, d) in enumerate(zip(decays, debiases, strict=True)):
        single_shadows, single = _run(ema_jax.ema(decay, debias=d, **kwargs), seq)
        _assert_same_average(shadows[k], single_shadows)
        _assert_same_average(ema_jax.accumulators(state, k), single.ema)
        assert int(state.count) == int(single.count)
        assert int(state.num_skipped) == int(single.num_skipped)
        np.testing.assert_array_equal(np.asarray(state.weight[k]), np.asarray(single.weight))
    if guarded:
        assert int(state.num_skipped) == 2


def test_scheduled_average_in_a_tuple_matches_float64_loop():
    """Independent reference: the plain tf_warmup average inside a 2-tuple equals a float64
    NumPy loop with the schedule's float32 β_t (float32 rounding: rtol = atol = 1e-6 on
    O(1) values)."""
    seq = _sequence(seed=3)
    shadows, _ = _run(ema_jax.ema((schedules.tf_warmup(0.99), 0.5)), seq)
    betas = [f32(min(0.99, (1 + t) / (10 + t))) for t in range(1, STEPS + 1)]
    want = np_plain_ema(np.asarray(seq["w"][0]), np.asarray(seq["w"][1:]), betas)
    np.testing.assert_allclose(np.asarray(shadows[0]["w"]), want, rtol=1e-6, atol=1e-6)
    want_fast = np_plain_ema(np.asarray(seq["w"][0]), np.asarray(seq["w"][1:]), [0.5] * STEPS)
    np.testing.assert_allclose(np.asarray(shadows[1]["w"]), want_fast, rtol=1e-6, atol=1e-6)


def test_shadows_are_k_trees_in_the_params_dtypes():
    """The K averages live side by side (one trailing axis of size K per leaf, so one pass
    reads each param once); ``shadows`` splits them into K trees in the params' dtypes,
    ``update`` returns the same K-tuple, and ``shadow(state)`` is the first average."""
    params = jax.tree.map(lambda x: x[0], _sequence())
    tx = ema_jax.ema((0.9, 0.99, 0.999))
    state = tx.init(params)
    assert jax.tree.structure(state.ema) == jax.tree.structure(params)
    for acc, p in zip(jax.tree.leaves(state.ema), jax.tree.leaves(params), strict=True):
        assert acc.shape == (*p.shape, 3)
        # bf16 → fp32 accumulator; other dtypes kept
        assert acc.dtype == (jnp.float32 if p.dtype == jnp.bfloat16 else p.dtype)
    out, state = jax.jit(tx.update)(params, state)
    assert isinstance(out, tuple) and len(out) == 3
    for k, tree in enumerate(out):
        assert jax.tree.map(lambda x: x.dtype, tree) == jax.tree.map(lambda x: x.dtype, params)
        _assert_trees_equal(tree, ema_jax.shadow(state, k))
        _assert_trees_equal(tree, ema_jax.shadows(state)[k])
    assert len(ema_jax.shadows(state)) == 3
    _assert_trees_equal(ema_jax.shadow(state), out[0])  # ema_index=None: the first
    _assert_trees_equal(ema_jax.accumulators(state), ema_jax.accumulators(state, 0))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda state, single: ema_jax.shadow(state, 3), r"must be in \[0, 3\), got 3"),
        (lambda state, single: ema_jax.accumulators(state, -1), r"must be in \[0, 3\), got -1"),
        (lambda state, single: ema_jax.shadow(state, True), r"must be in \[0, 3\), got True"),
        (lambda state, single: ema_jax.shadow(single, 1), "must be None or 0 for a single decay"),
    ],
    ids=["shadow past the end", "accumulators negative", "a bool", "single decay"],
)
def test_an_ema_index_outside_the_averages_is_refused(call, match):
    """``ema_index`` must name one of the K averages (a static int in ``[0, K)``, or
    ``None``); otherwise a ``ValueError`` names it and the range."""
    params = jax.tree.map(lambda x: x[0], _sequence())
    state = ema_jax.ema((0.9, 0.99, 0.999)).init(params)
    single = ema_jax.ema(0.9).init(params)
    with pytest.raises(ValueError, match="ema_index " + match):
        call(state, single)


def test_a_concrete_integer_array_is_an_index():
    """``ema_index`` may be a concrete integer array (e.g. ``jnp.int32(1)``), not only a
    Python int: it picks the same average."""
    state = ema_jax.ema((0.9, 0.99)).init({"a": jnp.arange(2.0)})
    np.testing.assert_array_equal(
        ema_jax.shadow(state, jnp.int32(1))["a"], ema_jax.shadow(state, 1)["a"]
    )


def test_each_average_keeps_the_param_shardings():
    """On 8 host devices every accumulator of every decay has its param's sharding (the
    stacked accumulators: the param's spec plus a replicated trailing axis)."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    params = {
        "w": jax.device_put(
            jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data", "model"))
        ),
        "b": jax.device_put(jnp.ones(4), NamedSharding(mesh, P())),
    }
    tx = ema_jax.ema((0.9, 0.99), debias=(False, True))
    init = tx.init(params)
    state = jax.jit(tx.update)(params, init)[1]
    leaves = jax.tree.leaves(params)
    for stacked in (init, state):
        for got, want in zip(jax.tree.leaves(stacked.ema), leaves, strict=True):
            spec = (*want.sharding.spec, *(None,) * (got.ndim - len(want.sharding.spec)))
            assert got.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), got.ndim)
    for k in range(2):
        for got, want in zip(jax.tree.leaves(ema_jax.accumulators(state, k)), leaves, strict=True):
            assert got.sharding.is_equivalent_to(want.sharding, want.ndim)


# ----------------------------------------------------------------------- train state / eval


@pytest.fixture(scope="module")
def trained():
    """A linear model trained 12 steps with 3 decays (0.5 plain, 0.9 debiased, 0.99 plain)."""
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    tx = ema_jax.ema((0.5, 0.9, 0.99), debias=(False, True, False))
    state = ema_jax.EmaTrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1), ema=tx)
    step = ema_jax.make_train_step(mse_loss)
    batches = regression_batches(0, 12, 16)
    for batch in batches:
        state, _ = step(state, batch)
    return state, batches


def test_train_state_exposes_each_average_by_index(trained):
    state, _ = trained
    assert state.num_averages == 3
    averages = ema_jax.shadows(state.ema_state)
    assert isinstance(state.ema_params, tuple) and len(state.ema_params) == 3
    for i in range(3):
        _assert_trees_equal(state.ema_params[i], averages[i])
        _assert_trees_equal(state.select_params(use_ema=True, ema_index=i), averages[i])
    _assert_trees_equal(state.select_params(use_ema=True), averages[0])  # default: first
    _assert_trees_equal(state.select_params(use_ema=False, ema_index=2), state.params)
    # The averages differ from each other and from the raw params: the index matters.
    w = [np.asarray(a["w"]) for a in averages]
    assert not np.allclose(w[0], w[2]) and not np.allclose(w[1], w[2])


@pytest.mark.parametrize("bad", [3, -1])
def test_train_state_refuses_an_ema_index_outside_the_averages(trained, bad):
    """``select_params`` with an ``ema_index`` outside ``[0, K)`` raises naming it."""
    state, _ = trained
    with pytest.raises(ValueError, match="ema_index"):
        state.select_params(use_ema=True, ema_index=bad)


def test_train_state_averages_equal_standalone_runs_of_the_same_params(trained):
    """The k-th average held by the train state equals ``ema(β_k)`` fed the same params."""
    state, batches = trained
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    sgd = optax.sgd(0.1)
    opt_state = sgd.init(params)
    trajectory = []
    for batch in batches:
        grads = jax.grad(mse_loss)(params, batch)
        updates, opt_state = sgd.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    seq = jax.tree.map(
        lambda *xs: jnp.stack(xs), {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, *trajectory
    )
    for i, (decay, debias) in enumerate([(0.5, False), (0.9, True), (0.99, False)]):
        want = _run(ema_jax.ema(decay, debias=debias), seq)[0]
        got = state.ema_params[i]
        for name in ("w", "b"):
            np.testing.assert_allclose(got[name], want[name][-1], rtol=1e-6, atol=1e-7)


def test_eval_steps_pick_the_average_by_index(trained):
    state, batches = trained
    batch = batches[0]
    averages = ema_jax.shadows(state.ema_state)
    eval_step = ema_jax.make_eval_step(mse_loss)
    for i in range(3):
        got = eval_step(state, batch, use_ema=True, ema_index=i)
        np.testing.assert_allclose(got, mse_loss(averages[i], batch), rtol=1e-6)
    np.testing.assert_allclose(eval_step(state, batch), mse_loss(averages[0], batch), rtol=1e-6)
    np.testing.assert_allclose(
        eval_step(state, batch, use_ema=False), mse_loss(state.params, batch), rtol=1e-6
    )
    paired = ema_jax.make_paired_eval_step(mse_loss)(state, batch)
    assert isinstance(paired["ema"], tuple) and len(paired["ema"]) == 3
    for i in range(3):
        np.testing.assert_allclose(paired["ema"][i], mse_loss(averages[i], batch), rtol=1e-6)
    result = ema_jax.evaluate_dataset(ema_jax.make_paired_eval_step(mse_loss), state, batches[:3])
    means = [np.mean([float(mse_loss(averages[i], b)) for b in batches[:3]]) for i in range(3)]
    assert isinstance(result["val_loss_ema"], list) and len(result["val_loss_ema"]) == 3
    np.testing.assert_allclose(result["val_loss_ema"], means, rtol=1e-5)
