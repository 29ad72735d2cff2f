"""Small Flax (linen) models used by the examples, the ``adabatch`` command and the benchmarks.

Each model comes with a per-example loss: :func:`classification_loss` and :func:`language_model_loss` turn a
linen module into ``loss_fn(params, batch) -> (b,)``, the form every adabatch statistic producer takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = ["CNN", "MLP", "TransformerLM", "classification_loss", "language_model_loss"]


class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs: ``Dense(h) → relu`` for each ``h`` in ``features``, then
    ``Dense(num_classes)``."""

    features: Sequence[int] = (64,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """A small convolutional network for 8×8 digits: two 3×3 convolutions (the second with stride 2), then a
    dense classifier."""

    channels: Sequence[int] = (16, 32)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(self.channels[0], (3, 3))(x))
        x = nn.relu(nn.Conv(self.channels[1], (3, 3), strides=(2, 2))(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class _Block(nn.Module):
    d_model: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        x = x + nn.SelfAttention(num_heads=self.num_heads, deterministic=True)(nn.LayerNorm()(x), mask=mask)
        h = nn.Dense(4 * self.d_model)(nn.LayerNorm()(x))
        return x + nn.Dense(self.d_model)(nn.gelu(h))


class TransformerLM(nn.Module):
    """A small decoder-only transformer language model (pre-LayerNorm, learned positions, causal attention)."""

    vocab_size: int = 256
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    max_len: int = 256

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab_size, self.d_model)(tokens)
        # Learned positions as an embedding of each example's position ids (so ghost statistics cover it too).
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = x + nn.Embed(self.max_len, self.d_model, embedding_init=nn.initializers.normal(0.02), name="positions")(
            positions
        )
        for _ in range(self.num_layers):
            x = _Block(self.d_model, self.num_heads)(x)
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


def classification_loss(apply_fn: Callable[..., Any]) -> Callable[[Any, tuple], jax.Array]:
    """``loss_fn(params, (x, y)) -> (b,)`` per-example softmax cross-entropy of ``apply_fn({"params": p}, x)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adabatch.flax.models import MLP, classification_loss
      >>> model = MLP(features=(8,))
      >>> x, y = jnp.ones((4, 8, 8, 1)), jnp.arange(4)
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> classification_loss(model.apply)(params, (x, y)).shape
      (4,)
    """

    def loss_fn(params: Any, batch: tuple) -> jax.Array:
        x, y = batch
        logits = apply_fn({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return loss_fn


def language_model_loss(apply_fn: Callable[..., Any]) -> Callable[[Any, tuple], jax.Array]:
    """``loss_fn(params, (tokens, targets)) -> (b,)``: each sequence's mean next-token cross-entropy."""

    def loss_fn(params: Any, batch: tuple) -> jax.Array:
        tokens, targets = batch
        logits = apply_fn({"params": params}, tokens)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets), axis=-1)

    return loss_fn
