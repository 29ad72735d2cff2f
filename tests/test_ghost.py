"""Ghost statistics equal brute-force per-example gradients (vmap) for every supported layer, with the fallback
reported; forward-mode inner products equal brute force."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adabatch import ghost
from adabatch.flax.models import CNN, MLP, TransformerLM, classification_loss, language_model_loss
from adabatch.stats import grad_stats, inner_products, per_example_grads

RTOL = 1e-5


def _close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1e-30)
    assert np.max(np.abs(actual - expected)) <= rtol * scale, (actual, expected)


def _brute_force(grads, mask=None):
    """q, mean, S2 and Σ⟨g_i,ḡ⟩² straight from materialised per-example gradients, in NumPy float64."""
    rows = np.concatenate([np.asarray(g, np.float64).reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)], 1)
    w = np.ones(len(rows)) if mask is None else np.asarray(mask, np.float64)
    rows = rows * w[:, None]
    mean = rows.sum(0) / w.sum()
    return {
        "q": (rows**2).sum(),
        "mean": mean,
        "s2": (rows**2).sum(0),
        "inner": ((rows @ mean) ** 2).sum(),
        "inner_dev": (w * (rows @ mean - mean @ mean) ** 2).sum(),
        "count": int(w.sum()),
    }


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _init(model, seed, *args):
    """Random linen parameters without running ``model.init`` op by op (each of its ops would compile): the shapes
    from ``jax.eval_shape``, the values N(0, 0.5²) from NumPy. The statistics are checked for any parameter values."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), shapes)


def check_ghost(loss_fn, params, batch, *, mask=None, chunk_size=None, expect=None, ghost_form=None, s2=True):
    """Ghost (all statistics, with and without S2) equals brute force; returns the report."""

    @jax.jit  # one compilation for the brute force and both ghost variants
    def run(p, b):
        kw = {"method": "ghost", "mask": mask, "chunk_size": chunk_size, "ghost_form": ghost_form}
        full = grad_stats(loss_fn, p, b, sq_sum=True, inner_sq_sum=True, **kw) if s2 else None
        lean = grad_stats(loss_fn, p, b, inner_sq_sum=True, **kw)
        return per_example_grads(loss_fn, p, b), full, lean

    grads, full, lean = run(params, batch)
    ref = _brute_force(grads, mask)
    for stats in (full, lean) if s2 else (lean,):
        _close(stats.sq_norm_sum, ref["q"])
        _close(_flat(stats.mean), ref["mean"])
        _close(stats.inner_sq_sum, ref["inner"])
        _close(stats.inner_dev_sq_sum, ref["inner_dev"])
        assert int(stats.count) == ref["count"]
    if s2:
        _close(_flat(full.sq_sum), ref["s2"])
    report = ghost.ghost_report(loss_fn, params, batch)
    if expect is not None:
        assert report == expect
    return report


# ---------------------------------------------------------------------------------------------------------------
# Plain JAX layers, each form (T = 1, direct, Gram)


def _plain_model(p, x, ids):
    h = ghost.dense(x, p["d1"]["kernel"], p["d1"]["bias"])  # (b, T, 6): sequence axis
    h = ghost.layer(lambda q, z: z * q["scale"] + q["bias"], p["ln"], jnp.tanh(h))
    h = h + ghost.embed(p["emb"], ids)
    pooled = jnp.mean(h, axis=1)  # (b, 6): no sequence axis
    return ghost.dense(pooled, p["d2"]["kernel"])


def _plain_problem(key, b=6, t=5):
    k = jax.random.split(key, 8)
    params = {
        "d1": {"kernel": jax.random.normal(k[0], (4, 6)), "bias": jax.random.normal(k[1], (6,))},
        "ln": {"scale": jax.random.normal(k[2], (6,)), "bias": jax.random.normal(k[3], (6,))},
        "emb": jax.random.normal(k[4], (7, 6)),
        "d2": {"kernel": jax.random.normal(k[5], (6, 3))},
    }
    batch = (jax.random.normal(k[6], (b, t, 4)), jax.random.randint(k[7], (b, t), 0, 7), jnp.arange(b) % 3)

    def loss_fn(p, batch):
        x, ids, y = batch
        logits = _plain_model(p, x, ids)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]

    return loss_fn, params, batch


@pytest.mark.parametrize("ghost_form", [None, "direct", "gram"])  # the cost model's choice, then each form forced
def test_plain_jax_layers_match_vmap(ghost_form):
    loss_fn, params, batch = _plain_problem(jax.random.key(0))
    report = check_ghost(loss_fn, params, batch, ghost_form=ghost_form, s2=ghost_form != "gram")
    assert set(report.values()) == {"ghost"}


def test_plain_conv_and_mask_and_chunks():
    k = jax.random.split(jax.random.key(1), 4)
    params = {"c": jax.random.normal(k[0], (3, 3, 2, 4)), "b": jax.random.normal(k[1], (4,)), "w": jnp.ones((4, 3))}

    def loss_fn(p, x):
        h = ghost.conv(x, p["c"], p["b"], strides=(2, 1), padding=((1, 0), (2, 1)), kernel_dilation=(1, 2))
        return jnp.sum(jnp.mean(jnp.sin(h), axis=(1, 2)) @ p["w"], axis=-1)  # w used directly: vmap fallback

    x = jax.random.normal(k[2], (7, 6, 5, 2))
    mask = jnp.array([1, 0, 1, 1, 0, 1, 1], jnp.float32)
    expect = {"['b']": "ghost", "['c']": "ghost", "['w']": "vmap"}
    check_ghost(loss_fn, params, x, expect=expect)
    check_ghost(loss_fn, params, x, mask=mask, chunk_size=3, expect=expect)


# ---------------------------------------------------------------------------------------------------------------
# Flax linen


def _digits_like(key, b=6):
    return jax.random.uniform(key, (b, 8, 8, 1)), jnp.arange(b) % 10


def test_linen_mlp_and_cnn():
    x, y = _digits_like(jax.random.key(2))
    for model in (MLP(features=(8,)), CNN(channels=(2, 3))):
        params = _init(model, 3, x)
        report = check_ghost(classification_loss(model.apply), params, (x, y))
        assert set(report.values()) == {"ghost"}, report


def test_linen_transformer_is_covered_and_raw_params_fall_back():
    model = TransformerLM(vocab_size=32, d_model=8, num_heads=2, num_layers=1, max_len=6)
    tokens = jax.random.randint(jax.random.key(4), (4, 6), 0, 32)
    params = _init(model, 5, tokens)
    report = check_ghost(language_model_loss(model.apply), params, (tokens, tokens))
    assert set(report.values()) == {"ghost"}  # embeddings (tokens and positions), attention, MLP, LayerNorms

    class Scaled(nn.Module):
        @nn.compact
        def __call__(self, x):
            scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))  # read outside any layer
            return nn.Dense(1)(x * scale)[:, 0]

    x = jax.random.normal(jax.random.key(6), (5, 3))
    scaled = Scaled()
    params = _init(scaled, 7, x)
    report = check_ghost(lambda p, x: jnp.square(scaled.apply({"params": p}, x)), params, x)
    assert report == {"['Dense_0']['bias']": "ghost", "['Dense_0']['kernel']": "ghost", "['scale']": "vmap"}


class _Layers(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (b, 3, 4, 2) floats
        h = nn.DenseGeneral((2, 3), axis=(-2, -1))(x)  # contracts two axes
        shared = nn.Dense(3, name="shared")
        h = shared(h) + shared(jnp.cos(h))  # one layer called twice: its calls are concatenated
        h = nn.RMSNorm()(h)
        h = nn.Conv(2, (2,), strides=1, padding=((1, 0),), input_dilation=2)(h.reshape(h.shape[0], 6, 3))
        embed = nn.Embed(5, 2)
        ids = jnp.argmax(h, axis=-1) % 5
        tied = embed.attend(h)  # the table is also used outside __call__: it must fall back
        return jnp.mean(embed(ids) + tied[..., :2], axis=(1, 2))


def test_linen_layer_variants_and_fallback():
    x = jax.random.normal(jax.random.key(6), (5, 3, 4, 2))
    model = _Layers()
    params = _init(model, 7, x)

    def loss_fn(p, x):
        return jnp.square(model.apply({"params": p}, x))

    report = check_ghost(loss_fn, params, x)
    assert report.pop("['Embed_0']['embedding']") == "vmap"
    assert set(report.values()) == {"ghost"}, report


def test_no_supported_layer_falls_back_to_vmap_everywhere():
    def loss_fn(p, x):
        return jnp.tanh(x @ p["w"]) @ p["v"]

    params = {"w": jnp.ones((3, 2)) * 0.3, "v": jnp.array([1.0, -2.0]), "unused": jnp.ones(4)}
    x = jax.random.normal(jax.random.key(8), (5, 3))
    report = check_ghost(loss_fn, params, x, expect={"['unused']": "unused", "['v']": "vmap", "['w']": "vmap"})
    assert report
    reports = []
    jax.jit(lambda p, b: reports.append(grad_stats(loss_fn, p, b, method="auto", return_report=True)[1]))(params, x)
    assert set(reports[0].values()) == {"vmap"}  # nothing to gain from ghost: auto uses vmap


def test_auto_uses_ghost_when_it_covers_layers():
    loss_fn, params, batch = _plain_problem(jax.random.key(9))
    reports = []

    @jax.jit
    def auto(p, b):
        stats, report = grad_stats(loss_fn, p, b, method="auto", return_report=True)
        reports.append(report)
        return stats

    stats = auto(params, batch)
    assert set(reports[0].values()) == {"ghost"}
    _close(stats.sq_norm_sum, _brute_force(per_example_grads(loss_fn, params, batch))["q"])


def test_float64_and_bf16_activations():
    with jax.enable_x64(True):
        loss_fn, params, batch = _plain_problem(jax.random.key(10))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        batch = (batch[0].astype(jnp.float64), batch[1], batch[2])
        stats, grads = jax.jit(
            lambda p, b: (grad_stats(loss_fn, p, b, method="ghost", sq_sum=True), per_example_grads(loss_fn, p, b))
        )(params, batch)
        assert stats.sq_norm_sum.dtype == jnp.float64
        _close(stats.sq_norm_sum, _brute_force(grads)["q"], rtol=1e-12)
    model = MLP(features=(8,))
    x, y = _digits_like(jax.random.key(11))
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _init(model, 12, x))
    both = jax.jit(
        lambda p, b: [grad_stats(classification_loss(model.apply), p, b, method=m) for m in ("ghost", "vmap")]
    )
    stats, ref = both(params, (x.astype(jnp.bfloat16), y))
    assert stats.sq_norm_sum.dtype == jnp.float32  # accumulated in float32 at least
    _close(stats.sq_norm_sum, ref.sq_norm_sum, rtol=3e-2)


@pytest.mark.parametrize("method", ["ghost", "auto", "vmap", "microbatch"])
def test_scalar_loss_is_an_error(method):
    loss_fn, params, batch = _plain_problem(jax.random.key(13))
    with pytest.raises(ValueError, match="per-example losses.*scalar"):
        grad_stats(lambda p, b: jnp.mean(loss_fn(p, b)), params, batch, method=method)


def test_jvp_inner_products_equal_brute_force():
    loss_fn, params, batch = _plain_problem(jax.random.key(14))
    direction = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)

    @jax.jit
    def run(p, b):
        chunked = grad_stats(loss_fn, p, b, method="vmap", chunk_size=4, inner_sq_sum=True)  # the JVP path
        return inner_products(loss_fn, p, b, direction), chunked, per_example_grads(loss_fn, p, b)

    inner, chunked, grads = run(params, batch)
    rows = np.concatenate([np.asarray(g).reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)], 1)
    _close(inner, rows @ _flat(direction))
    _close(chunked.inner_sq_sum, _brute_force(grads)["inner"])


def test_losses_are_returned():
    loss_fn, params, batch = _plain_problem(jax.random.key(15))
    _, losses = jax.jit(lambda p, b: grad_stats(loss_fn, p, b, method="ghost", return_losses=True))(params, batch)
    _close(losses, loss_fn(params, batch))
