"""The PyHessian side of the curvature benchmark: the same quantities from PyHessian on the PyTorch twin of a model.

PyHessian (Yao, Gholami, Keutzer, Mahoney, "PyHessian: Neural Networks Through the Lens of the Hessian", 2020,
https://arxiv.org/abs/1912.07145) builds, in its ``hessian(model, criterion, data=(x, y))`` constructor, one
gradient with ``create_graph=True``; every Hessian-vector product after that is a double-backward
``torch.autograd.grad`` through that graph. ``density(iter=m, n_v=n)`` runs ``n`` Lanczos runs of ``m`` products one
after the other, re-orthogonalising each new vector against all earlier ones one at a time in Python (one inner
product and one update per earlier vector and parameter tensor, and a host synchronisation per step), then an
eigendecomposition of the tridiagonal; ``eigenvalues(maxIter=k, top_n=1)`` is power iteration and ``trace(maxIter=k)``
Hutchinson's estimator, ``k`` products each.

Only this module imports ``torch``/``pyhessian``, and only when :func:`unavailable` says they are installed; nothing
from PyHessian is copied here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["jax_threads", "make_calls", "omp_wait_policy", "unavailable"]


def unavailable() -> str | None:
    """``None`` when torch and pyhessian import, else why not (for the benchmark's notes).

    Before the first import of torch it sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set already): on a machine shared
    with other jobs, OpenMP threads that spin at barriers while their partner is descheduled make a 2-thread PyTorch
    backward up to 20 times slower than a 1-thread one; passive waiting removes that, and costs nothing measurable
    on an idle machine. XLA's thread pool does not spin that way, so this evens the comparison."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch not installed (the `bench` extra)"
    try:
        import pyhessian  # type: ignore[import]  # noqa: F401  (no type information; absent in CI)
    except ImportError:
        return "pyhessian not installed (the `bench` extra)"
    return None


def jax_threads() -> int:
    """The number of cores XLA's CPU backend runs on: the CPUs this process may be scheduled on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def omp_wait_policy() -> str:
    """The OpenMP wait policy PyTorch's threads run with (read at torch's first import)."""
    return os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default: spin, then sleep)")


@contextlib.contextmanager
def _legacy_eig() -> Iterator[None]:
    """PyHessian 0.1's ``density`` ends with ``torch.eig(T, eigenvectors=True)``, removed from PyTorch 2; for the
    duration of a call it gets a stand-in with the old return format (eigenvalues as ``(m, 2)`` real/imaginary
    columns, eigenvectors as columns), computed by ``torch.linalg.eigh`` (``T`` is symmetric tridiagonal,
    ``m`` ≤ 100: negligible next to the ``m`` Hessian-vector products)."""
    import torch

    def eig(matrix: Any, eigenvectors: bool = False) -> tuple[Any, Any]:
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    original = getattr(torch, "eig", None)
    setattr(torch, "eig", eig)  # noqa: B010  (torch's own annotation of eig is for the removed signature)
    try:
        yield
    finally:
        if original is None:
            delattr(torch, "eig")
        else:
            setattr(torch, "eig", original)  # noqa: B010


def _torch_batch(problem: dict) -> tuple[Any, Any]:
    """The problem's batch as torch tensors in the twin's layout (NCHW images, int64 tokens and labels)."""
    import torch

    x, y = (torch.from_numpy(np.array(a)) for a in problem["batch"])
    if problem["name"] == "cnn":
        x = x.permute(0, 3, 1, 2).contiguous()
    if problem["name"] == "lm":
        x = x.long()
    return x, y.long()


def _criterion(logits: Any, targets: Any) -> Any:
    """Mean cross-entropy; sequence logits ``(b, t, vocab)`` are flattened to ``(b t, vocab)`` (every sequence has
    ``t`` tokens, so this is the mean of the per-sequence mean losses, as on the JAX side)."""
    from torch import nn

    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_calls(
    problem: dict, spectra: Sequence[tuple[int, int]], iterations: int, notes: list[str]
) -> tuple[dict[str, Callable[[], Any]], int]:
    """Zero-argument calls timing PyHessian on the PyTorch twin of ``problem``'s model, and the twin's size.

    Names: ``plain`` (a forward and ``backward()`` of the mean loss), ``HVP`` (the ``hessian`` constructor, i.e. a
    gradient with ``create_graph=True``, then one product), ``m×n`` (constructor + ``density(iter=m, n_v=n)``),
    ``top eig`` (constructor + ``eigenvalues(maxIter=iterations, top_n=1)``) and ``trace`` (constructor +
    ``trace(maxIter=iterations)``), both with ``tol=-inf`` so that exactly ``iterations`` products run. A call
    that fails on this model is left out and a line added to ``notes``.
    """
    import torch
    from pyhessian import hessian  # type: ignore[import]
    from pyhessian.utils import hessian_vector_product  # type: ignore[import]

    from adabatch.benchmarks.stats import _torch_model

    torch.manual_seed(0)
    model = _torch_model(problem)
    x, y = _torch_batch(problem)
    size = sum(p.numel() for p in model.parameters())

    def analysis() -> Any:
        model.zero_grad(set_to_none=True)  # the constructor accumulates into .grad: start from none (this also
        with warnings.catch_warnings():  # breaks the reference cycle PyTorch warns about)
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            return hessian(model, _criterion, data=(x, y), cuda=False)

    def plain() -> Any:
        model.zero_grad(set_to_none=True)
        _criterion(model(x), y).backward()
        return [p.grad for p in model.parameters()]

    vector = [torch.randn_like(p) for p in model.parameters()]

    def one_hvp() -> Any:
        h = analysis()
        return hessian_vector_product(h.gradsH, h.params, vector)

    calls: dict[str, Callable[[], Any]] = {"plain": plain, "HVP": one_hvp}
    for m, n in spectra:
        if m > size:
            continue

        def spectrum(m: int = m, n: int = n) -> Any:
            with _legacy_eig():
                return analysis().density(iter=m, n_v=n)

        calls[f"{m}×{n}"] = spectrum
    calls["top eig"] = lambda: analysis().eigenvalues(maxIter=iterations, tol=float("-inf"), top_n=1)
    calls["trace"] = lambda: analysis().trace(maxIter=iterations, tol=float("-inf"))

    checked: dict[str, Callable[[], Any]] = {}
    for name, call in calls.items():
        if name not in ("plain", "HVP"):
            checked[name] = call  # the expensive ones are tried in the first timed round (a failure: see run)
            continue
        try:
            call()
            checked[name] = call
        except Exception as exc:
            notes.append(f"PyHessian {name} failed on {problem['name']}: {type(exc).__name__}: {_first_line(exc)}")
    return checked, size


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:160]
