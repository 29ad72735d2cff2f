"""Flax linen + adabatch: ``adabatch.flax.LinenTrainState`` forwards the per-example statistics to the norm test.

Run: ``python examples/flax_linen.py`` (a few seconds; ``--steps`` to change the length).

The same model also trains with ``adabatch.training.make_train_step`` + ``fit`` (micro-batches, checkpoints,
sharding); this example shows the lower-level path for code that already has a linen train loop.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adabatch
from adabatch.datasets import load_digits
from adabatch.flax import LinenTrainState, linen_update, per_example_loss
from adabatch.flax.models import MLP
from adabatch.training import DataStream, bucket_size


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_digits(seed=args.seed)
    model = MLP(features=(32,))
    params = model.init(jax.random.key(args.seed), data.x_train[:1])["params"]
    tx = adabatch.adadagrad_norm(args.lr, eta=args.eta, max_batch_size=args.max_batch_size)
    state = LinenTrainState.create(apply_fn=model.apply, params=params, tx=tx)
    loss_fn = per_example_loss(model.apply, optax.softmax_cross_entropy_with_integer_labels)
    update = jax.jit(lambda state, batch, mask: linen_update(state, loss_fn, batch, mask=mask))

    stream = DataStream((data.x_train, data.y_train), seed=args.seed)
    offset, sizes = 0, []
    for _ in range(args.steps):
        size = min(max(args.batch_size, int(state.next_batch_size)), stream.num_examples)
        physical = bucket_size(size, args.batch_size, cap=stream.num_examples)
        state, metrics = update(state, stream.batch(offset, size, physical), np.arange(physical) < size)
        offset += size
        sizes.append(int(metrics["batch_size"]))
    logits = model.apply({"params": state.params}, data.x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == data.y_test))
    print(f"linen: {args.steps} steps, {offset} samples, batch {sizes[0]}→{sizes[-1]}, test accuracy {accuracy:.3f}")
    return {"accuracy": accuracy, "batch_sizes": sizes, "samples": offset}


if __name__ == "__main__":
    main()
