"""Decay schedules against their closed forms, their bad arguments, and equality by value."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ema_jax
from ema_jax import schedules

TS = [0, 1, 2, 10, 100, 10_000, 1_000_000]


def _tf_warmup(beta):
    return lambda t: min(beta, (1 + t) / (10 + t))


def _inverse_power(inv_gamma, power, lo, hi):
    return lambda t: float(np.clip(1 - (1 + t / inv_gamma) ** (-power), lo, hi))


def _power_function(gamma):
    return lambda t: 0.0 if t <= 1 else (1 - 1 / t) ** (gamma + 1)


# γ for σ_rel = 0.10, found by bisection on σ_rel(γ) = sqrt(γ+1) / ((γ+2)·sqrt(γ+3)),
# independently of ema_jax.window (checked there too).
def _gamma_for(sigma_rel):
    lo, hi = -0.3819660112501051, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if math.sqrt(mid + 1) / ((mid + 2) * math.sqrt(mid + 3)) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return lo


CASES = {
    "constant": (schedules.constant(0.999), lambda t: 0.999),
    "tf_warmup": (schedules.tf_warmup(0.9999), _tf_warmup(0.9999)),
    "tf_warmup_0.99": (schedules.tf_warmup(0.99), _tf_warmup(0.99)),
    "inverse_power": (schedules.inverse_power(), _inverse_power(1.0, 2 / 3, 0.0, 0.9999)),
    "inverse_power_3/4": (
        schedules.inverse_power(inv_gamma=2.0, power=0.75, min_decay=0.1, max_decay=0.99999),
        _inverse_power(2.0, 0.75, 0.1, 0.99999),
    ),
    "power_function": (schedules.power_function(6.94), _power_function(6.94)),
    "power_function_sigma_rel": (
        schedules.power_function(sigma_rel=0.10),
        _power_function(_gamma_for(0.10)),
    ),
    "from_half_life": (schedules.from_half_life(100), lambda t: 0.5 ** (1 / 100)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_equals_closed_form(name):
    """Each schedule equals its closed form at t ∈ {0, 1, 2, 10, 100, 1e4, 1e6},
    eagerly and under jit with a traced int32 t; the result is a float32 scalar.

    atol 1e-7: β is a float32 near 1, whose spacing is 6e-8.
    """
    schedule, closed_form = CASES[name]
    jitted = jax.jit(schedule)
    for t in TS:
        expected = closed_form(t)
        for value in (schedule(jnp.int32(t)), jitted(jnp.int32(t))):
            assert value.dtype == jnp.float32 and value.shape == ()
            np.testing.assert_allclose(
                float(value), expected, rtol=1e-6, atol=1e-7, err_msg=f"t={t}"
            )


def test_schedules_reach_their_plateaus():
    """The documented milestones (so the closed forms above are not vacuous)."""
    assert float(schedules.tf_warmup(0.9999)(jnp.int32(1_000_000))) == np.float32(0.9999)
    # inverse_power(power=2/3) reaches 0.999 at ~31.6k steps, 3/4 at ~10k steps.
    two_thirds = schedules.inverse_power(max_decay=0.99999)
    three_quarters = schedules.inverse_power(power=0.75, max_decay=0.99999)
    assert float(two_thirds(jnp.int32(31_000))) < 0.999 < float(two_thirds(jnp.int32(32_000)))
    assert (
        float(three_quarters(jnp.int32(9_900))) < 0.999 < float(three_quarters(jnp.int32(10_100)))
    )
    # power_function: β_1 = 0 (first update copies), then increasing towards 1.
    pf = schedules.power_function(sigma_rel=0.05)
    values = [float(pf(jnp.int32(t))) for t in TS]
    assert values[:2] == [0.0, 0.0] and all(a < b for a, b in itertools.pairwise(values[1:]))
    # from_half_life: the average halves its weight in exactly h steps.
    assert float(schedules.from_half_life(37.0)(jnp.int32(5))) ** 37 == pytest.approx(0.5, rel=1e-5)


def test_schedule_as_decay_under_vmap():
    """Schedules are plain jax functions: they vectorise over t."""
    ts = jnp.asarray(TS, jnp.int32)
    got = jax.vmap(schedules.tf_warmup(0.999))(ts)
    np.testing.assert_allclose(got, [_tf_warmup(0.999)(t) for t in TS], rtol=1e-6)


@pytest.mark.parametrize(
    ("make", "error", "names"),
    [
        (lambda: schedules.constant(1.0), ValueError, "decay"),
        (lambda: schedules.constant(float("nan")), ValueError, "decay"),
        (lambda: schedules.constant(True), TypeError, "decay"),
        (lambda: schedules.tf_warmup(1.0), ValueError, "decay"),
        (lambda: schedules.tf_warmup(-0.5), ValueError, "decay"),
        (lambda: schedules.inverse_power(inv_gamma=0.0), ValueError, "inv_gamma"),
        (lambda: schedules.inverse_power(inv_gamma=float("inf")), ValueError, "inv_gamma"),
        (lambda: schedules.inverse_power(power=-1.0), ValueError, "power"),
        (lambda: schedules.inverse_power(power="2/3"), TypeError, "power"),
        (lambda: schedules.inverse_power(max_decay=1.0), ValueError, "max_decay"),
        (lambda: schedules.inverse_power(min_decay=-0.1), ValueError, "min_decay"),
        (lambda: schedules.inverse_power(min_decay=0.9, max_decay=0.5), ValueError, "min_decay"),
        (lambda: schedules.power_function(), ValueError, "gamma or sigma_rel"),
        (lambda: schedules.power_function(1.0, sigma_rel=0.1), ValueError, "gamma or sigma_rel"),
        (lambda: schedules.power_function(-1.0), ValueError, "gamma"),
        (lambda: schedules.power_function(float("nan")), ValueError, "gamma"),
        (lambda: schedules.power_function(True), TypeError, "gamma"),
        (lambda: schedules.power_function(sigma_rel=0.31), ValueError, "sigma_rel"),
        (lambda: schedules.power_function(sigma_rel=0.0), ValueError, "sigma_rel"),
        (lambda: schedules.from_half_life(0.0), ValueError, "steps"),
        (lambda: schedules.from_half_life(-3.0), ValueError, "steps"),
        (lambda: schedules.from_half_life(float("nan")), ValueError, "steps"),
        (lambda: schedules.from_half_life("10"), TypeError, "steps"),
        (lambda: schedules.from_half_life(1e17), ValueError, "steps=1e+17"),
        (lambda: schedules.from_half_life(1e9), ValueError, "steps=1000000000.0 is out of range"),
        (lambda: schedules.constant(0.99999999), ValueError, "rounds to 1.0 in float32"),
    ],
)
def test_bad_schedule_arguments_raise_naming_them(make, error, names):
    """Schedule constructors reject bad arguments, naming them."""
    with pytest.raises(error) as info:
        make()
    assert names in str(info.value)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: schedules.tf_warmup(0.999999999), r"decay=0.999999999 .*rounds to 1.0 in float32"),
        (
            lambda: schedules.inverse_power(max_decay=0.99999999),
            r"max_decay=0.99999999 .*rounds to 1.0 in float32",
        ),
    ],
    ids=["tf_warmup", "inverse_power"],
)
def test_a_decay_argument_rounding_to_one_is_refused(make, match):
    """Every schedule with a decay argument refuses one that rounds to 1.0 in float32 (as
    ``constant`` and ``from_half_life`` do), naming it: such an average never moves."""
    with pytest.raises(ValueError, match=match):
        make()


FACTORIES = {
    "constant": lambda: schedules.constant(0.9),
    "tf_warmup": lambda: schedules.tf_warmup(0.99),
    "inverse_power": lambda: schedules.inverse_power(power=0.75),
    "power_function": lambda: schedules.power_function(sigma_rel=0.1),
    "from_half_life": lambda: schedules.from_half_life(10.0),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_schedules_are_equal_and_hash_alike_by_value(name):
    """Two schedules built with the same arguments are equal and hash alike, and so are the
    transforms built from them (a transform is a static, hashed part of a jitted step);
    other arguments make a different schedule."""
    make = FACTORIES[name]
    assert make() == make() and hash(make()) == hash(make())
    assert ema_jax.ema(make()) == ema_jax.ema(make())
    assert hash(ema_jax.ema((make(), 0.5))) == hash(ema_jax.ema((make(), 0.5)))
    others = [FACTORIES[other]() for other in FACTORIES if other != name]
    assert all(make() != other for other in others)
    assert schedules.constant(0.9) != schedules.constant(0.99)


def test_closed_form_products_are_recognised_by_the_protocol():
    """``constant`` and ``power_function`` give ``decay_product(t, n)`` in closed form (the
    :class:`~ema_jax.schedules.ClosedFormProduct` protocol); it equals the product of the
    per-step decays. A plain function with such an attribute satisfies the protocol too."""
    t, n = jnp.int32(50), jnp.int32(4)
    for schedule in (schedules.constant(0.9), schedules.power_function(gamma=6.94)):
        assert isinstance(schedule, schedules.ClosedFormProduct)
        steps = [float(schedule(jnp.int32(j))) for j in range(47, 51)]
        assert float(schedule.decay_product(t, n)) == pytest.approx(math.prod(steps), rel=1e-5)
    assert not isinstance(schedules.tf_warmup(0.99), schedules.ClosedFormProduct)

    def halving(t):
        return jnp.float32(0.5)

    halving.decay_product = lambda t, n: 0.5 ** n.astype(jnp.float32)  # type: ignore[attr-defined]
    assert isinstance(halving, schedules.ClosedFormProduct)


def test_any_callable_is_a_schedule():
    """A plain function ``t -> β_t`` is a decay as before (the dataclasses are no
    requirement): the average follows a float64 loop with its decays."""
    tx = ema_jax.ema(lambda t: jnp.where(t < 3, 0.0, 0.5).astype(jnp.float32))
    state = tx.init(jnp.zeros(1))
    outs = []
    for theta in (1.0, 2.0, 3.0, 4.0):
        out, state = tx.update(jnp.full(1, theta, jnp.float32), state)
        outs.append(float(out[0]))
    assert outs == [1.0, 2.0, 2.5, 3.25]


def test_half_life_is_a_deprecated_alias_of_from_half_life():
    """``schedules.half_life(steps)`` (named like ``ema_jax.half_life(decay)``, which goes the
    other way) still works, warns ``DeprecationWarning`` and names the new name."""
    with pytest.warns(DeprecationWarning, match=r"use ema_jax\.schedules\.from_half_life"):
        old = schedules.half_life(37.0)
    assert old == schedules.from_half_life(37.0)
    assert ema_jax.half_life(float(old(jnp.int32(1)))) == pytest.approx(37.0, rel=1e-4)


def _no_closed_form(t):
    return 0.999 - 0.5 / (jnp.asarray(t, schedules.default_float()) + 2.0)


def test_a_long_update_interval_costs_memory_independent_of_it():
    """``update_every=k`` with a schedule without a closed form multiplies the decays of
    the n <= k steps an update stands for: with k = 2**31 - 1 it compiles to a few KB of
    scratch (not k evaluations at once), and a window of 300 steps (two chunks) equals the
    float64 product of the schedule at those steps."""
    from ema_jax import _kernel

    k = 2**31 - 1
    scratch = (
        jax.jit(lambda t: _kernel.decays_at([_no_closed_form], t, k, start_step=k - 300))
        .lower(jnp.int32(k))
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
    )
    assert scratch < 2**20
    got = _kernel.decays_at([_no_closed_form], jnp.int32(k), k, start_step=k - 300)
    steps = np.arange(k - 299, k + 1, dtype=np.float64)
    np.testing.assert_allclose(got, [np.prod(0.999 - 0.5 / (steps + 2.0))], rtol=1e-5)


@pytest.mark.parametrize(("k", "n"), [(1, 1), (4, 3), (4, 4), (256, 200)])
def test_short_update_intervals_multiply_the_decays_of_one_vectorised_call(k, n):
    """For k up to the chunk size the product is bitwise that of one ``vmap`` over the k
    steps ``t, ..., t-k+1`` with the first n kept (what ``update_every`` always computed)."""
    from ema_jax import _kernel

    t = jnp.int32(1000)
    back = jnp.arange(k, dtype=jnp.int32)
    betas = jax.vmap(_no_closed_form)(t - back)
    want = jnp.prod(jnp.where(back < n, betas, 1.0))
    got = jax.jit(_kernel.window_decay, static_argnums=(0, 3))(_no_closed_form, t, jnp.int32(n), k)
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def _two_decays(t):
    return jnp.full((2,), 0.9)


NON_SCALAR = {
    "one schedule": (_two_decays, 1, "decay"),
    "one schedule, update_every": (_two_decays, 3, "decay"),
    "the second of two": ((0.9, _two_decays), 1, r"decay\[1\]"),
    "the second of two, update_every": ((0.9, _two_decays), 3, r"decay\[1\]"),
}


@pytest.mark.parametrize(("decay", "update_every", "name"), NON_SCALAR.values(), ids=NON_SCALAR)
def test_a_schedule_returning_several_numbers_is_refused_naming_the_decay(
    decay, update_every, name
):
    rule = ema_jax.ema(decay, update_every=update_every)
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=rf"^{name} is a schedule that returned shape \(2,\)"):
        rule.update(params, rule.init(params))
