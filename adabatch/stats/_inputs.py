r"""How a transformation receives statistics: the two entry points and the declaration of what it reads.

A transformation that reads per-example statistics (a batch-size rule, the noise-scale tracker, Eve, CLARS) has
two entry points, chosen by its factory argument ``per_example``:

* ``per_example=False`` (the default, the optax convention): ``updates`` is the mean gradient and the statistics
  come as the ``grad_stats=`` extra argument (a :class:`~adabatch.stats.GradStats`; :func:`adabatch.make_train_step`
  supplies it). Without ``grad_stats=`` the update raises a ``ValueError``: a mean gradient alone cannot give
  per-example statistics, and reading its leading parameter axis as examples would be silently wrong.
* ``per_example=True``: the leading axis of every leaf of ``updates`` holds the examples (at least 2); the
  statistics are computed from them and the mean comes out. A ``grad_stats=`` argument still takes precedence
  (then ``updates`` must be the mean), so such a transformation also works inside the training step.

:func:`read_statistics` is the one function that makes this choice for every such transformation: it turns both
entry points into ``(mean updates, GradStats)`` and checks that the statistics fit.

The optional fields of :class:`~adabatch.stats.GradStats` (:math:`\sum_i g_i\odot g_i`, :math:`\sum_i\langle
g_i,\bar g\rangle^2` and the per-leaf :math:`\sum_i\lVert g_{i,l}\rVert^2`) cost extra, so such a transformation
**declares** which ones it reads: its state has a field ``grad_stats_needs`` holding a :class:`GradStatsNeeds`.
That value is *static* (a pytree node with no leaves), so it survives ``jax.jit``, ``optax.chain``,
``optax.inject_hyperparams``, ``optax.MultiSteps``, sharding and checkpoints unchanged, and :func:`declared_needs`
reads the union of every declaration in any nesting of states with ``optax.tree_utils.tree_get_all_with_path``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax

from adabatch._validation import check_floating_tree, is_concrete
from adabatch.stats._grad_stats import GradStats, from_per_example

__all__ = ["NEEDS_FIELD", "GradStatsNeeds", "declared_needs", "read_statistics"]

NEEDS_FIELD = "grad_stats_needs"  # the state field that holds a transformation's declaration


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class GradStatsNeeds:
    """The optional :class:`~adabatch.stats.GradStats` fields a transformation reads (static: no array leaves).

    Example:
      >>> from adabatch.stats import GradStatsNeeds
      >>> GradStatsNeeds(sq_sum=True) | GradStatsNeeds(inner_sq_sum=True)
      GradStatsNeeds(sq_sum=True, inner_sq_sum=True, leaf_sq_norm_sum=False)
    """

    sq_sum: bool = False  # Σ_i g_i ⊙ g_i (coordinate-wise test, Adam-preconditioned noise scale, Eve)
    inner_sq_sum: bool = False  # Σ_i ⟨g_i, ḡ⟩² (inner-product, orthogonality and augmented tests)
    leaf_sq_norm_sum: bool = False  # Σ_i ‖g_{i,l}‖² per parameter leaf l (CLARS)

    def __or__(self, other: GradStatsNeeds) -> GradStatsNeeds:
        return GradStatsNeeds(*(getattr(self, f.name) or getattr(other, f.name) for f in dataclasses.fields(self)))


def declared_needs(opt_state: Any) -> GradStatsNeeds:
    """The union of the :class:`GradStatsNeeds` declared anywhere in ``opt_state`` (concrete or traced).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adabatch
      >>> from adabatch.stats import declared_needs
      >>> tx = optax.chain(adabatch.coordinate_norm_test(), optax.sgd(0.1))
      >>> declared_needs(tx.init(jnp.zeros(3)))
      GradStatsNeeds(sq_sum=True, inner_sq_sum=False, leaf_sq_norm_sum=False)
    """
    needs = GradStatsNeeds()
    for _, found in optax.tree_utils.tree_get_all_with_path(opt_state, NEEDS_FIELD):
        if isinstance(found, GradStatsNeeds):
            needs = needs | found
    return needs


def read_statistics(
    updates: Any,
    grad_stats: Any,
    max_batch_size: Any,
    *,
    needs: GradStatsNeeds = GradStatsNeeds(),
    per_example: bool = False,
    name: str = "this transformation",
) -> tuple[Any, GradStats]:
    """The two entry points of a statistics-reading transformation: ``(mean updates, GradStats)``.

    Args:
      updates: the mean gradient (with ``grad_stats``), or per-example gradients on the leading axis of every leaf
        (without ``grad_stats``, only when ``per_example`` is True).
      grad_stats: a :class:`~adabatch.stats.GradStats` of the batch, or None. When given it always takes precedence
        and is checked against ``updates`` and ``needs``.
      max_batch_size: the largest per-example batch accepted (checked when concrete).
      needs: the optional :class:`~adabatch.stats.GradStats` fields the transformation reads.
      per_example: the transformation's factory argument: ``updates`` may carry per-example gradients.
      name: the transformation's name, for the error messages.

    Returns:
      ``(updates, grad_stats)`` unchanged, or the mean of per-example ``updates`` (in their dtype) and their
      statistics (accumulated in float32 at least).

    Raises:
      ValueError: without ``grad_stats`` when ``per_example`` is False (the message says what to pass), or when the
        statistics do not fit the updates.
    """
    check_floating_tree("updates", updates)
    if grad_stats is None:
        if not per_example:
            raise ValueError(_missing_statistics_message(name, needs))
        _per_example_size(updates, max_batch_size)
        stats = from_per_example(
            updates, sq_sum=needs.sq_sum, inner_sq_sum=needs.inner_sq_sum, leaf_sq_norm_sum=needs.leaf_sq_norm_sum
        )
        return jax.tree_util.tree_map(lambda m, u: m.astype(u.dtype), stats.mean, updates), stats
    check_grad_stats(grad_stats, updates, needs=needs)
    return updates, grad_stats


def _missing_statistics_message(name: str, needs: GradStatsNeeds) -> str:
    fields = [f.name for f in dataclasses.fields(needs) if getattr(needs, f.name)]
    holding = f" holding {' and '.join(fields)}" if fields else ""
    flags = "".join(f", {field}=True" for field in fields)
    return (
        f"{name} reads per-example statistics but got updates without grad_stats=. Following the optax convention "
        "(per_example=False, the default), updates is the mean gradient, which alone cannot give them: pass "
        f"grad_stats=adabatch.GradStats of the same batch{holding} "
        f"(adabatch.grad_stats(loss_fn, params, batch{flags}), or let adabatch.make_train_step supply it). "
        "Or pass per-example gradients on the leading axis of updates and build the transformation with "
        "per_example=True."
    )


def check_grad_stats(grad_stats: Any, updates: Any, *, needs: GradStatsNeeds = GradStatsNeeds()) -> None:
    """Raise a ``ValueError`` unless ``grad_stats`` is a :class:`GradStats` shaped like ``updates`` with the
    optional fields in ``needs``."""
    if not isinstance(grad_stats, GradStats):
        raise ValueError(f"grad_stats must be an adabatch.GradStats, got {type(grad_stats).__name__}")
    ours, theirs = jax.tree_util.tree_structure(updates), jax.tree_util.tree_structure(grad_stats.mean)
    if ours != theirs:  # type: ignore[operator]  # jaxlib ships no stub for PyTreeDef (mypy cannot resolve it)
        raise ValueError(f"grad_stats.mean must have the tree of the updates; got {theirs}, expected {ours}")
    for u, m in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(grad_stats.mean), strict=True):
        if jnp.shape(u) != jnp.shape(m):
            raise ValueError(f"grad_stats.mean leaf of shape {jnp.shape(m)} does not match update shape {jnp.shape(u)}")
    check_floating_tree("grad_stats.mean", grad_stats.mean)
    if not jnp.issubdtype(jnp.result_type(grad_stats.sq_norm_sum), jnp.floating):
        raise ValueError(f"grad_stats.sq_norm_sum must be floating, got {jnp.result_type(grad_stats.sq_norm_sum)}")
    if needs.sq_sum and grad_stats.sq_sum is None:
        raise ValueError("grad_stats.sq_sum is None; this rule needs it (compute with grad_stats(..., sq_sum=True))")
    if needs.inner_sq_sum and grad_stats.inner_sq_sum is None:
        raise ValueError(
            "grad_stats.inner_sq_sum is None; this rule needs it (compute with grad_stats(..., inner_sq_sum=True))"
        )
    if needs.leaf_sq_norm_sum:
        if grad_stats.leaf_sq_norm_sum is None:
            raise ValueError(
                "grad_stats.leaf_sq_norm_sum is None; this transformation needs the per-leaf sums Σ_i ‖g_i,l‖² "
                "(compute with grad_stats(..., leaf_sq_norm_sum=True) or from_per_example(..., leaf_sq_norm_sum=True))"
            )
        leaf_tree = jax.tree_util.tree_structure(grad_stats.leaf_sq_norm_sum)
        shapes = {jnp.shape(x) for x in jax.tree_util.tree_leaves(grad_stats.leaf_sq_norm_sum)}
        if leaf_tree != ours or shapes - {()}:  # type: ignore[operator]  # PyTreeDef has no stub (see above)
            raise ValueError(
                f"grad_stats.leaf_sq_norm_sum must have the tree of the updates with one scalar per leaf; got "
                f"{leaf_tree} with leaf shapes {sorted(shapes)}"
            )


def _per_example_size(updates: Any, max_batch_size: Any) -> None:
    leaves = jax.tree_util.tree_leaves(updates)
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "updates must be per-example gradients with one shared leading axis (or pass the mean gradient with "
            f"grad_stats=...); got shapes {[tuple(x.shape) for x in leaves]}"
        )
    b = cast(int, sizes.pop())  # not None: checked above
    if b < 2:
        raise ValueError(f"updates has a per-example batch of size {b}: the sample variance needs at least 2 examples")
    if is_concrete(max_batch_size) and b > int(max_batch_size):
        raise ValueError(f"max_batch_size={max_batch_size} is below the per-example batch size {b} of updates")
