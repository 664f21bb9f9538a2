"""ema_jax.nnx.EMA: flax's nnx.EMA API over the one functional transform."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ema_jax
import ema_jax.nnx
from ema_jax import schedules


class Net(nnx.Module):
    """Linear, BatchNorm and Dropout: Params, BatchStats and RNG state."""

    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
        self.lin = nnx.Linear(3, 4, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.bn = nnx.BatchNorm(4, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(4, 1, rngs=rngs, param_dtype=dtype, dtype=dtype)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.lin(x)))))[:, 0]


def _net(dtype=jnp.float32) -> Net:
    return Net(nnx.Rngs(0, dropout=1), dtype)


def _batches(n: int = 8):
    rng = np.random.default_rng(0)
    return [
        (jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), jnp.asarray(rng.normal(size=16)))
        for _ in range(n)
    ]


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _train_step(model, optimizer, averages, x, y):
    grads = nnx.grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    for average in averages:
        average.update(model)


def _train(averages, model, steps: int = 8):
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    for x, y in _batches(steps):
        _train_step(model, optimizer, averages, x, y)
    return optimizer


def test_plain_decay_matches_flax_nnx_ema_and_the_views_agree():
    """After a jitted Adam loop, ``apply_to``'s params equal flax's
    ``nnx.EMA(model, β, only=nnx.Param)``'s within 1e-6, and both views give the same
    outputs in eval mode; BatchNorm statistics and RNG state come from the model."""
    model = _net()
    ours, theirs = ema_jax.nnx.EMA(model, 0.9), nnx.EMA(model, 0.9, only=nnx.Param)
    _train((ours, theirs), model)
    view, reference = ours.apply_to(model), theirs.apply_to(model)
    got, want = nnx.state(view, nnx.Param), nnx.state(reference, nnx.Param)
    assert len(jax.tree.leaves(got)) == len(jax.tree.leaves(want)) == 6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)
    assert not np.allclose(
        got["lin"]["kernel"][...], nnx.state(model, nnx.Param)["lin"]["kernel"][...]
    )
    np.testing.assert_array_equal(view.bn.mean[...], model.bn.mean[...])  # not averaged
    view.eval()
    reference.eval()
    x = _batches(1)[0][0]
    np.testing.assert_allclose(view(x), reference(x), atol=1e-6)
    assert int(ours.count[...]) == 8 and ours.decay == 0.9


def _functional_run(tx, model_states):
    """The functional transform over the same sequence of params (leaf lists)."""
    state = tx.init(model_states[0])
    shadows = []
    update = jax.jit(tx.update)
    for params in model_states[1:]:
        shadow, state = update(params, state)
        shadows.append(shadow)
    return shadows, state


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": 0.9, "debias": True},
        {"decay": schedules.power_function(sigma_rel=0.1), "update_every": 3},
        {"decay": schedules.tf_warmup(0.99), "start_step": 2},
        {"decay": (0.5, 0.9, schedules.from_half_life(3.0)), "debias": (True, False, True)},
    ],
    ids=["debias", "schedule, update_every", "start_step", "three decays"],
)
def test_options_equal_the_functional_transform_bitwise(kwargs):
    """Every option is the functional ``ema_jax.ema``'s, bitwise, on the same
    params sequence (and so the float64 references of the functional tests)."""
    decay = kwargs.pop("decay")
    model = _net()
    averager = ema_jax.nnx.EMA(model, decay, **kwargs)
    seen = [jax.tree.leaves(nnx.state(model, nnx.Param))]

    @nnx.jit
    def step(model, optimizer, averager, x, y):
        optimizer.update(model, nnx.grad(_loss)(model, x, y))
        averager.update(model)
        return nnx.state(model, nnx.Param)

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    for x, y in _batches(7):
        seen.append(jax.tree.leaves(step(model, optimizer, averager, x, y)))
    shadows, state = _functional_run(ema_jax.ema(decay, **kwargs), seen)
    jax.tree.map(np.testing.assert_array_equal, averager.state.ema, state.ema)
    assert int(averager.state.count) == int(state.count) == 7
    k = ema_jax.num_averages(state)
    stacked = isinstance(decay, tuple)
    assert averager.transform.num_averages == k == (len(decay) if stacked else 1)
    for i in range(k):
        got = jax.tree.leaves(averager.shadow(i))
        want = shadows[-1][i] if stacked else shadows[-1]
        jax.tree.map(np.testing.assert_array_equal, got, want)
    first = jax.tree.leaves(averager.shadow())  # ema_index=None: the first average
    jax.tree.map(np.testing.assert_array_equal, first, shadows[-1][0] if stacked else shadows[-1])
    if stacked:
        assert isinstance(averager.params, tuple) and len(averager.params) == k


def test_bf16_model_follows_the_fp32_prediction():
    """bf16 params, β = 0.999: the fp32 accumulators follow the exact (float64) average
    of the params seen, with no stall, and the shadow is bf16 again."""
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    ours = ema_jax.nnx.EMA(model, 0.999)
    assert all(a.dtype == jnp.float32 for a in ours.state.ema)
    start = np.asarray(model.kernel[...], np.float64)
    target = start + 1.0
    model.kernel[...] = jnp.asarray(target, jnp.bfloat16)
    update = nnx.jit(lambda average, m: average.update(m))
    for _ in range(500):
        update(ours, model)
    reached = np.asarray(model.kernel[...], np.float64)  # the target, rounded to bf16
    exact = reached + 0.999**500 * (start - reached)
    got = np.asarray(ours.state.ema[1], np.float64)  # leaves: bias, kernel
    np.testing.assert_allclose(got, exact, atol=2e-3)
    assert ours.shadow()["kernel"][...].dtype == jnp.bfloat16
    shadow = np.asarray(ours.shadow()["kernel"][...], np.float64)
    np.testing.assert_allclose(shadow, exact, rtol=2**-8, atol=2e-3)  # bf16 rounding


def test_the_default_filter_skips_rng_state():
    """The default ``only=nnx.Param`` works on a model with Dropout RNG state (the RNG key
    is neither tracked nor averaged); a filter may add BatchNorm's statistics."""
    model = _net()
    averager = ema_jax.nnx.EMA(model, 0.99)
    assert len(averager.state.ema) == 6
    nnx.jit(lambda average, m: average.update(m))(averager, model)
    assert int(averager.count[...]) == 1
    averaged = ema_jax.nnx.EMA(model, 0.99, only=(nnx.Param, nnx.BatchStat))
    assert len(averaged.state.ema) == 8


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"decay": 0.99, "only": nnx.Intermediate}, "selects no Variable"),
        ({"decay": 0.99, "only": ...}, r"selects RNG state at 'drop/rngs/(count|key)'"),
        ({"decay": 1.5}, "decay"),
    ],
    ids=["filter selecting nothing", "filter selecting RNG state", "decay out of range"],
)
def test_a_bad_filter_or_decay_is_refused_naming_it(arguments, match):
    """A filter selecting nothing or RNG keys is refused naming the path; a bad decay is
    refused naming it."""
    with pytest.raises(ValueError, match=match):
        ema_jax.nnx.EMA(_net(), **arguments)


def test_the_options_are_ema_s_as_given():
    """``EMA(model, decay, **options)`` builds the rule with ``ema(decay, **options)``: the
    same transform, for every option of ``ema``."""
    options = {
        "debias": (True, False),
        "update_every": 2,
        "start_step": 3,
        "accumulator_dtype": jnp.float64,
        "skip_nonfinite": True,
    }
    with jax.enable_x64(True):
        averager = ema_jax.nnx.EMA(_net(), (0.9, 0.99), **options)
        assert averager.transform == ema_jax.ema((0.9, 0.99), **options)
    assert averager.decay == (0.9, 0.99)


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        ({"decay_rate": 0.9}, TypeError, "decay_rate"),
        ({"debias": 1}, ValueError, "debias"),
        ({"update_every": 0}, ValueError, "update_every"),
        ({"start_step": -1}, ValueError, "start_step"),
        ({"accumulator_dtype": jnp.int32}, TypeError, "accumulator_dtype"),
        ({"skip_nonfinite": None}, TypeError, "skip_nonfinite"),
    ],
)
def test_a_bad_option_raises_naming_it(options, error, names):
    """A bad or unknown option raises at construction, naming it (``ema``'s own check)."""
    with pytest.raises(error, match=names):
        ema_jax.nnx.EMA(_net(), 0.9, **options)


def test_the_ema_variables_keep_the_saved_layout():
    """The EMA's Variables sit at the paths NNX checkpoints save: ``count``,
    ``num_skipped`` and ``weight`` (``EmaState``'s arrays, same names) and one
    ``accumulators`` entry per tracked Variable, each an :class:`EmaVariable` with the
    ``EmaState`` value; checkpoints written by earlier versions depend on these paths."""
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    averager = ema_jax.nnx.EMA(model, (0.9, 0.99), debias=(True, False))
    flat = nnx.to_flat_state(nnx.state(averager))
    assert [path for path, _ in flat] == [
        ("accumulators", 0),
        ("accumulators", 1),
        ("count",),
        ("num_skipped",),
        ("weight",),
    ]
    assert all(type(variable) is ema_jax.nnx.EmaVariable for _, variable in flat)
    state = averager.state
    values = dict(flat)
    for i, leaf in enumerate(state.ema):
        np.testing.assert_array_equal(values[("accumulators", i)].get_value(), leaf)
    for name in ("count", "num_skipped", "weight"):
        np.testing.assert_array_equal(values[(name,)].get_value(), getattr(state, name))
    assert state.param_dtypes == (np.dtype(jnp.float32),) * 2


def test_the_ema_state_is_invisible_to_param_filters_and_donatable():
    """The EMA's own Variables are not Params (an optimizer over a container never trains
    them), and ``nnx.jit(..., donate_argnums=)`` updates them in place."""
    model = _net()
    averager = ema_jax.nnx.EMA(model, 0.9)
    container = nnx.Dict(model=model, ema=averager)
    assert set(nnx.state(container, nnx.Param)) == {"model"}
    step = nnx.jit(lambda a, m: a.update(m), donate_argnums=0)
    old = averager.accumulators[0][...]
    step(averager, model)
    assert old.is_deleted() and int(averager.count[...]) == 1


def test_resume_in_a_new_process_is_bit_exact_and_the_export_serves_inference(tmp_path):
    """Model, optimizer and EMA saved at step 3 by ``ema_jax.checkpoint``,
    restored in a fresh process into ``nnx.eval_shape`` and trained to step 6, equal the
    uninterrupted run bitwise; the EMA-only export, loaded there into an abstract
    ``nnx.State``, gives the same inference outputs; the ``ema_params`` item is the shadow."""
    import subprocess
    import sys
    from pathlib import Path

    import nnx_worker

    from ema_jax import checkpoint

    state = nnx_worker.train(nnx_worker.make(), range(3))
    with checkpoint.manager(tmp_path / "ckpt") as mngr:
        assert checkpoint.save(mngr, 3, state)
    checkpoint.export_ema_params(tmp_path / "export", state, ema_index=1)
    averaged = checkpoint.load_ema_params(tmp_path / "ckpt")
    want_shadow = nnx.to_pure_dict(state["ema"].shadow(1))
    jax.tree.map(np.testing.assert_array_equal, averaged[1], want_shadow)
    abstract = nnx.eval_shape(lambda: nnx_worker.Net(nnx.Rngs(0, dropout=1)))
    graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
    fresh_rest = nnx.state(nnx_worker.Net(nnx.Rngs(0, dropout=1)), nnx.Not(nnx.Param))
    deployed = nnx.merge(graphdef, state["ema"].shadow(1), fresh_rest)
    want_inference = nnx_worker.infer(deployed)
    state = nnx_worker.train(state, range(3, 6))
    worker = Path(nnx_worker.__file__)
    subprocess.run([sys.executable, str(worker), str(tmp_path)], check=True, timeout=120)
    got = np.load(tmp_path / "resumed.npz")
    want = nnx_worker.leaves(state)
    assert len(got.files) == len(want) + 1
    for i, leaf in enumerate(want):
        np.testing.assert_array_equal(got[f"arr_{i}"], leaf)
    np.testing.assert_array_equal(got["inference"], want_inference)


def test_nnx_checkpoint_mismatch_is_loud(tmp_path):
    """A target built with other decays is refused naming the path; an NNX object without
    one ema_jax.nnx.EMA is refused before anything is written."""
    import nnx_worker

    from ema_jax import checkpoint

    state = nnx_worker.make()
    with checkpoint.manager(tmp_path / "ckpt") as mngr:
        checkpoint.save(mngr, 0, state)
        other = nnx.Dict(model=state["model"], ema=ema_jax.nnx.EMA(state["model"], 0.9))
        with pytest.raises(ValueError, match="checkpoint does not match the target"):
            checkpoint.restore(mngr, other)
        with pytest.raises(TypeError, match=r"exactly one ema_jax\.nnx\.EMA, found 0"):
            checkpoint.save(mngr, 1, nnx.Dict(model=state["model"]))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["0"]


def test_apply_to_view_shares_no_variable_with_the_model():
    """Writing into the view (e.g. recalibrating its BatchNorm statistics) leaves the model
    as it was: the view's Variables are its own."""
    model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
    averager = ema_jax.nnx.EMA(model, 0.9)
    averager.update(model)
    view = averager.apply_to(model)
    view.layers[1].mean[...] = jnp.ones(2)
    view.layers[0].kernel[...] = jnp.zeros((2, 2))
    np.testing.assert_array_equal(model.layers[1].mean[...], np.zeros(2))
    assert np.any(np.asarray(model.layers[0].kernel[...]) != 0)


def _switch(average, model):
    average.switch(model)


SWITCHES = {
    "eager": _switch,
    "nnx.jit": nnx.jit(_switch),
    "nnx.jit donating both": nnx.jit(_switch, donate_argnums=(0, 1)),
}


@pytest.mark.parametrize("switch", SWITCHES.values(), ids=SWITCHES)
def test_switch_writes_the_shadow_into_the_model_and_leaves_the_rest(switch):
    """``switch(model)``: the model's Params become the shadow bit for bit, as fresh arrays
    (not the fp32 accumulators: the next donating step runs); the EMA's state, the
    optimizer's and the model's BatchStats are bitwise as they were."""
    model = _net()
    average = ema_jax.nnx.EMA(model, 0.8)
    optimizer = _train([average], model, steps=4)
    shadow = jax.tree.map(np.array, nnx.to_pure_dict(average.shadow()))
    assert not np.array_equal(shadow["lin"]["kernel"], model.lin.kernel[...])
    kept = jax.tree.map(
        np.array, (nnx.state(average), nnx.state(optimizer), nnx.state(model, nnx.BatchStat))
    )
    switch(average, model)
    chex.assert_trees_all_equal(
        jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param))), shadow
    )
    after = (nnx.state(average), nnx.state(optimizer), nnx.state(model, nnx.BatchStat))
    chex.assert_trees_all_equal(jax.tree.map(np.array, after), kept)
    accumulators = {a[...].unsafe_buffer_pointer() for a in average.accumulators}
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert not accumulators & {p.unsafe_buffer_pointer() for p in params}
    step = nnx.jit(_train_step.__wrapped__, donate_argnums=(0, 1, 2))
    step(model, optimizer, [average], *_batches(1)[0])


def test_switch_casts_to_the_variables_dtypes_and_picks_an_average():
    """bf16 Params get average ``ema_index``'s fp32 accumulators cast to bf16 (bitwise);
    ``None`` is the first average."""
    model = _net(jnp.bfloat16)
    average = ema_jax.nnx.EMA(model, (0.5, 0.9))
    _train([average], model, steps=3)
    for index, position in ((None, 0), (0, 0), (1, 1)):
        want = [np.asarray(a[..., position].astype(jnp.bfloat16)) for a in average.accumulators]
        nnx.jit(lambda a, m, i=index: a.switch(m, i))(average, model)
        got = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert all(p.dtype == jnp.bfloat16 for p in got)
        chex.assert_trees_all_equal([np.asarray(p) for p in got], want)
    with pytest.raises(ValueError, match="ema_index"):
        average.switch(model, 2)
