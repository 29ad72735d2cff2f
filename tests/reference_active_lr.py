"""Plain NumPy float64 transcriptions of the official ActiveLR classes (``davoodwadi/ConsciousLR``).

``ActiveAdam.py`` (AdamW core, gain in the weight decay) and ``ActiveBelief.py`` (non-rectified AdaBelief core, L2 or
decoupled weight decay without the gain), written from the published step order, one parameter at a time with
Python-float scalars, sharing no code with the JAX implementation. ``increase="multiplicative"`` replaces the
official ``gain + lr_high`` by ``gain * lr_high``. Parameters and state live in dicts of arrays.
"""

from __future__ import annotations

import math

import numpy as np


class _ActiveBase:
    def __init__(self, params, period, lr, betas, eps, weight_decay, lr_high, lr_low, increase):
        self.params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        self.period = period
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.lr_high, self.lr_low = lr_high, lr_low
        self.increase = increase
        self.state: dict[str, dict] = {}

    def _init_state(self, p):
        return {
            "step": 0,
            "exp_avg": np.zeros_like(p),
            "exp_avg_sq": np.zeros_like(p),
            "gain": np.ones_like(p),
            "cumm": np.zeros_like(p),
        }

    def _end_of_step(self, state, p):
        """After the parameter update: change the gain (from the second period on), then roll the accumulators."""
        step, period = state["step"], self.period
        if step / period > 1 and step % period == 0:
            flipped = state["grad_old"] * state["cumm"] <= 0
            raised = state["gain"] + self.lr_high if self.increase == "additive" else state["gain"] * self.lr_high
            state["gain"] = np.where(flipped, state["gain"] * self.lr_low, raised)
        if step % period == 0:
            state["grad_old"] = state["cumm"].copy()
            state["cumm"] = np.zeros_like(p)


class ReferenceActiveAdam(_ActiveBase):
    """``ActiveAdam``: decoupled decay ``p *= 1 - lr * gain * wd`` before the Adam step ``p -= lr * gain * ...``."""

    def __init__(
        self,
        params,
        period,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        lr_high=2.0,
        lr_low=0.5,
        increase="additive",
    ):
        super().__init__(params, period, lr, betas, eps, weight_decay, lr_high, lr_low, increase)

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        b1, b2 = self.beta1, self.beta2
        for name, p in self.params.items():
            grad = np.array(grads[name], dtype=np.float64)
            state = self.state.setdefault(name, self._init_state(p))
            state["cumm"] = state["cumm"] + grad
            p *= 1 - lr * state["gain"] * self.weight_decay
            state["step"] += 1
            t = state["step"]
            state["exp_avg"] = b1 * state["exp_avg"] + (1 - b1) * grad
            state["exp_avg_sq"] = b2 * state["exp_avg_sq"] + (1 - b2) * grad**2
            m_hat = state["exp_avg"] / (1 - b1**t)
            v_hat = state["exp_avg_sq"] / (1 - b2**t)
            p -= lr * state["gain"] * (m_hat / (np.sqrt(v_hat) + self.eps))
            self._end_of_step(state, p)


class ReferenceActiveBelief(_ActiveBase):
    """``ActiveBelief`` with ``rectify=False, amsgrad=False``: the belief step scaled by the gain."""

    def __init__(
        self,
        params,
        period,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        weight_decouple=False,
        fixed_decay=False,
        lr_high=0.05,
        lr_low=0.95,
        increase="additive",
    ):
        super().__init__(params, period, lr, betas, eps, weight_decay, lr_high, lr_low, increase)
        self.weight_decouple = weight_decouple
        self.fixed_decay = fixed_decay

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        b1, b2, eps, wd = self.beta1, self.beta2, self.eps, self.weight_decay
        for name, p in self.params.items():
            grad = np.array(grads[name], dtype=np.float64)
            state = self.state.setdefault(name, self._init_state(p))
            state["cumm"] = state["cumm"] + grad  # the raw gradient, before any L2 term
            state["step"] += 1
            t = state["step"]
            if self.weight_decouple:
                p *= 1.0 - (wd if self.fixed_decay else lr * wd)
            elif wd != 0:
                grad = grad + wd * p
            state["exp_avg"] = b1 * state["exp_avg"] + (1 - b1) * grad
            resid = grad - state["exp_avg"]
            state["exp_avg_sq"] = b2 * state["exp_avg_sq"] + (1 - b2) * resid * resid
            state["exp_avg_sq"] = state["exp_avg_sq"] + eps  # stored (in-place add in the official code)
            denom = np.sqrt(state["exp_avg_sq"]) / math.sqrt(1 - b2**t) + eps
            p -= lr / (1 - b1**t) * state["gain"] * (state["exp_avg"] / denom)
            self._end_of_step(state, p)
