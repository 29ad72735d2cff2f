"""The Flax NNX benchmark problem: a small decoder-only transformer language model written with NNX layers.

:class:`NNXTransformerLM` has the layer sizes of the linen :class:`adabatch.flax.models.TransformerLM` of the
``lm`` problem of :mod:`adabatch.benchmarks.stats` (token and position embeddings, pre-LayerNorm blocks of causal
self-attention and a 4× MLP, a final LayerNorm and a linear head over the 256 byte values); its attention
projections are ``nnx.Linear`` layers (linen's ``SelfAttention`` uses ``DenseGeneral``: the same products). Every
parameter is captured by the NNX ghost backend (:mod:`adabatch.flax._nnx_ghost`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adabatch.datasets import load_text
from adabatch.flax import nnx_params, per_example_loss

__all__ = ["NNXTransformerLM", "make_nnx_problem"]


class _Attention(nnx.Module):
    """Causal multi-head self-attention with ``nnx.Linear`` query, key, value and output projections."""

    def __init__(self, d_model: int, num_heads: int, *, param_dtype: Any, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.query, self.key, self.value, self.out = (
            nnx.Linear(d_model, d_model, param_dtype=param_dtype, rngs=rngs) for _ in range(4)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape

        def heads(y: jax.Array) -> jax.Array:
            return y.reshape(b, t, self.num_heads, d // self.num_heads)

        mask = nnx.make_causal_mask(jnp.ones((b, t), jnp.int32))
        attended = nnx.dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), mask=mask)
        return self.out(attended.reshape(b, t, d))


class _Block(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, *, param_dtype: Any, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d_model, param_dtype=param_dtype, rngs=rngs)
        self.attention = _Attention(d_model, num_heads, param_dtype=param_dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, param_dtype=param_dtype, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, param_dtype=param_dtype, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.ln1(x))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NNXTransformerLM(nnx.Module):
    """A small decoder-only transformer language model in Flax NNX (pre-LayerNorm, learned positions as an
    embedding of each example's position ids, causal attention): ``tokens (b, T) -> logits (b, T, vocab_size)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from adabatch.benchmarks._nnx_problem import NNXTransformerLM
      >>> def make():
      ...     return NNXTransformerLM(vocab_size=11, d_model=8, num_heads=2, num_layers=1, max_len=5, rngs=nnx.Rngs(0))
      >>> def logits():
      ...     return make()(jnp.zeros((3, 5), jnp.int32))
      >>> nnx.eval_shape(make).head.kernel.shape, nnx.eval_shape(logits).shape  # shapes only: nothing is computed
      ((8, 11), (3, 5, 11))
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        max_len: int = 256,
        *,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab_size, d_model, param_dtype=param_dtype, rngs=rngs)
        self.positions = nnx.Embed(
            max_len, d_model, param_dtype=param_dtype, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
        )
        self.blocks = nnx.List(
            [_Block(d_model, num_heads, param_dtype=param_dtype, rngs=rngs) for _ in range(num_layers)]
        )
        self.ln = nnx.LayerNorm(d_model, param_dtype=param_dtype, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def make_nnx_problem(batch_size: int, quick: bool) -> dict[str, Any]:
    """The ``nnx`` problem: :class:`NNXTransformerLM` with the sizes of the ``lm`` problem of
    :func:`adabatch.benchmarks.stats.make_problem` on the same ``pydoc_data.topics`` bytes, its per-example loss
    (each sequence's mean next-token cross-entropy), its parameters (``nnx_params``) and one batch; the dict of
    ``make_problem``."""
    seq_len = 16 if quick else 32
    data = load_text(seq_len=seq_len)
    x, y = data.x_train, data.y_train
    size = {"d_model": 16, "num_heads": 2, "num_layers": 1} if quick else {"d_model": 64, "num_heads": 4}
    model = nnx.jit(lambda: NNXTransformerLM(max_len=seq_len, rngs=nnx.Rngs(0), **size))()  # one compilation
    loss = per_example_loss(model, optax.softmax_cross_entropy_with_integer_labels)  # mean over the tokens
    rng = np.random.default_rng(0)
    index = rng.choice(len(x), size=batch_size, replace=batch_size > len(x))
    batch = (jnp.asarray(x[index]), jnp.asarray(y[index]))
    return {"name": "nnx", "loss": loss, "params": nnx_params(model), "batch": batch, "quick": quick}
