"""Plain NumPy float64 transcription of the official AdaLomo step (``OpenLMLab/LOMO``, ``lomo_optim/adalomo.py``).

Written from the published algorithm, one parameter at a time with Python-float scalars, sharing no code with the
JAX implementation. The hook-based "fused backward" is replaced by an explicit ``step(grads)``; the optional
gradient-norm clipping uses the global norm of all (unclamped) gradients, as the official separate ``grad_norm`` pass
does. Beyond the official class (which only accepts 1-D and 2-D tensors): tensors with more than two dimensions are
factored over their last two dimensions, matrix by matrix (an explicit loop over the leading indices), and 0-d
tensors are treated like vectors — the documented extension of ``adabatch.adalomo``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x)))


class ReferenceAdaLomo:
    """In-place optimizer over ``dict[str, np.ndarray]`` parameters, mirroring the PyTorch class."""

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float = 1e-3,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        self.lr = lr
        self.eps = eps
        self.clip_threshold = clip_threshold
        self.decay_rate = decay_rate
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.weight_decay = weight_decay
        self.step_num = 0
        self.exp_avg_sq: dict[str, np.ndarray] = {}
        self.exp_avg_sq_row: dict[str, np.ndarray] = {}
        self.exp_avg_sq_col: dict[str, np.ndarray] = {}
        for name, p in self.params.items():
            if p.ndim < 2:
                self.exp_avg_sq[name] = np.zeros(p.shape)
            else:
                self.exp_avg_sq_row[name] = np.zeros(p.shape[:-1])
                self.exp_avg_sq_col[name] = np.zeros(p.shape[:-2] + p.shape[-1:])

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        if lr is not None:
            self.lr = lr
        self.step_num += 1
        clip_coef = None
        if self.clip_grad_norm is not None and self.clip_grad_norm > 0:
            total_norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads.values()))
            clip_coef = min(float(self.clip_grad_norm) / (total_norm + 1e-6), 1.0)
        for name, p in self.params.items():
            grad = np.array(grads[name], dtype=np.float64)
            if self.clip_grad_value is not None and self.clip_grad_value > 0:
                grad = np.clip(grad, -self.clip_grad_value, self.clip_grad_value)
            if clip_coef is not None:
                grad = grad * clip_coef
            beta2t = 1.0 - math.pow(self.step_num, self.decay_rate)
            sq = grad**2 + self.eps[0]
            if p.ndim >= 2:
                row, col = self.exp_avg_sq_row[name], self.exp_avg_sq_col[name]
                update = np.empty_like(grad)
                for lead in itertools.product(*(range(n) for n in p.shape[:-2])):
                    row[lead] = beta2t * row[lead] + (1.0 - beta2t) * sq[lead].mean(axis=-1)
                    col[lead] = beta2t * col[lead] + (1.0 - beta2t) * sq[lead].mean(axis=-2)
                    r_factor = 1.0 / np.sqrt(row[lead] / row[lead].mean())
                    c_factor = 1.0 / np.sqrt(col[lead])
                    update[lead] = np.outer(r_factor, c_factor) * grad[lead]
            else:
                v = self.exp_avg_sq[name]
                v[...] = beta2t * v + (1.0 - beta2t) * sq
                update = grad / np.sqrt(v)
            update = update / max(_rms(update) / self.clip_threshold, 1.0)
            lr = self.lr * max(self.eps[1], _rms(p))
            if self.weight_decay > 0:
                p *= 1.0 - lr * self.weight_decay
            p -= lr * update
