"""Plain NumPy float64 transcriptions of the official steps of Eve, Tom and MaxVA (LaMadam, MAdam).

Each class mirrors one official optimizer, one parameter at a time, with Python-float scalars and the official order
of operations, so that it shares no code (and no numerical tricks) with the JAX implementations it checks:

* :class:`ReferenceEve` — ``juliuskunze/eve: optax_eve.py`` (``eve``/``evew``), per-example gradients on axis 0;
* :class:`ReferenceTom` — ``AnirudhMaiya/Tom: optimizer/tom.py``;
* :class:`ReferenceLaMadam` — ``zhuchen03/MaxVA: image_classification/optim_laprop.py`` (plus the ``nesterov`` option
  of the fairseq ``LaMAdam``);
* :class:`ReferenceMAdam` — ``zhuchen03/MaxVA: image_classification/optim_adam.py`` (no ``lamb``/``share_beta``/
  ``moment_warmup``/``max_grad_norm``), plus the paper's placement of eps as an option.

Parameters and state live in dicts of arrays; ``step(grads, lr=None)`` updates ``self.params`` in place (``lr``
overrides the stored learning rate, as a scheduler would).
"""

from __future__ import annotations

import math

import numpy as np


def _f64(tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float64) for k, v in tree.items()}


class ReferenceEve:
    """``eve`` (``weight_decay=0``) or ``evew``: the step from per-example gradients (leading axis)."""

    def __init__(self, params, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.0):
        self.params = _f64(params)
        self.lr, self.b1, self.b2, self.eps, self.eps_root, self.wd = lr, b1, b2, eps, eps_root, weight_decay
        self.count = 0
        self.mu = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.nu = {k: np.zeros_like(v) for k, v in self.params.items()}

    def step(self, per_example_grads, lr=None):
        lr = self.lr if lr is None else lr
        self.count += 1
        t = self.count
        for name, p in self.params.items():
            g = np.asarray(per_example_grads[name], dtype=np.float64)
            self.mu[name] = (1 - self.b1) * g.mean(axis=0) + self.b1 * self.mu[name]
            self.nu[name] = (1 - self.b2) * (g**2).mean(axis=0) + self.b2 * self.nu[name]
            mu_hat = self.mu[name] / (1 - self.b1**t)
            nu_hat = self.nu[name] / (1 - self.b2**t)
            inv_b = 1 / g.shape[0]
            d = mu_hat / (np.sqrt(nu_hat * inv_b + mu_hat**2 * (1 - inv_b) + self.eps_root) + self.eps)
            d = d + self.wd * p  # add_decayed_weights (evew) comes before the learning rate
            p -= lr * d


class ReferenceTom:
    """The official ``Tom`` optimizer (L2 weight decay, optional bias correction of level + trend)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=False):
        self.params = _f64(params)
        self.lr, self.betas, self.eps, self.wd, self.bias_correction = lr, betas, eps, weight_decay, bias_correction
        self.state: dict[str, dict] = {}

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        beta1, beta2, beta3 = self.betas
        for name, p in self.params.items():
            grad = np.array(grads[name], dtype=np.float64)
            st = self.state.setdefault(
                name,
                {"step": 0, "level": np.zeros_like(p), "trend": np.zeros_like(p), "sq": np.zeros_like(p),
                 "prev": np.zeros_like(p)},
            )  # fmt: skip
            st["step"] += 1
            step = st["step"]
            bias_corr1 = 1 - (beta1 * beta2) ** step if self.bias_correction else 1.0
            bias_corr3 = 1 - beta3**step
            if self.wd != 0:
                grad = grad + self.wd * p
            st["level"] = (st["level"] + st["trend"]) * beta1 + (1 - beta1) * grad
            st["trend"] = st["trend"] * beta2 + (1 - beta2) * (grad - st["prev"])
            st["sq"] = st["sq"] * beta3 + (1 - beta3) * grad * grad
            total = (st["level"] + st["trend"]) / bias_corr1
            total = total / (np.sqrt(st["sq"]) / math.sqrt(bias_corr3) + self.eps)
            st["prev"] = grad.copy()
            p -= lr * total


def _adaptive_beta(grad, g_est, g_sq_est, total_w, beta_min, beta_max):
    """The official closed-form variance-maximising beta, clamped (the caller handles the first step)."""
    sq_unbiased = g_sq_est / total_w
    mean_unbiased = g_est / total_w
    moment_diff = sq_unbiased - mean_unbiased**2
    mean_diff_sq = (grad - mean_unbiased) ** 2
    sum_diff = mean_diff_sq + moment_diff
    denominator = (mean_diff_sq - moment_diff) * total_w + sum_diff
    return np.clip(sum_diff / (denominator + 1e-16), beta_min, beta_max)


class ReferenceLaMadam:
    """The official ``LaMadam`` (LaProp-style MaxVA); weight decay L2 unless ``use_adamw``."""

    def __init__(self, params, lr=1e-3, momentum=0.9, beta=0.98, beta_min=0.5, eps=1e-15, weight_decay=0.0,
                 use_adamw=False, nesterov=False):  # fmt: skip
        self.params = _f64(params)
        self.lr, self.momentum, self.beta, self.beta_min, self.eps = lr, momentum, beta, beta_min, eps
        self.wd, self.use_adamw, self.nesterov = weight_decay, use_adamw, nesterov
        self.state: dict[str, dict] = {}

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        momentum, beta = self.momentum, self.beta
        for name, p in self.params.items():
            grad = np.array(grads[name], dtype=np.float64)
            st = self.state.setdefault(
                name,
                {"step": 0, "update_lr_bc": 0.0, "update_est": np.zeros_like(p), "g_sq_est": np.zeros_like(p),
                 "g_est": np.zeros_like(p), "total_w": np.zeros_like(p)},
            )  # fmt: skip
            st["step"] += 1
            if self.wd != 0:
                if self.use_adamw:
                    p -= self.wd * lr * p
                else:
                    grad = grad + self.wd * p
            if st["step"] > 1 and self.beta_min != beta:
                b = _adaptive_beta(grad, st["g_est"], st["g_sq_est"], st["total_w"], self.beta_min, beta)
                st["g_est"] = b * st["g_est"] + (1 - b) * grad
                st["g_sq_est"] = b * st["g_sq_est"] + (1 - b) * grad * grad
                st["total_w"] = b * st["total_w"] + (1 - b)
                total_w = st["total_w"]
            else:
                st["g_sq_est"] = beta * st["g_sq_est"] + (1 - beta) * grad * grad
                total_w = 1 - beta ** st["step"]
                st["total_w"] = np.full_like(p, total_w)
                st["g_est"] = beta * st["g_est"] + (1 - beta) * grad
            denom = np.sqrt(st["g_sq_est"] / total_w) + self.eps
            st["update_est"] = momentum * st["update_est"] + (1 - momentum) * lr * grad / denom
            st["update_lr_bc"] = st["update_lr_bc"] * momentum + lr * (1 - momentum)
            step_size = lr / st["update_lr_bc"] if st["update_lr_bc"] > 0 else lr
            update_est = st["update_est"]
            if self.nesterov:
                update_est = momentum * update_est + (1 - momentum) * lr * grad / denom
            p -= step_size * update_est


class ReferenceMAdam:
    """The official ``MAdam`` (Adam-style MaxVA); decoupled weight decay unless ``adamw=False``.

    ``paper_eps=True`` uses the paper's ``sqrt(w) m / (sqrt(v~) + eps)`` instead of the code's
    ``m / (sqrt(v~ / w) + eps)``.
    """

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2_range=(0.5, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, nesterov=False, adamw=True, paper_eps=False):  # fmt: skip
        self.params = _f64(params)
        self.lr, self.beta1, self.beta2_range, self.eps = lr, beta1, beta2_range, eps
        self.wd, self.amsgrad, self.nesterov, self.adamw, self.paper_eps = (
            weight_decay,
            amsgrad,
            nesterov,
            adamw,
            paper_eps,
        )
        self.state: dict[str, dict] = {}

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        beta1 = self.beta1
        beta2_min, beta2_max = self.beta2_range
        for name, p in self.params.items():
            grad = np.array(grads[name], dtype=np.float64)
            if not self.adamw and self.wd != 0:
                grad = grad + self.wd * p
            st = self.state.setdefault(
                name,
                {"step": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p), "max_denom": np.zeros_like(p),
                 "exp_avg_grad": np.zeros_like(p), "total_w": np.zeros_like(p)},
            )  # fmt: skip
            st["step"] += 1
            if st["step"] == 1 or beta2_max == beta2_min:
                st["exp_avg"] = beta2_max * st["exp_avg"] + (1 - beta2_max) * grad
                st["exp_avg_sq"] = beta2_max * st["exp_avg_sq"] + (1 - beta2_max) * grad * grad
                st["total_w"] = np.full_like(p, 1 - beta2_max ** st["step"])
            else:
                b = _adaptive_beta(grad, st["exp_avg"], st["exp_avg_sq"], st["total_w"], beta2_min, beta2_max)
                st["exp_avg"] = b * st["exp_avg"] + (1 - b) * grad
                st["exp_avg_sq"] = b * st["exp_avg_sq"] + (1 - b) * grad * grad
                st["total_w"] = st["total_w"] * b + (1 - b)
            if self.paper_eps:
                denom = (np.sqrt(st["exp_avg_sq"]) + self.eps) / np.sqrt(st["total_w"])
            else:
                denom = np.sqrt(st["exp_avg_sq"] / st["total_w"]) + self.eps
            if self.amsgrad:
                st["max_denom"] = np.maximum(denom, st["max_denom"])
                denom = st["max_denom"]
            st["exp_avg_grad"] = beta1 * st["exp_avg_grad"] + (1 - beta1) * grad
            bias_correction0 = 1 - beta1 ** st["step"]
            step_size = lr / bias_correction0
            exp_avg_grad = st["exp_avg_grad"]
            if self.nesterov:
                exp_avg_grad = exp_avg_grad * beta1 + (1 - beta1) * grad
            if self.adamw and self.wd > 0:
                p -= lr * self.wd * p
            p -= step_size * exp_avg_grad / denom
