"""BEMA (``ema_jax.bema``): the published values, a float64 NumPy reference of the formulas
under burn-in and ``update_every``, bf16 params, gradient accumulation, the NaN guard, host
offload, ``EmaTrainState``, ``ema_jax.nnx.BEMA`` and checkpoints with exact resume."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ema_jax
import ema_jax.nnx
from ema_jax import checkpoint as ckpt


def reference(thetas, *, eta=0.2, kappa=0.5, rho=10.0, gamma=1.0, start=0, every=1):
    """BEMA's deployed weights after each step, in float64: ``thetas[0]`` is the initial
    params, ``thetas[t]`` the params after optimizer step t. The EMA of an update at step t
    stands for the steps since the last one, its old average weighing the product of
    ``1 - β_j`` over them (as ema_jax's update_every does for every schedule)."""
    thetas = [np.asarray(x, np.float64) for x in thetas]
    ema = anchor = thetas[0]
    last, out = 0, []
    for t in range(1, len(thetas)):
        theta = thetas[t]
        if t <= start:
            ema = anchor = theta
            last = t
        elif t % every == 0:
            keep = np.prod(
                [1 - (rho + gamma * (j - start)) ** -kappa for j in range(last + 1, t + 1)]
            )
            ema = keep * ema + (1 - keep) * theta
            last = t
        alpha = (rho + gamma * (t - start)) ** -eta if t > start else 1.0
        out.append(alpha * (theta - anchor) + ema)
    return out


def _run(rule, thetas, **update):
    state = rule.init(thetas[0])
    update_fn = jax.jit(rule.update)
    outs = []
    for theta in thetas[1:]:
        out, state = update_fn(theta, state, **update)
        outs.append(out)
    return outs, state


def test_params_counting_up_give_the_published_values():
    """θ_t = t from θ₀ = 0 with the defaults (TRL's): BEMA_1 = 0.9205552653 and
    BEMA_5 = 5.7563480081."""
    outs, _ = _run(ema_jax.bema(), [jnp.float32(t) for t in range(6)])
    np.testing.assert_allclose(float(outs[0]), 0.9205552653, rtol=2e-7)
    np.testing.assert_allclose(float(outs[4]), 5.7563480081, rtol=2e-7)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"eta": 0.5, "kappa": 0.8, "rho": 2.0, "gamma": 3.0},
        {"start": 5},
        {"every": 3},
        {"start": 4, "every": 5, "rho": 0.0, "gamma": 1.0},
    ],
    ids=["defaults", "other powers", "burn-in", "update_every", "burn-in and update_every"],
)
def test_matches_a_float64_reference_of_the_formulas(settings):
    """Every step's shadow, for a random walk of params, within float32 rounding of the
    float64 loop of the formulas."""
    rng = np.random.default_rng(0)
    thetas = np.cumsum(rng.normal(size=(40, 7)), axis=0)
    names = {"start": "start_step", "every": "update_every"}
    rule = ema_jax.bema(**{names.get(k, k): v for k, v in settings.items()})
    outs, _ = _run(rule, [jnp.asarray(x, jnp.float32) for x in thetas])
    expected = reference(thetas, **settings)
    np.testing.assert_allclose(np.stack(outs), np.stack(expected), rtol=2e-5, atol=2e-5)


def test_the_anchor_is_the_params_at_the_end_of_the_burn_in():
    """With ``start_step=3`` the anchor is θ_3 and, through the burn-in, the shadow is the
    params themselves, also params read between updates."""
    rule = ema_jax.bema(start_step=3)
    thetas = [jnp.full((2,), float(t) ** 2) for t in range(8)]
    outs, state = _run(rule, thetas)
    np.testing.assert_array_equal(state.anchor, thetas[3])
    for t in (1, 2, 3):
        np.testing.assert_array_equal(outs[t - 1], thetas[t])
    _, in_burn_in = _run(rule, thetas[:3])
    np.testing.assert_array_equal(rule.shadow(in_burn_in, thetas[5]), thetas[5])


def test_bf16_params_keep_fp32_accumulators_and_a_bf16_shadow():
    thetas = [jnp.full((4,), 1.0 + 0.01 * t, jnp.bfloat16) for t in range(30)]
    outs, state = _run(ema_jax.bema(), thetas)
    assert state.anchor.dtype == state.average.ema.dtype == jnp.float32
    assert outs[-1].dtype == jnp.bfloat16
    expected = reference([np.asarray(x, np.float64) for x in thetas])[-1]
    np.testing.assert_array_equal(outs[-1], jnp.asarray(expected, jnp.float32).astype(jnp.bfloat16))


def test_micro_steps_of_gradient_accumulation_change_nothing():
    rule = ema_jax.bema(start_step=1)
    state = rule.init(jnp.zeros(3))
    _, state = rule.update(jnp.ones(3), state)
    _, after = jax.jit(rule.update)(jnp.full(3, 5.0), state, optimizer_step=jnp.bool_(False))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_nonfinite_update_is_skipped_and_counted_and_the_anchor_kept():
    """With ``skip_nonfinite`` a NaN step changes no state and deploys the EMA, not NaN."""
    rule = ema_jax.bema(start_step=1, skip_nonfinite=True)
    state = rule.init(jnp.zeros(3))
    _, state = rule.update(jnp.ones(3), state)
    _, state = rule.update(jnp.full(3, 2.0), state)
    shadow, after = jax.jit(rule.update)(jnp.array([1.0, jnp.nan, 1.0]), state)
    assert int(after.num_skipped) == 1
    np.testing.assert_array_equal(after.anchor, jnp.ones(3))
    np.testing.assert_array_equal(after.average.ema, state.average.ema)
    np.testing.assert_array_equal(shadow, state.average.ema)


def test_offloaded_state_lives_in_host_memory_and_matches_the_device_path():
    thetas = [jnp.arange(6.0) * t for t in range(6)]
    host, _ = _run(ema_jax.bema(memory_kind="pinned_host"), thetas)
    device, _ = _run(ema_jax.bema(), thetas)
    state = ema_jax.bema(memory_kind="pinned_host").init(thetas[0])
    assert {x.sharding.memory_kind for x in (state.anchor, state.average.ema)} == {"pinned_host"}
    for a, b in zip(host, device, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": -0.1}, "eta"),
        ({"kappa": -1.0}, "kappa"),
        ({"rho": -1.0}, "rho"),
        ({"gamma": 0.0}, "gamma"),
        ({"rho": 0.2, "gamma": 0.5}, "rho \\+ gamma must be >= 1"),
        ({"eta": True}, "eta"),
        ({"start_step": -1}, "start_step"),
        ({"update_every": 0}, "update_every"),
    ],
    ids=lambda v: str(v),
)
def test_bad_settings_are_refused_naming_them(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ema_jax.bema(**kwargs)


def test_a_state_of_another_rule_is_refused():
    with pytest.raises(TypeError, match="BemaState"):
        ema_jax.bema().update(jnp.zeros(2), ema_jax.ema(0.9).init(jnp.zeros(2)))


@pytest.mark.parametrize(
    "read", [ema_jax.shadow, ema_jax.shadows, ema_jax.accumulators, ema_jax.num_averages]
)
def test_emastate_readers_refuse_a_bema_state_naming_the_rules_shadow(read):
    state = ema_jax.bema().init(jnp.zeros(2))
    with pytest.raises(TypeError, match=r"rule\.shadow\(state, params\)"):
        read(state)


def test_used_as_an_optax_transform_it_says_it_averages_params():
    rule = ema_jax.bema()
    state = rule.init(jnp.zeros(2))
    with pytest.raises(TypeError, match=r"BemaTransform.update.*averages params, not updates"):
        rule.update(jnp.zeros(2), state, jnp.zeros(2))


def test_post_hoc_snapshots_of_bema_are_refused(tmp_path):
    from ema_jax import posthoc

    state = ema_jax.bema().init({"w": jnp.zeros(2)})
    refused = pytest.raises(TypeError, match="BEMA's: post-hoc EMA synthesizes from")
    with posthoc.snapshot_manager(tmp_path / "snapshots") as mngr, refused:
        posthoc.save_snapshot(mngr, 1, state)
    assert not list((tmp_path / "snapshots").glob("1*"))


def _train_state(rule=None):
    return ema_jax.EmaTrainState.create(
        apply_fn=None,
        params={"w": jnp.linspace(-1.0, 1.0, 5)},
        tx=optax.adam(0.1),
        ema=rule or ema_jax.bema(update_every=2, start_step=1),
    )


_STEP = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)


def _grads(i):
    return {"w": jnp.sin(jnp.arange(5.0) + i)}


def test_train_state_deploys_bema_of_its_params():
    """``ema_params`` after each donated step is the reference's shadow of the trajectory
    the optimizer took."""
    state = _train_state()
    thetas = [np.asarray(state.params["w"], np.float64)]
    shadows = []
    for i in range(9):
        state = _STEP(state, _grads(i))
        thetas.append(np.asarray(state.params["w"], np.float64))
        shadows.append(np.asarray(state.ema_params["w"]))
        np.testing.assert_array_equal(state.select_params(True)["w"], shadows[-1])
    expected = reference(thetas, start=1, every=2)
    np.testing.assert_allclose(np.stack(shadows), np.stack(expected), rtol=1e-5, atol=1e-6)


def test_averaging_the_model_state_with_bema_is_refused():
    """BEMA would extrapolate BatchNorm statistics (a variance can turn negative)."""
    with pytest.raises(ValueError, match="average_model_state=True with BEMA"):
        ema_jax.EmaTrainState.create(
            apply_fn=None,
            params={"w": jnp.zeros(2)},
            tx=optax.sgd(0.1),
            ema=ema_jax.bema(),
            model_state={"var": jnp.ones(2)},
            average_model_state=True,
        )


def test_train_state_resumes_bit_exactly_from_a_checkpoint(tmp_path):
    state = _train_state()
    for i in range(3):
        state = _STEP(state, _grads(i))
    with ckpt.manager(tmp_path / "run") as mngr:
        ckpt.save(mngr, 3, state)
        restored = ckpt.restore(mngr, _train_state())
    assert isinstance(restored.ema_state, ema_jax.BemaState)
    for i in range(3, 7):
        state, restored = _STEP(state, _grads(i)), _STEP(restored, _grads(i))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    exported = tmp_path / "export"
    ckpt.export_ema_params(exported, state)
    np.testing.assert_array_equal(ckpt.load_exported(exported)["w"], state.ema_params["w"])


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


def _nnx_run(steps, kernels=None):
    """``steps`` jitted NNX train steps with ``nnx.BEMA(start_step=1)``; the kernel after
    each step (and the initial one) appended to ``kernels`` when given."""
    model = _Model(nnx.Rngs(0))
    run = nnx.Dict(
        model=model,
        optimizer=nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param),
        ema=ema_jax.nnx.BEMA(model, start_step=1),
    )

    @nnx.jit
    def step(run, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(run["model"])
        run["optimizer"].update(run["model"], grads)
        run["ema"].update(run["model"])

    if kernels is not None:
        kernels.append(np.asarray(model.dense.kernel[...], np.float64))
    for i in range(steps):
        step(run, jnp.full((1, 3), 1.0 + i))
        if kernels is not None:
            kernels.append(np.asarray(model.dense.kernel[...], np.float64))
    return run


def test_nnx_bema_matches_the_functional_rule():
    """The NNX object's shadow and view are the functional rule's on the same params."""
    run = _nnx_run(4)
    model, bema = run["model"], run["ema"]
    rule = bema.transform
    values = bema.tracked_values(model)
    expected = rule.shadow(bema.state, values)
    shadow = bema.shadow(model=model)
    np.testing.assert_array_equal(shadow["dense"]["kernel"], expected[1])
    view = bema.apply_to(model)
    np.testing.assert_array_equal(view.dense.kernel[...], expected[1])
    assert not np.array_equal(model.dense.kernel[...], view.dense.kernel[...])


def test_nnx_bema_deploys_the_reference_of_its_model_trajectory():
    """After 6 steps with a burn-in of 1, the NNX shadow is the float64 reference's of the
    kernels the optimizer produced (θ₀ = the kernel after step 1)."""
    kernels = []
    run = _nnx_run(6, kernels)
    shadow = run["ema"].shadow(model=run["model"])["dense"]["kernel"]
    np.testing.assert_allclose(shadow, reference(kernels, start=1)[-1], rtol=1e-5, atol=1e-6)


def test_nnx_bema_refuses_to_track_variables_that_are_not_params():
    model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"not nnx\.Param \('layers/1/mean', 'layers/1/var'\)"):
        ema_jax.nnx.BEMA(model, only=(nnx.Param, nnx.BatchStat))


@pytest.mark.parametrize("read", ["params", "shadow()"])
def test_nnx_bema_refuses_a_shadow_without_the_model(read):
    bema = _nnx_run(1)["ema"]
    with pytest.raises(TypeError, match="model"):
        bema.params if read == "params" else bema.shadow()


def test_nnx_bema_resumes_bit_exactly_and_exports_its_shadow(tmp_path):
    run = _nnx_run(3)
    with ckpt.manager(os.fspath(tmp_path / "run")) as mngr:
        ckpt.save(mngr, 3, run)
        restored = ckpt.restore(mngr, _nnx_run(0))
    saved = ckpt.load_ema_params(tmp_path / "run", nnx.state(_Model(nnx.Rngs(1)), nnx.Param))
    np.testing.assert_array_equal(
        saved["dense"]["kernel"], run["ema"].shadow(model=run["model"])["dense"]["kernel"]
    )
    for a, b in zip(
        jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(run)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    ckpt.export_ema_params(tmp_path / "export", run)
    exported = ckpt.load_exported(tmp_path / "export")
    np.testing.assert_array_equal(
        exported["dense"]["kernel"], run["ema"].shadow(model=run["model"])["dense"]["kernel"]
    )


def test_shard_over_splits_the_anchor_like_the_accumulators_and_keeps_the_values():
    """``shard_over="data"`` on 8 devices: the anchor is split like the accumulators (1/8
    per device), and the shadow is the unsharded rule's."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",))
    thetas = [jnp.arange(32.0).reshape(8, 4) * (1 + 0.1 * t) for t in range(5)]
    placed = [jax.device_put(x, NamedSharding(mesh, P())) for x in thetas]
    rule = ema_jax.bema(shard_over="data", start_step=1)
    sharded, state = _run(rule, placed)
    assert state.anchor.sharding.spec == state.average.ema.sharding.spec == P("data", None)
    assert state.anchor.addressable_shards[0].data.shape == (1, 4)
    plain, _ = _run(ema_jax.bema(start_step=1), thetas)
    for a, b in zip(sharded, plain, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_switch_makes_bema_of_the_params_the_new_params():
    """Switch EMA with BEMA: the params become the shadow the state deployed, the rest of
    the state goes on unchanged (Linen and NNX)."""
    state = _train_state()
    for i in range(4):
        state = _STEP(state, _grads(i))
    deployed = np.asarray(state.ema_params["w"])
    switched = jax.jit(lambda s: s.switch())(state)
    np.testing.assert_array_equal(switched.params["w"], deployed)
    for a, b in zip(
        jax.tree.leaves(switched.ema_state), jax.tree.leaves(state.ema_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    run = _nnx_run(3)
    expected = run["ema"].shadow(model=run["model"])["dense"]["kernel"]
    run["ema"].switch(run["model"])
    np.testing.assert_array_equal(run["model"].dense.kernel[...], expected)
