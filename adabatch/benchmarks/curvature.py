"""Benchmark curvature: one Hessian-vector product, one Lanczos step and a full SLQ spectrum against a plain gradient.

For the models of the statistics benchmark (``adabatch.benchmarks.stats``: an MLP 784-512-512-10 on upsampled
digits, ``adabatch.flax.models.CNN`` on the 8×8 digits, a small ``TransformerLM`` on ``pydoc_data.topics``) and one
batch size, it times (median of jit-compiled calls after a warm-up, ``block_until_ready``, all variants of a model
interleaved round by round) and reports as ratios to a plain gradient (``jax.grad`` of the mean loss) of the same
model and batch, in the same run:

* ``HVP``: one :func:`adabatch.curvature.hvp` (forward-over-reverse, from scratch);
* ``m×n_v``: a whole :func:`adabatch.curvature.hessian_spectrum` with ``m`` Lanczos steps and ``n_v`` probes (the
  gradient linearised once, then ``m`` products per probe, full re-orthogonalisation, eigendecompositions);
* ``Lanczos step / HVP``: the marginal cost of one more step, ``(T(m_max×1) − T(m_min×1)) / (m_max − m_min)``,
  over one HVP (below 1 because the linearisation is shared).

No PyHessian comparison here (it needs PyTorch models of the same networks; see issue 13).

Run ``adabatch bench curvature [--quick] [--models mlp,cnn,lm] [--batch 128] [--out docs/benchmarks.md]`` or
``python -m adabatch.benchmarks.curvature``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from adabatch.benchmarks._report import replace_section
from adabatch.benchmarks.stats import MODELS, _interleaved, make_problem
from adabatch.curvature import hessian_spectrum, hvp

__all__ = ["SECTION", "add_arguments", "execute", "main", "run"]

SECTION = "## Curvature"
DEFAULT_SPECTRA = ((20, 1), (50, 1), (100, 1), (20, 8), (50, 8), (100, 8))
QUICK_SPECTRA = ((2, 1), (4, 1))


def functions(problem: dict, spectra: Sequence[tuple[int, int]]) -> tuple[dict[str, Callable], tuple]:
    """``name -> f(*args)`` for the plain gradient, one HVP and each spectrum ``(m, n_v)``, and the shared args."""
    loss, params, batch = problem["loss"], problem["params"], problem["batch"]
    flat, unravel = ravel_pytree(params)
    vector = unravel(jax.random.normal(jax.random.key(1), flat.shape, flat.dtype))

    def plain(p, b, v, key):
        return jax.grad(lambda q: jnp.mean(loss(q, b)))(p)

    def one_hvp(p, b, v, key):
        return hvp(loss, p, b, v)

    fns: dict[str, Callable] = {"plain": plain, "HVP": one_hvp}
    for m, n in spectra:
        if m > flat.size:
            continue

        def spectrum(p, b, v, key, m=m, n=n):
            return hessian_spectrum(loss, p, b, key=key, num_steps=m, num_probes=n)

        fns[f"{m}×{n}"] = spectrum
    return fns, (params, batch, vector, jax.random.key(0))


def _timed_call(compiled: Any, args: tuple) -> Callable[[], Any]:
    """A call of the compiled function on ``args`` that waits for the result."""
    return lambda: jax.block_until_ready(compiled(*args))


def run(models: Sequence[str], batch: int, spectra: Sequence[tuple[int, int]], quick: bool, repeats: int) -> list[dict]:
    """Median seconds of every variant, per model: ``[{"model", "B", "d", "times": {name: s}}]``."""
    results = []
    for name in models:
        problem = make_problem(name, batch, quick)
        fns, args = functions(problem, spectra)
        calls: dict[str, Callable[[], Any]] = {}
        for variant, fn in fns.items():
            calls[variant] = _timed_call(jax.jit(fn).lower(*args).compile(), args)
        times = _interleaved(calls, repeats, budget_s=20.0 if quick else 120.0)
        d = int(ravel_pytree(problem["params"])[0].size)
        results.append({"model": name, "B": batch, "d": d, "times": times})
        print(f"{name}: d = {d}, " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()), file=sys.stderr)
    return results


def step_over_hvp(times: dict[str, float]) -> float:
    """Marginal seconds of one Lanczos step (single probe) over the seconds of one HVP; NaN without two m."""
    singles = sorted((int(k.split("×")[0]), v) for k, v in times.items() if k.endswith("×1"))
    if len(singles) < 2 or singles[-1][0] == singles[0][0]:
        return float("nan")
    (m0, t0), (m1, t1) = singles[0], singles[-1]
    return (t1 - t0) / (m1 - m0) / times["HVP"]


def render(results: list[dict], command: str) -> str:
    """The Markdown section."""
    names = {"mlp": "MLP 784-512-512-10", "cnn": "CNN (digits 8×8)", "lm": "TransformerLM (pydoc text)"}
    variants = [k for k in results[0]["times"] if k != "plain"] if results else []
    head = ["model", "d", "B", "plain (ms)", *variants, "Lanczos step / HVP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        base = r["times"]["plain"]
        cells = [names.get(r["model"], r["model"]), str(r["d"]), str(r["B"]), f"{base * 1e3:.1f}"]
        cells += [f"{r['times'][k] / base:.2f}×" if k in r["times"] else "—" for k in variants]
        ratio = step_over_hvp(r["times"])
        cells.append(f"{ratio:.2f}" if np.isfinite(ratio) else "—")
        lines.append("| " + " | ".join(cells) + " |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}`. Machine: {machine}, JAX {jax.__version__} backend {jax.default_backend().upper()}.",
            "",
            "Median time of jit-compiled calls as a ratio to a plain gradient of the same model and batch in the same "
            "run. `HVP`: one Hessian-vector product from scratch; `m×n_v`: a whole `hessian_spectrum` with m Lanczos "
            "steps and n_v probes; `Lanczos step / HVP`: the marginal cost of one more single-probe step over one "
            "HVP.",
            "",
            *lines,
            "",
        ]
    )


def _write_section(path: str, text: str) -> None:
    """Replace (or append) the ``## Curvature`` section of ``path``; other sections stay untouched."""
    replace_section(path, SECTION, text)


def execute(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args`` (the ``adabatch bench curvature`` entry point)."""
    models = tuple(m.strip() for m in args.models.split(","))
    bad = [m for m in models if m not in MODELS]
    batch = args.batch or (8 if args.quick else 128)
    if bad or batch < 1:
        raise SystemExit(f"--models must be a subset of {','.join(MODELS)} and --batch positive; got {args}")
    spectra = QUICK_SPECTRA if args.quick else DEFAULT_SPECTRA
    results = run(models, batch, spectra, quick=args.quick, repeats=2 if args.quick else 5)
    command = "adabatch bench curvature" + (" --quick" if args.quick else "") + f" --models {args.models}"
    text = render(results, command + (f" --batch {args.batch}" if args.batch else ""))
    if args.out:
        _write_section(args.out, text)
    print(text)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``adabatch bench curvature`` (also ``python -m adabatch.benchmarks.curvature``)."""
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps (a smoke test)")
    parser.add_argument("--models", default="mlp,cnn,lm", help="comma-separated subset of mlp,cnn,lm")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128; 8 with --quick)")
    parser.add_argument("--out", default=None, help="write the '## Curvature' section into this file")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return execute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
