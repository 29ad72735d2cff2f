"""AdAdaGrad-Norm on scikit-learn's digits: the batch grows when the gradient noise dominates.

A small Flax MLP is trained with ``adabatch.adadagrad_norm`` (the norm test chained with AdaGrad-Norm). Each
step computes per-example gradients with ``jax.vmap`` inside one jitted function, feeds their statistics to the
rule, applies the AdaGrad-Norm update, and reads the next batch size from the optimizer state. Batches are
padded to a power-of-two bucket with a mask (padding contributes to no statistic), so the step compiles once
per bucket rather than once per batch size.

Run: ``python examples/digits.py`` (about 20 seconds on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adabatch
from adabatch.datasets import load_digits
from adabatch.flax.models import MLP, classification_loss


def bucket(n: int) -> int:
    """The physical batch for ``n`` examples: the next power of two."""
    return 1 << (n - 1).bit_length()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1.0, help="AdaGrad-Norm learning rate α")
    parser.add_argument("--eta", type=float, default=1.0, help="norm-test constant η")
    parser.add_argument("--init-batch-size", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_digits()
    model = MLP(features=(64,))
    params = model.init(jax.random.key(args.seed), data.x_train[:1])["params"]
    loss_fn = classification_loss(model.apply)
    tx = adabatch.adadagrad_norm(
        args.lr, eta=args.eta, init_batch_size=args.init_batch_size, max_batch_size=args.max_batch_size
    )
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch, mask):
        stats, losses = adabatch.grad_stats(loss_fn, params, batch, mask=mask, return_losses=True)
        updates, opt_state = tx.update(stats.mean, opt_state, params, grad_stats=stats)
        loss = jnp.sum(losses * mask) / jnp.sum(mask)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

    rng = np.random.default_rng(args.seed)
    order, position, samples = rng.permutation(len(data.x_train)), 0, 0
    trajectory = []
    start = time.perf_counter()
    for step in range(args.steps):
        b = min(int(adabatch.next_batch_size(opt_state)), len(data.x_train))
        if position + b > len(order):  # new epoch, reshuffled
            order, position = rng.permutation(len(data.x_train)), 0
        index = order[position : position + b]
        position += b
        pad = bucket(b)
        index = np.concatenate([index, np.full(pad - b, index[0])])
        mask = jnp.asarray(np.arange(pad) < b)
        params, opt_state, loss = train_step(params, opt_state, (data.x_train[index], data.y_train[index]), mask)
        samples += b
        trajectory.append(b)
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  batch {b:4d}  samples {samples:6d}  loss {float(loss):.4f}")
    acc = float(accuracy(params, data.x_test, data.y_test))
    changes = [(i, s) for i, s in enumerate(trajectory) if i == 0 or s != trajectory[i - 1]]
    print("batch-size trajectory (step: size):", ", ".join(f"{i}: {s}" for i, s in changes))
    print(f"test accuracy {acc:.4f} after {args.steps} steps, {samples} samples, {time.perf_counter() - start:.1f} s")
    return {"test_accuracy": acc, "batch_sizes": trajectory, "samples": samples}


if __name__ == "__main__":
    main()
