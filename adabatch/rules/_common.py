"""What every batch-size rule shares: argument checks, rounding of a decision, and reading the decision."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from adabatch._tree import find_state, unwrap
from adabatch._validation import check_positive_int, is_concrete

__all__ = [
    "DECISION_FIELD",
    "DEFAULT_INIT_BATCH_SIZE",
    "DEFAULT_MAX_BATCH_SIZE",
    "check_rule_arguments",
    "has_decision",
    "next_batch_size",
    "round_batch_size",
]

DEFAULT_MAX_BATCH_SIZE = 50_000  # the AdAdaGrad reference code's default cap
DEFAULT_INIT_BATCH_SIZE = 16  # small, yet enough examples for a usable variance estimate
DECISION_FIELD = "next_batch_size"  # the state field of every batch-size rule that holds its decision


def round_batch_size(proposed: jax.Array, granularity: Any, max_batch_size: Any) -> jax.Array:
    """``min(max_batch_size, roundup_granularity(max(proposed, 1)))`` in int32 (every rule rounds this way)."""
    g = jnp.asarray(granularity, jnp.int32)
    return jnp.minimum(-(-jnp.maximum(proposed, 1) // g) * g, jnp.asarray(max_batch_size, jnp.int32))


def check_rule_arguments(max_batch_size: Any, init_batch_size: Any, granularity: Any, test_interval: Any) -> None:
    """The eager checks every batch-size rule applies to its shared arguments (ValueError naming the argument)."""
    check_positive_int("max_batch_size", max_batch_size)
    check_positive_int("init_batch_size", init_batch_size)
    check_positive_int("granularity", granularity)
    check_positive_int("test_interval", test_interval)
    if is_concrete(init_batch_size) and int(init_batch_size) < 2:
        raise ValueError(
            f"init_batch_size must be at least 2, got {init_batch_size}: one example cannot estimate a variance, so "
            "a loop that feeds the decided size would stay at one example forever"
        )
    if is_concrete(max_batch_size) and is_concrete(init_batch_size) and int(init_batch_size) > int(max_batch_size):
        raise ValueError(f"max_batch_size={max_batch_size} is below init_batch_size={init_batch_size}")
    if is_concrete(max_batch_size) and is_concrete(granularity) and int(max_batch_size) % int(granularity):
        raise ValueError(f"max_batch_size={max_batch_size} must be a multiple of granularity={granularity}")


def has_decision(node: Any) -> bool:
    """Whether ``node`` is the state of a batch-size rule: a named tuple with a ``next_batch_size`` field."""
    return hasattr(node, "_fields") and DECISION_FIELD in node._fields


def next_batch_size(opt_state: Any) -> jax.Array:
    """The batch-size decision (int32 scalar), the size of the next batch, of the first batch-size rule found in
    any nesting of states.

    Looks through tuples, lists, dicts and named tuples (``optax.chain``, ``optax.inject_hyperparams``,
    ``optax.MultiSteps`` and ``nnx.Optimizer`` states included) for a state with a ``next_batch_size`` field,
    depth-first in chain order. Inside a pytree of states ``optax.tree.get(opt_state, "next_batch_size")`` finds
    the same value.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> import adabatch
      >>> tx = optax.chain(adabatch.norm_test(init_batch_size=32, max_batch_size=64), optax.sgd(0.1))
      >>> int(adabatch.next_batch_size(tx.init(jnp.zeros(3))))
      32
    """
    found = find_state(opt_state, has_decision)
    if found is None:
        raise ValueError(f"opt_state holds no batch-size rule state (no field named {DECISION_FIELD!r})")
    return unwrap(getattr(found, DECISION_FIELD))
