"""AdaLomo with the semantics of the authors' class (``OpenLMLab/LOMO``, ``lomo_optim/adalomo.py``).

A momentum-free Adafactor-style step: factored second moment for every matrix, grouped (per-tensor) update
normalisation, a learning rate relative to the parameter's RMS, weight decay scaled by that relative rate. The
official class fuses the step into the backward pass to save memory; here it is an ordinary optax transformation
(the fusion is a PyTorch memory device, the arithmetic is the same).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adabatch._validation import (
    accumulation_dtype,
    check_floating_tree,
    check_positive,
    check_state_dtype,
    is_concrete,
    state_leaf_dtype,
)

__all__ = ["ScaleByAdalomoState", "adalomo", "scale_by_adalomo"]


class ScaleByAdalomoState(NamedTuple):
    """State of :func:`scale_by_adalomo` (O(n + m) numbers per n×m matrix)."""

    count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count) shape (), int32: number of updates taken so far (the step index t of the last update)
    v_row: optax.Updates  # per leaf of ndim >= 2: shape[:-1], state dtype: r_t, EMA of the row means of g^2 + eps1;
    #                       shape (0,) for leaves of ndim < 2
    v_col: optax.Updates  # per leaf of ndim >= 2: shape[:-2] + shape[-1:], state dtype: c_t, EMA of the column means;
    #                       shape (0,) for leaves of ndim < 2
    v: optax.Updates  # per leaf of ndim < 2: the leaf's shape, state dtype: v_t, EMA of g^2 + eps1; (0,) for matrices


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(x * x))


def scale_by_adalomo(
    eps: Any = 1e-30,
    eps_scale: Any = 1e-3,
    clip_threshold: Any = 1.0,
    decay_rate: Any = -0.8,
    weight_decay: Any = 0.0,
    *,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The AdaLomo step of the official class, before the learning rate.

    For each parameter tensor :math:`\theta` with gradient :math:`G_t` and 1-based step :math:`t` (paper/code symbols
    → arguments: :math:`\epsilon_1` = ``eps``, :math:`\epsilon_2` = ``eps_scale``, :math:`d` = ``clip_threshold``,
    :math:`c` = ``decay_rate``, :math:`\lambda` = ``weight_decay``):

    .. math::

        \beta_{2,t} &= 1 - t^{c} \quad (\beta_{2,1} = 0) \\
        r_t &= \beta_{2,t} r_{t-1} + (1-\beta_{2,t})\,\mathrm{mean}_{\text{cols}}(G_t^2 + \epsilon_1) \qquad
        c_t = \beta_{2,t} c_{t-1} + (1-\beta_{2,t})\,\mathrm{mean}_{\text{rows}}(G_t^2 + \epsilon_1) \\
        \hat V_t &= \frac{r_t}{\mathrm{mean}(r_t)} \otimes c_t
        \quad\text{(matrices; vectors: } \hat V_t = \beta_{2,t} \hat V_{t-1} + (1-\beta_{2,t})(G_t^2 + \epsilon_1)) \\
        U_t &= G_t / \sqrt{\hat V_t}, \qquad \hat U_t = U_t / \max(1, \mathrm{RMS}(U_t)/d) \\
        d_t &= \max(\epsilon_2, \mathrm{RMS}(\theta))\,(\hat U_t + \lambda\theta)

    so that :math:`\theta \leftarrow \theta - \eta d_t = \theta(1 - \eta_t\lambda) - \eta_t \hat U_t` with the relative
    rate :math:`\eta_t = \eta \max(\epsilon_2, \mathrm{RMS}(\theta))`, the official update. The RMS of the grouped
    normalisation is over the whole tensor. Everything is computed in float32 at least, whatever the dtype of the
    parameters (as the official class does), and the update is returned in the dtype of the incoming gradient.

    Tensors with more than 2 dimensions (which the official class rejects) are factored over their **last two**
    dimensions, each leading index being its own matrix (rows ``shape[-2]``, columns ``shape[-1]``; the mean of
    :math:`r_t` is per matrix); the normalisation and the parameter RMS stay per tensor. Scalars (0-d, also rejected
    there) are treated as vectors of one element.

    Args:
      eps: :math:`\epsilon_1` >= 0, added to the squared gradient.
      eps_scale: :math:`\epsilon_2` >= 0, the floor of the parameter RMS in the relative learning rate.
      clip_threshold: :math:`d` > 0, the RMS above which the update is scaled down.
      decay_rate: :math:`c` <= 0, the exponent of :math:`\beta_{2,t} = 1 - t^c` (official sign convention; optax's
        ``adafactor`` takes ``decay_rate=0.8`` for the same schedule).
      weight_decay: :math:`\lambda` >= 0, decoupled and multiplied by the relative rate.
      state_dtype: dtype of ``v_row``/``v_col``/``v``; default each parameter's dtype promoted to at least float32.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``, with state
      :class:`ScaleByAdalomoState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from adabatch.optimizers import scale_by_adalomo
      >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
      >>> tx = scale_by_adalomo()
      >>> state = tx.init(params)
      >>> print(state.v_row["w"].shape, state.v_col["w"].shape, state.v["b"].shape)
      (2,) (3,) (3,)
      >>> grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.array([1.0, -2.0, 3.0])}
      >>> d, state = tx.update(grads, state, params)
      >>> print(d["w"][0], d["b"])  # first step: sign(g) times max(eps_scale, RMS(theta))
      [1. 1. 1.] [ 0.001 -0.001  0.001]

    References:
      Lv, Yan, Guo, Lv, Qiu, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate", Findings of ACL 2024,
      https://arxiv.org/abs/2310.10195
    """
    check_positive("eps", eps, allow_zero=True)
    check_positive("eps_scale", eps_scale, allow_zero=True)
    check_positive("clip_threshold", clip_threshold)
    if is_concrete(decay_rate):
        rate = np.asarray(decay_rate)
        if rate.shape != () or not np.isfinite(rate) or rate > 0:
            raise ValueError(
                f"decay_rate must be a finite number <= 0 (beta2_t = 1 - t**decay_rate), got {decay_rate!r}"
            )
    check_positive("weight_decay", weight_decay, allow_zero=True)
    check_state_dtype(state_dtype)

    def init_fn(params: optax.Params) -> ScaleByAdalomoState:
        check_floating_tree("params", params)

        def zeros(p: Any, kind: str) -> jax.Array:
            shape, dtype = jnp.shape(p), state_leaf_dtype(p, state_dtype)
            if len(shape) < 2:
                return jnp.zeros(shape if kind == "v" else (0,), dtype)
            if kind == "row":
                return jnp.zeros(shape[:-1], dtype)
            if kind == "col":
                return jnp.zeros(shape[:-2] + shape[-1:], dtype)
            return jnp.zeros((0,), dtype)

        return ScaleByAdalomoState(
            count=jnp.zeros([], jnp.int32),
            v_row=jax.tree.map(lambda p: zeros(p, "row"), params),
            v_col=jax.tree.map(lambda p: zeros(p, "col"), params),
            v=jax.tree.map(lambda p: zeros(p, "v"), params),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByAdalomoState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, ScaleByAdalomoState]:
        del extra_args
        if params is None:
            raise ValueError("scale_by_adalomo needs params (for the parameter RMS): call update(grads, state, params)")
        check_floating_tree("updates", updates)
        count = optax.safe_increment(state.count)

        def leaf(g: jax.Array, r: jax.Array, c: jax.Array, v: jax.Array, p: jax.Array):
            store = r.dtype
            dtype = accumulation_dtype(store)  # computation in float32 at least
            g32, p32 = g.astype(dtype), jnp.asarray(p).astype(dtype)
            beta = 1 - count.astype(dtype) ** jnp.asarray(decay_rate, dtype)
            sq = g32 * g32 + jnp.asarray(eps, dtype)
            if g.ndim >= 2:
                r = beta * r.astype(dtype) + (1 - beta) * jnp.mean(sq, axis=-1)
                c = beta * c.astype(dtype) + (1 - beta) * jnp.mean(sq, axis=-2)
                row_factor = jax.lax.rsqrt(r / jnp.mean(r, axis=-1, keepdims=True))
                u = g32 * row_factor[..., :, None] * jax.lax.rsqrt(c)[..., None, :]
            else:
                v = beta * v.astype(dtype) + (1 - beta) * sq
                u = g32 * jax.lax.rsqrt(v)
            u = u / jnp.maximum(1.0, _rms(u) / jnp.asarray(clip_threshold, dtype))
            scale = jnp.maximum(jnp.asarray(eps_scale, dtype), _rms(p32))
            d = scale * (u + jnp.asarray(weight_decay, dtype) * p32)
            return d.astype(jnp.result_type(g)), r.astype(store), c.astype(store), v.astype(store)

        out = jax.tree.map(leaf, updates, state.v_row, state.v_col, state.v, params)
        treedef = jax.tree.structure(updates)
        d, v_row, v_col, v = jax.tree.transpose(treedef, jax.tree.structure((0, 0, 0, 0)), out)
        return d, ScaleByAdalomoState(count=count, v_row=v_row, v_col=v_col, v=v)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _clip_gradients(clip_grad_norm: Any, clip_grad_value: Any) -> optax.GradientTransformationExtraArgs:
    """The official clipping: coefficient ``min(1, norm / (||g|| + 1e-6))`` from the unclipped global norm, applied
    after clamping each entry to ``[-value, value]``."""

    def update_fn(updates: optax.Updates, state: optax.EmptyState, params: Any = None, **extra_args: Any):
        del params, extra_args
        coef = None
        if clip_grad_norm is not None:
            leaves = jax.tree.leaves(updates)
            total = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(accumulation_dtype(x.dtype)))) for x in leaves))
            coef = jnp.minimum(clip_grad_norm / (total + 1e-6), 1.0)

        def clip(g: jax.Array) -> jax.Array:
            out = g.astype(accumulation_dtype(g.dtype))
            if clip_grad_value is not None:
                out = jnp.clip(out, -clip_grad_value, clip_grad_value)
            if coef is not None:
                out = out * coef.astype(out.dtype)
            return out.astype(g.dtype)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def adalomo(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    eps: Any = 1e-30,
    eps_scale: Any = 1e-3,
    clip_threshold: Any = 1.0,
    decay_rate: Any = -0.8,
    weight_decay: Any = 0.0,
    *,
    clip_grad_norm: Any = None,
    clip_grad_value: Any = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The official AdaLomo optimizer as an optax chain: :func:`scale_by_adalomo` then the learning rate.

    With :math:`\eta` = ``learning_rate`` (a float or a schedule of the 0-based step; the official ``lr`` passed to
    ``fused_backward``) the parameters move as
    :math:`\theta \leftarrow \theta(1 - \eta_t\lambda) - \eta_t \hat U_t`,
    :math:`\eta_t = \eta\max(\epsilon_2, \mathrm{RMS}(\theta))` (see :func:`scale_by_adalomo`).

    Optional gradient clipping, as the official class does it, before the step: with ``clip_grad_value`` each entry
    is clamped to :math:`[-v, v]`; with ``clip_grad_norm`` :math:`N` the gradients are then multiplied by
    :math:`\min(1, N / (\lVert g\rVert + 10^{-6}))`, where :math:`\lVert g\rVert` is the global norm of the
    *unclamped* gradients over all parameters (the official class measures it in a separate backward pass).
    The official ``loss_scale`` (multiply the loss, divide the gradients, by :math:`2^{10}`) is a float16 device with no
    effect on the arithmetic in float32 and is not offered.

    Args:
      learning_rate: :math:`\eta` >= 0, or a schedule.
      eps: :math:`\epsilon_1` (official ``eps[0]``).
      eps_scale: :math:`\epsilon_2` (official ``eps[1]``).
      clip_threshold: :math:`d`.
      decay_rate: :math:`c` (official sign: -0.8).
      weight_decay: :math:`\lambda`.
      clip_grad_norm: ``None`` (default) or a global-norm bound > 0.
      clip_grad_value: ``None`` (default) or an entry bound > 0.
      state_dtype: see :func:`scale_by_adalomo`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``) whose ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from adabatch.optimizers import adalomo
      >>> params = jnp.array([3.0, -4.0])  # RMS 3.5355
      >>> opt = adalomo(learning_rate=0.1)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([0.5, 0.5]), state, params)
      >>> print(jnp.round(optax.apply_updates(params, updates), 4))  # first step: lr * RMS(theta) * sign(g)
      [ 2.6464 -4.3536]

    References:
      Lv, Yan, Guo, Lv, Qiu, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate", Findings of ACL 2024,
      https://arxiv.org/abs/2310.10195
    """
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate, allow_zero=True)
    if clip_grad_norm is not None:
        check_positive("clip_grad_norm", clip_grad_norm)
    if clip_grad_value is not None:
        check_positive("clip_grad_value", clip_grad_value)
    core = scale_by_adalomo(eps, eps_scale, clip_threshold, decay_rate, weight_decay, state_dtype=state_dtype)
    return optax.chain(
        _clip_gradients(clip_grad_norm, clip_grad_value), core, optax.scale_by_learning_rate(learning_rate)
    )
