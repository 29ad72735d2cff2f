"""Plain NumPy float64 transcription of the official AdaBelief step (``adabelief-pytorch`` v0.2.1).

Written from the published algorithm, one parameter at a time with Python-float scalars, so that it shares no code
(and no numerical tricks) with the JAX implementation it checks. Parameters and state live in dicts of arrays.
"""

from __future__ import annotations

import math

import numpy as np


class ReferenceAdaBelief:
    """In-place optimizer over ``dict[str, np.ndarray]`` parameters, mirroring the PyTorch class."""

    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
    ) -> None:
        self.params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.amsgrad = amsgrad
        self.weight_decouple = weight_decouple
        self.fixed_decay = fixed_decay
        self.rectify = rectify
        self.degenerated_to_sgd = degenerated_to_sgd
        self.state: dict[str, dict] = {}

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """One optimizer step; ``lr`` overrides the stored learning rate (for schedules)."""
        lr = self.lr if lr is None else lr
        beta1, beta2, eps, wd = self.beta1, self.beta2, self.eps, self.weight_decay
        for name, p in self.params.items():
            grad = np.array(grads[name], dtype=np.float64)
            state = self.state.get(name)
            if state is None:
                state = {
                    "step": 0,
                    "exp_avg": np.zeros_like(p),
                    "exp_avg_var": np.zeros_like(p),
                }
                if self.amsgrad:
                    state["max_exp_avg_var"] = np.zeros_like(p)
                self.state[name] = state

            # Weight decay happens first and on every step.
            if self.weight_decouple:
                if not self.fixed_decay:
                    p *= 1.0 - lr * wd
                else:
                    p *= 1.0 - wd
            elif wd != 0:
                grad = grad + wd * p

            state["step"] += 1
            step = state["step"]
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step

            exp_avg = state["exp_avg"]
            exp_avg_var = state["exp_avg_var"]
            exp_avg *= beta1
            exp_avg += (1 - beta1) * grad
            grad_residual = grad - exp_avg
            exp_avg_var *= beta2
            exp_avg_var += (1 - beta2) * grad_residual * grad_residual
            exp_avg_var += eps  # eps goes into the stored state (in-place add in the official code)

            if self.amsgrad:
                max_exp_avg_var = state["max_exp_avg_var"]
                np.maximum(max_exp_avg_var, exp_avg_var, out=max_exp_avg_var)
                denom = np.sqrt(max_exp_avg_var) / math.sqrt(bias_correction2) + eps
            else:
                denom = np.sqrt(exp_avg_var) / math.sqrt(bias_correction2) + eps

            if not self.rectify:
                step_size = lr / bias_correction1
                p -= step_size * exp_avg / denom
                continue

            beta2_t = beta2**step
            n_sma_max = 2 / (1 - beta2) - 1
            n_sma = n_sma_max - 2 * step * beta2_t / (1 - beta2_t)
            if n_sma >= 5:
                step_size = (
                    math.sqrt(
                        (1 - beta2_t)
                        * (n_sma - 4)
                        / (n_sma_max - 4)
                        * (n_sma - 2)
                        / n_sma
                        * n_sma_max
                        / (n_sma_max - 2)
                    )
                    / bias_correction1
                )
            elif self.degenerated_to_sgd:
                step_size = 1.0 / bias_correction1
            else:
                step_size = -1.0

            if n_sma >= 5:
                # Rectified step: plain exp_avg_var (eps included), not the amsgrad maximum.
                p -= step_size * lr * exp_avg / (np.sqrt(exp_avg_var) + eps)
            elif step_size > 0:
                p -= step_size * lr * exp_avg
