"""Flax NNX + adabatch: a stock ``nnx.Optimizer`` with AdAdaGrad-Norm, the batch growing as the norm test decides.

Run: ``python examples/flax_nnx.py`` (a few seconds; ``--steps`` to change the length).

The model is trained on scikit-learn's digits. The statistics are ghost statistics (``nnx_update``'s default,
``--method``): the ``nnx.Conv`` and ``nnx.Linear`` layers are captured, so the exact per-example statistics cost
about one plain gradient. Each step pads the batch to a bucket size (``adabatch.training.bucket_size``) with a
mask, so the jitted update compiles once per bucket, not once per batch size.
"""

from __future__ import annotations

import argparse
import functools

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adabatch
from adabatch.datasets import load_digits
from adabatch.flax import nnx_update, per_example_loss
from adabatch.training import DataStream, bucket_size


class Net(nnx.Module):
    """A 3×3 convolution and a linear classifier for 8×8 digits."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.out = nnx.Linear(8 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        return self.out(x.reshape(x.shape[0], -1))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=("ghost", "vmap", "auto"), default="ghost", help="grad_stats method")
    args = parser.parse_args(argv)

    data = load_digits(seed=args.seed)
    model = Net(nnx.Rngs(args.seed))
    tx = adabatch.adadagrad_norm(args.lr, eta=args.eta, max_batch_size=args.max_batch_size)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # stock NNX optimizer
    loss_fn = per_example_loss(model, optax.softmax_cross_entropy_with_integer_labels)
    update = nnx.jit(functools.partial(nnx_update, method=args.method), static_argnums=2)  # loss_fn: static

    stream = DataStream((data.x_train, data.y_train), seed=args.seed)
    offset, sizes = 0, []
    for _ in range(args.steps):
        decision = int(adabatch.next_batch_size(nnx.as_pure(optimizer.opt_state)))
        size = min(max(args.batch_size, decision), stream.num_examples)
        physical = bucket_size(size, args.batch_size, cap=stream.num_examples)
        batch = stream.batch(offset, size, physical)
        metrics = update(model, optimizer, loss_fn, batch, mask=np.arange(physical) < size)
        offset += size
        sizes.append(int(metrics["batch_size"]))
    accuracy = float(jnp.mean(jnp.argmax(model(data.x_test), -1) == data.y_test))
    print(f"NNX: {args.steps} steps, {offset} samples, batch {sizes[0]}→{sizes[-1]}, test accuracy {accuracy:.3f}")
    return {"accuracy": accuracy, "batch_sizes": sizes, "samples": offset}


if __name__ == "__main__":
    main()
