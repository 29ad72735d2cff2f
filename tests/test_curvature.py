"""adabatch.curvature against dense matrices: HVP and GGN products, Lanczos extremal eigenvalues, SLQ traces.

The model is a small tanh MLP (6-8-3, 83 parameters) with softmax cross-entropy, small enough for
``jax.hessian`` of the mean loss on the raveled parameters and for the dense Gauss-Newton matrix
``Σ_i J_iᵀ H_i J_i / b``; eigenvalues come from ``numpy.linalg.eigh`` in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from adabatch.curvature import (
    ModelLoss,
    Spectrum,
    curvature_matvec,
    density,
    ggn_vp,
    hessian_spectrum,
    hvp,
    lambda_max,
    lambda_min,
    lanczos,
    operator_spectrum,
    trace_moment,
)

B, D_IN, HIDDEN, CLASSES = 32, 6, 8, 3


def model_fn(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


output_loss = optax.softmax_cross_entropy_with_integer_labels
LOSS = ModelLoss(model_fn, output_loss)


def problem(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, D_IN)), dtype)
    y = jnp.asarray(rng.integers(0, CLASSES, B), jnp.int32)
    params = {
        "w1": jnp.asarray(0.7 * rng.standard_normal((D_IN, HIDDEN)), dtype),
        "b1": jnp.asarray(0.1 * rng.standard_normal(HIDDEN), dtype),
        "w2": jnp.asarray(0.7 * rng.standard_normal((HIDDEN, CLASSES)), dtype),
        "b2": jnp.zeros(CLASSES, dtype),
    }
    return params, (x, y)


@functools.partial(jax.jit, static_argnums=0)
def dense_hessian(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: jnp.mean(loss_fn(unravel(f), batch)))(flat)


@functools.partial(jax.jit, static_argnums=(0, 1))
def dense_ggn(model, out_loss, params, batch):
    inputs, targets = batch
    flat, unravel = ravel_pytree(params)
    outputs = model(params, inputs)
    jac = jax.jacobian(lambda f: model(unravel(f), inputs))(flat)  # (b, c, d)
    h_out = jax.vmap(jax.hessian(lambda z, t: out_loss(z[None], t[None])[0]))(outputs, targets)  # (b, c, c)
    return jnp.einsum("bcd,bce,bef->df", jac, h_out, jac) / outputs.shape[0]


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def random_like(params, seed=1):
    f, unravel = ravel_pytree(params)
    return unravel(jnp.asarray(np.random.default_rng(seed).standard_normal(f.size), f.dtype))


@jax.jit
def products(params, batch, vector, mask):
    """hvp, ggn_vp and the linearised operators of both, in one compilation."""
    return (
        hvp(LOSS, params, batch, vector, mask=mask),
        ggn_vp(model_fn, output_loss, params, batch, vector, mask=mask),
        curvature_matvec(LOSS, params, batch, mask=mask)(vector),
        curvature_matvec(LOSS, params, batch, matrix="ggn", mask=mask)(vector),
    )


STEPS, PROBES = 30, 8


@functools.partial(jax.jit, static_argnums=0)
def spectrum_of(matrix, params, batch, key, preconditioner):
    return hessian_spectrum(
        LOSS, params, batch, key=key, num_steps=STEPS, num_probes=PROBES, matrix=matrix, preconditioner=preconditioner
    )


def ones_like(params):
    return jax.tree_util.tree_map(jnp.ones_like, params)


@pytest.fixture(scope="module")
def f64():
    """The float64 problem, its dense Hessian and GGN, and their spectra (float64 on while they are computed)."""
    with jax.enable_x64(True):
        params, batch = problem(np.float64)
        h = np.asarray(dense_hessian(LOSS, params, batch))
        g = np.asarray(dense_ggn(model_fn, output_loss, params, batch))
        return params, batch, h, g


def x64(test):
    """Run ``test`` with float64 on."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return test(*args, **kwargs)

    return wrapper


@x64
def test_hvp_and_ggn_vp_equal_the_dense_products(f64):
    params, batch, h, g = f64
    v = random_like(params)
    hv, gv, hv_lin, gv_lin = map(flat, products(params, batch, v, jnp.ones(B)))
    assert hv == pytest.approx(h @ flat(v), abs=1e-6)
    assert gv == pytest.approx(g @ flat(v), abs=1e-6)
    # The linearised operators (what the spectra use) give the same products.
    assert hv_lin == pytest.approx(h @ flat(v), abs=1e-6)
    assert gv_lin == pytest.approx(g @ flat(v), abs=1e-6)


@x64
def test_masked_examples_contribute_nothing(f64):
    """Half the batch masked out equals the kept half alone (here: the kept half twice, the same mean at the same
    shape, so one compilation serves both); the masked rows hold other data."""
    params, (x, y), _, _ = f64
    keep = np.zeros(B, bool)
    keep[np.random.default_rng(2).permutation(B)[: B // 2]] = True
    v = random_like(params)
    masked = products(params, (x, y), v, jnp.asarray(keep, jnp.float64))  # float weights in {0, 1}
    kept_twice = (jnp.concatenate([x[keep], x[keep]]), jnp.concatenate([y[keep], y[keep]]))
    reference = products(params, kept_twice, v, jnp.ones(B))
    for a, b in zip(masked, reference, strict=True):
        assert flat(a) == pytest.approx(flat(b), abs=1e-10)
    assert np.abs(flat(masked[0]) - flat(products(params, (x, y), v, jnp.ones(B))[0])).max() > 1e-3


@pytest.mark.parametrize(("dtype", "rtol"), [("float64", 1e-4), ("float32", 1e-2)])
def test_extremal_eigenvalues_from_30_lanczos_steps(f64, dtype, rtol):
    _, _, h, g = f64
    with jax.enable_x64(dtype == "float64"):
        params, batch = problem(np.dtype(dtype))
        for matrix, dense in [("hessian", h), ("ggn", g)]:
            if dtype == "float32" and matrix == "ggn":
                continue  # one float32 compilation is enough
            s = spectrum_of(matrix, params, batch, jax.random.key(0), ones_like(params))
            assert s.nodes.dtype == np.dtype(dtype) and s.nodes.shape == (PROBES, STEPS)
            ev = np.linalg.eigvalsh(dense)
            assert float(lambda_max(s)) == pytest.approx(ev[-1], rel=rtol)
            if matrix == "hessian":  # indefinite away from a minimum
                assert ev[0] < -0.1 * ev[-1]
                assert float(lambda_min(s)) == pytest.approx(ev[0], rel=rtol)
            else:  # the GGN is positive semi-definite: λ_min ≈ 0
                assert float(lambda_min(s)) == pytest.approx(ev[0], abs=rtol * ev[-1])


@x64
def test_slq_traces_within_three_standard_errors(f64):
    params, batch, h, _ = f64
    d = h.shape[0]
    key = jax.random.key(3)
    s = spectrum_of("hessian", params, batch, key, ones_like(params))
    assert int(s.dim) == d
    for k, exact in [(1, np.trace(h) / d), (2, np.trace(h @ h) / d)]:
        per = np.asarray(trace_moment(s, k, per_probe=True))
        se = per.std(ddof=1) / np.sqrt(per.size)
        assert abs(float(s.trace_moment(k)) - exact) < 3 * se, (k, float(s.trace_moment(k)), exact, se)
    # Gauss quadrature with m nodes is exact up to degree 2m - 1: per probe, Σ τ θ^k = vᵀ H^k v.
    probes = np.asarray(jax.random.rademacher(key, (PROBES, d), jnp.float64)) / np.sqrt(d)
    h3 = np.linalg.matrix_power(h, 3)
    np.testing.assert_allclose(trace_moment(s, 3, per_probe=True), np.einsum("pi,ij,pj->p", probes, h3, probes))
    assert float(trace_moment(s, 0)) == pytest.approx(1.0)


@x64
def test_preconditioned_spectrum(f64):
    params, batch, h, _ = f64
    f, unravel = ravel_pytree(params)
    p = np.random.default_rng(4).uniform(0.2, 2.0, f.size)
    ev = np.linalg.eigvalsh(h / np.sqrt(np.outer(p, p)))  # P^{-1/2} H P^{-1/2}
    s = spectrum_of("hessian", params, batch, jax.random.key(0), unravel(jnp.asarray(p)))
    assert float(s.lambda_max) == pytest.approx(ev[-1], rel=1e-4)
    assert float(s.lambda_min) == pytest.approx(ev[0], rel=1e-4)


def dense_tridiagonal(res):
    return np.diag(res.alphas) + np.diag(res.betas, 1) + np.diag(res.betas, -1)


@functools.partial(jax.jit, static_argnums=(1, 2))
def lanczos_and_spectrum(a, num_steps, num_probes, v0, key):
    s = operator_spectrum(lambda x: a @ x, v0, key=key, num_steps=num_steps, num_probes=num_probes)
    probes = jax.random.rademacher(key, (num_probes, v0.size), v0.dtype) / np.sqrt(v0.size)  # the same probes
    return lanczos(lambda x: a @ x, v0, num_steps), s, probes


def test_lanczos_recovers_a_known_spectrum_and_stops_at_a_breakdown():
    """In float32 (float64 runs on the MLP above)."""
    dtype = np.float32
    rng = np.random.default_rng(5)
    n = 40
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigs = np.linspace(-1.0, 10.0, n)
    tol = 1e-5
    key = jax.random.key(1)
    v0 = jnp.asarray(rng.standard_normal(n), dtype)
    # Full rank, m = d: the tridiagonal is similar to the matrix.
    res, _, _ = lanczos_and_spectrum(jnp.asarray((q * eigs) @ q.T, dtype), n, 3, v0, key)
    assert bool(jnp.all(res.valid))
    np.testing.assert_allclose(np.linalg.eigvalsh(dense_tridiagonal(res)), eigs, atol=100 * tol)
    # Rank 3: the Krylov space of a generic v0 is invariant after 4 vectors (3 eigenspaces + the null space),
    # then the basis stops growing (same compiled code, another matrix).
    low = jnp.asarray((q[:, :3] * np.array([1.0, 2.0, 5.0])) @ q[:, :3].T, dtype)
    res, s, probes = lanczos_and_spectrum(low, n, 3, v0, key)
    assert res.valid.tolist() == [True] * 4 + [False] * (n - 4)
    assert np.all(np.asarray(res.alphas[4:]) == 0) and np.all(np.asarray(res.betas[3:]) == 0)
    np.testing.assert_allclose(np.linalg.eigvalsh(dense_tridiagonal(res))[-3:], [1.0, 2.0, 5.0], atol=100 * tol)
    assert np.all(np.isfinite(s.nodes)) and np.all(np.isfinite(s.weights))
    assert float(s.lambda_max) == pytest.approx(5.0, rel=100 * tol)
    assert float(s.lambda_min) == pytest.approx(0.0, abs=100 * tol)
    # The quadrature stays exact after the breakdown: Σ τ θ^k = vᵀ A^k v for each probe.
    probes = np.asarray(probes, np.float64)
    for k in (0, 1, 2, 3):
        exact = np.einsum("pi,ij,pj->p", probes, np.linalg.matrix_power(np.asarray(low, np.float64), k), probes)
        np.testing.assert_allclose(s.trace_moment(k, per_probe=True), exact, rtol=100 * tol, atol=100 * tol)


def test_lanczos_on_a_pytree_start_vector():
    scale = {"u": jnp.array([1.0, 2.0]), "v": jnp.array([[3.0]])}
    res = lanczos(
        lambda t: jax.tree_util.tree_map(jnp.multiply, t, scale), jax.tree_util.tree_map(jnp.ones_like, scale), 3
    )
    np.testing.assert_allclose(np.linalg.eigvalsh(dense_tridiagonal(res)), [1.0, 2.0, 3.0], atol=1e-5)


def test_zero_hessian_gives_a_spectrum_of_zeros():
    def loss_fn(p, x):
        return x @ p["w"] + p["b"]  # linear in the parameters: H = 0

    params = {"w": jnp.ones(5), "b": jnp.zeros(())}
    s = hessian_spectrum(loss_fn, params, jnp.ones((4, 5)), key=jax.random.key(0), num_steps=6, num_probes=3)
    assert s.nodes.shape == (3, 6)
    np.testing.assert_array_equal(s.nodes, 0.0)
    np.testing.assert_allclose(np.sum(s.weights, axis=1), 1.0, rtol=1e-6)
    assert float(s.lambda_max) == 0.0 and float(s.lambda_min) == 0.0
    assert float(trace_moment(s, 1)) == 0.0 and float(trace_moment(s, 2)) == 0.0
    assert np.all(np.isfinite(density(s, jnp.linspace(-1, 1, 5), 0.1)))


def test_density_integrates_to_one():
    rng = np.random.default_rng(6)
    weights = rng.random((3, 5))
    s = Spectrum(
        jnp.asarray(rng.standard_normal((3, 5))), jnp.asarray(weights / weights.sum(1, keepdims=True)), jnp.asarray(5)
    )
    grid = np.linspace(-8, 8, 4001)
    phi = np.asarray(s.density(grid, 0.2))
    assert np.all(phi >= 0)
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-5)


@x64
def test_a_flax_linen_model_plugs_into_ggn_vp(f64):
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            hidden = nn.tanh(nn.Dense(HIDDEN)(x))
            return nn.Dense(CLASSES)(hidden)

    params, (x, y), _, g = f64
    model = MLP()
    # The MLP of the other tests, as a linen module: its GGN is the dense ``g``.
    variables = {
        "params": {
            "Dense_0": {"kernel": params["w1"], "bias": params["b1"]},
            "Dense_1": {"kernel": params["w2"], "bias": params["b2"]},
        }
    }
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        jax.eval_shape(model.init, jax.random.key(0), x)
    )
    v = random_like(params)
    expected = g @ flat(v)
    v_linen = {"Dense_0": {"kernel": v["w1"], "bias": v["b1"]}, "Dense_1": {"kernel": v["w2"], "bias": v["b2"]}}

    def apply(p, inputs):
        return model.apply({"params": p}, inputs)

    @jax.jit
    def both(variables, v):
        # As it is (the variables dict as params), or the "params" collection as a training loop holds them.
        return ggn_vp(model.apply, output_loss, variables, (x, y), {"params": v}), ggn_vp(
            apply, output_loss, variables["params"], (x, y), v
        )

    for got in both(variables, v_linen):
        got = got.get("params", got)
        as_problem = {"w1": got["Dense_0"]["kernel"], "b1": got["Dense_0"]["bias"]}
        as_problem |= {"w2": got["Dense_1"]["kernel"], "b2": got["Dense_1"]["bias"]}
        assert flat(as_problem) == pytest.approx(expected, abs=1e-6)


def test_bad_input_raises_value_errors_naming_the_argument():
    params, batch = problem(np.float32)
    key = jax.random.key(0)
    d = ravel_pytree(params)[0].size
    spectrum = functools.partial(hessian_spectrum, LOSS, params, batch, key=key)
    for steps in (d + 1, 0, -3):
        with pytest.raises(ValueError, match="num_steps"):
            spectrum(num_steps=steps)
    for probes in (0, -1):
        with pytest.raises(ValueError, match="num_probes"):
            spectrum(num_steps=5, num_probes=probes)
    with pytest.raises(ValueError, match="matrix"):
        spectrum(num_steps=5, matrix="fisher")
    with pytest.raises(ValueError, match="loss_fn must be an adabatch.curvature.ModelLoss"):
        hessian_spectrum(lambda p, b: LOSS(p, b), params, batch, key=key, num_steps=5, matrix="ggn")
    with pytest.raises(ValueError, match="preconditioner must have the tree structure"):
        spectrum(num_steps=5, preconditioner={"w1": params["w1"]})
    with pytest.raises(ValueError, match="preconditioner must have finite entries > 0"):
        spectrum(num_steps=5, preconditioner=jax.tree_util.tree_map(jnp.zeros_like, params))
    for steps in (5, 0):
        with pytest.raises(ValueError, match="num_steps"):
            lanczos(lambda v: v, jnp.ones(4), steps)

    # Products: traced only (the checks run before anything is compiled).
    h = jax.jit(hvp, static_argnums=0)
    g = jax.jit(ggn_vp, static_argnums=(0, 1))
    v = random_like(params)
    with pytest.raises(ValueError, match="vector must have the tree structure"):
        h(LOSS, params, batch, {"w1": v["w1"]})
    with pytest.raises(ValueError, match=r"vector\['b1'\] must have the shape"):
        h(LOSS, params, batch, {**v, "b1": jnp.zeros(HIDDEN + 1)})
    with pytest.raises(ValueError, match="vector must have the tree structure"):
        g(model_fn, output_loss, params, batch, [v])

    def mean_loss(p, b):
        return jnp.mean(LOSS(p, b))

    with pytest.raises(ValueError, match="loss_fn must return per-example losses"):
        h(mean_loss, params, batch, v)
    with pytest.raises(ValueError, match="loss_fn must return per-example losses"):
        hessian_spectrum(mean_loss, params, batch, key=key, num_steps=5)
    with pytest.raises(ValueError, match="output_loss_fn must return per-example losses"):
        g(model_fn, lambda z, t: jnp.mean(output_loss(z, t)), params, batch, v)
    with pytest.raises(ValueError, match="batch must be a pair"):
        g(model_fn, output_loss, params, batch[0], v)
    with pytest.raises(ValueError, match="mask must have shape"):
        h(LOSS, params, batch, v, mask=jnp.ones(B + 1))
    s = Spectrum(jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]]), jnp.asarray(2))
    with pytest.raises(ValueError, match="sigma"):
        density(s, jnp.zeros(3), 0.0)
    with pytest.raises(ValueError, match="k must be an integer"):
        trace_moment(s, -1)


SHARDED_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import tests.test_curvature as t
from adabatch.curvature import hessian_spectrum

params, batch = t.problem(np.float32)
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
key = jax.random.key(7)
out = {"devices": len(jax.devices()), "shards": len(sharded[0].sharding.device_set)}
for matrix in ("hessian", "ggn"):
    def spectrum(p, b, k, matrix=matrix):
        return hessian_spectrum(t.LOSS, p, b, key=k, num_steps=20, num_probes=3, matrix=matrix)
    one = jax.jit(spectrum)(params, batch, key)
    lowered = jax.jit(spectrum).lower(params, sharded, key)
    many = lowered.compile()(params, sharded, key)
    out[matrix] = {
        "one": [np.asarray(one.nodes).tolist(), np.asarray(one.weights).tolist()],
        "mesh": [np.asarray(many.nodes).tolist(), np.asarray(many.weights).tolist()],
        "all_reduce": "all-reduce" in lowered.compile().as_text(),
    }
print("RESULT" + json.dumps(out))
"""


def test_spectrum_with_the_batch_sharded_over_four_devices_equals_one_device():
    """The batch split over a 4-device ``data`` mesh (simulated CPU devices, so in a subprocess: the flag must be set
    before JAX starts): the products all-reduce over the devices and the spectrum is the single-device one."""
    import json
    import os
    import subprocess
    import sys

    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT") :])
    assert out["devices"] == 4 and out["shards"] == 4
    for matrix in ("hessian", "ggn"):
        got = out[matrix]
        assert got["all_reduce"], matrix  # the curvature products really are reduced across the devices
        (nodes_one, weights_one), (nodes_mesh, weights_mesh) = got["one"], got["mesh"]
        scale = np.abs(nodes_one).max()
        np.testing.assert_allclose(nodes_mesh, nodes_one, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(weights_mesh, weights_one, rtol=0, atol=1e-5)
