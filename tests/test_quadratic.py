r"""Direction tests on a noisy quadratic with known noise.

Per-example loss :math:`\ell_i(\theta) = \tfrac12\lVert\theta-\theta^\star\rVert^2 + \sigma\langle\xi_i,\theta\rangle`
with :math:`\xi_i\sim\mathcal N(0, I_d)`: :math:`\nabla F = \theta-\theta^\star`, :math:`\operatorname{tr}\Sigma
= d\sigma^2`. The norm test passes iff :math:`d\sigma^2/b \le \eta^2\lVert\theta-\theta^\star\rVert^2`: far from
the optimum (signal dominates) the batch stays put; as SGD closes in, noise dominates and the batch grows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adabatch

D, ETA, B0, B_MAX = 10, 0.5, 8, 1024


@functools.cache
def _step(make_tx):
    """The jitted training step of ``make_tx()``, with the noise level σ traced: one compilation serves every σ."""
    tx = make_tx()

    def loss_fn(theta, xi, sigma):
        return 0.5 * jnp.sum(theta**2) + sigma * xi @ theta  # θ* = 0

    @jax.jit
    def step(theta, state, key, sigma):
        xi = jax.random.normal(key, (B_MAX, D))
        mask = jnp.arange(B_MAX) < adabatch.next_batch_size(state)
        stats = adabatch.grad_stats(lambda t, x: loss_fn(t, x, sigma), theta, xi, mask=mask)
        updates, state = tx.update(stats.mean, state, theta, grad_stats=stats)
        return optax.apply_updates(theta, updates), state

    return tx, step


def _run(make_tx, sigma, steps, seed=0):
    """Train with batches of the decided size (a fixed buffer of B_MAX examples, the rest masked out)."""
    tx, step = _step(make_tx)
    theta, state = jnp.full(D, 10.0), tx.init(jnp.zeros(D))
    assert int(adabatch.next_batch_size(state)) == B0
    sizes, distances = [], []
    for key in jax.random.split(jax.random.key(seed), steps):
        theta, state = step(theta, state, key, jnp.float32(sigma))
        sizes.append(int(adabatch.next_batch_size(state)))
        distances.append(float(jnp.sum(theta**2)))
    return np.array(sizes), np.array(distances)


def _sgd_with_norm_test():
    return optax.chain(adabatch.norm_test(ETA, init_batch_size=B0, max_batch_size=B_MAX), optax.sgd(0.1))


def _adadagrad_norm():
    return adabatch.adadagrad_norm(10.0, eta=ETA, init_batch_size=B0, max_batch_size=B_MAX)


def test_batch_grows_when_noise_dominates():
    sizes, distances = _run(_sgd_with_norm_test, sigma=1.0, steps=80)
    threshold = D * 1.0 / (B0 * ETA**2)  # ‖θ−θ*‖² below which a batch of B0 fails the test
    far = distances > 10 * threshold
    assert far[:10].all()
    assert (sizes[: np.argmin(far)] == B0).all()  # signal dominates: stays put
    assert sizes[-1] >= 4 * B0  # noise dominates near the optimum: grows
    assert (np.diff(sizes) >= 0).all()


def test_batch_stays_put_when_noise_is_small():
    sizes, distances = _run(_sgd_with_norm_test, sigma=1e-3, steps=40)
    assert distances[-1] > 1e-2  # still far from the optimum relative to the noise
    assert (sizes == B0).all()


def test_adadagrad_norm_grows_under_noise():
    sizes, distances = _run(_adadagrad_norm, sigma=1.0, steps=100)
    assert sizes[0] == B0 and sizes[-1] >= 4 * B0
    assert distances[-1] < 1e-2 * distances[0]
