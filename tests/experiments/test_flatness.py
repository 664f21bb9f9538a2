"""experiments.flatness: the weight-noise probe against a closed form."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.flatness import perturbed_losses


def test_perturbation_probe_matches_quadratic_closed_form():
    """For L(θ) = Σθ², E[L(θ + ε)] − L(θ) = Σ_l n_l·(r·rms θ_l)² = r²·L(θ)."""
    params = {"a": jnp.linspace(-1.0, 2.0, 50), "b": jnp.full((4, 5), 3.0)}

    def loss(p):
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

    out = perturbed_losses(loss, params, [0.1, 0.3], jax.random.key(0), draws=32)
    base = float(loss(params))
    np.testing.assert_allclose(out["0.1"], 0.01 * base, rtol=0.1)
    np.testing.assert_allclose(out["0.3"], 0.09 * base, rtol=0.1)

    # The noise is scaled per leaf: a loss of leaf "a" alone rises by r²·Σa². (One rms over
    # all leaves would give n_a·r²·(Σa² + Σb²)/70, 3.3× as much here.)
    def loss_a(p):
        return jnp.sum(p["a"] ** 2)

    out = perturbed_losses(loss_a, params, [0.3], jax.random.key(1), draws=32)
    np.testing.assert_allclose(out["0.3"], 0.09 * float(loss_a(params)), rtol=0.1)
