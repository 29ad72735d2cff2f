"""Benchmark curvature: one Hessian-vector product, one Lanczos step and a full SLQ spectrum against a plain gradient,
and the same quantities from PyHessian on the PyTorch twins of the models.

For the models of the statistics benchmark (``adabatch.benchmarks.stats``: an MLP 784-512-512-10 on upsampled
digits, ``adabatch.flax.models.CNN`` on the 8×8 digits, a small ``TransformerLM`` on ``pydoc_data.topics``) and one
batch size, it times (median of calls after a warm-up, ``block_until_ready``, all variants of a model — both
libraries — interleaved round by round) and reports as ratios to a plain gradient of the same model and batch, in the
same run:

* ``HVP``: one :func:`adabatch.curvature.hvp` (forward-over-reverse, from scratch);
* ``m×n_v``: a whole :func:`adabatch.curvature.hessian_spectrum` with ``m`` Lanczos steps and ``n_v`` probes (the
  gradient linearised once, then ``m`` products per probe, full re-orthogonalisation, eigendecompositions);
* ``Lanczos step / HVP``: the marginal cost of one more step, ``(T(m_max×1) − T(m_min×1)) / (m_max − m_min)``,
  over one HVP.

With the ``bench`` extra (torch, pyhessian) the PyTorch twin of each model (``stats._torch_model``: same layer
sizes, its own initialisation, the same batch, mean cross-entropy) is run through PyHessian in the same rounds
(``_pyhessian_peer``): a plain ``backward()``, one HVP (its ``hessian`` constructor and one product),
``density(iter=m, n_v=n_v)`` on the same grid, ``eigenvalues(top_n=1)`` and ``trace()`` with a fixed number of
iterations. ``torch.set_num_threads`` is set to the number of cores JAX's CPU backend uses.

Run ``adabatch bench curvature [--quick] [--models mlp,cnn,lm] [--batch 128] [--spectra 20x1,100x1,...]
[--no-pyhessian] [--out docs/benchmarks.md]`` or ``python -m adabatch.benchmarks.curvature``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from adabatch.benchmarks import _pyhessian_peer as peer
from adabatch.benchmarks._report import replace_section
from adabatch.benchmarks.stats import make_problem
from adabatch.curvature import hessian_spectrum, hvp

__all__ = ["SECTION", "add_arguments", "execute", "main", "parse_spectra", "render", "run", "targets"]

SECTION = "## Curvature"
DEFAULT_SPECTRA = ((20, 1), (50, 1), (100, 1), (20, 8), (50, 8), (100, 8))
QUICK_SPECTRA = ((2, 1), (4, 1))
MODELS = ("mlp", "cnn", "lm")
NAMES = {"mlp": "MLP 784-512-512-10", "cnn": "CNN (digits 8×8)", "lm": "TransformerLM (pydoc text)"}
TARGET_MIN_D = 100_000  # the speed targets concern models with at least this many parameters
PEER = "pyhessian:"  # prefix of the PyHessian variants among one model's interleaved calls


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


def _rounds(
    calls: dict[str, Callable[[], Any]], repeats: int, budget_s: float, notes: list[str], label: str
) -> dict[str, float]:
    """Median seconds per call, in interleaved rounds (one call of each per round) so that load changes on a shared
    machine hit every variant alike; at least two rounds, at most ``repeats``, fewer once ``budget_s`` is spent. A
    call that raises in the first round is dropped (a line in ``notes``)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    live, spent = dict(calls), 0.0
    for round_ in range(repeats):
        for name, call in list(live.items()):
            start = time.perf_counter()
            try:
                call()
            except Exception as exc:
                if round_ > 0:
                    raise
                notes.append(
                    f"{label}: {name} failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
                )
                del live[name]
                continue
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent += elapsed
        if round_ >= 1 and spent > budget_s:
            break
    return {name: statistics.median(t) for name, t in times.items() if t}


def run(
    models: Sequence[str],
    batch: int,
    spectra: Sequence[tuple[int, int]],
    quick: bool,
    repeats: int,
    *,
    pyhessian: bool = True,
    iterations: int | None = None,
    notes: list[str] | None = None,
    budget_s: float | None = None,
) -> list[dict]:
    """Median seconds of every variant, per model: ``[{"model", "B", "d", "times": {name: s}, "peer": {name: s},
    "peer_d"}]`` (``peer`` empty without PyHessian; the reason, and any failure, go to ``notes``)."""
    notes = [] if notes is None else notes
    iterations = iterations or min(m for m, _ in spectra)
    reason = peer.unavailable() if pyhessian else "skipped (--no-pyhessian)"
    if reason is None:
        import torch

        threads = peer.jax_threads()
        torch.set_num_threads(threads)
        notes.append(
            f"PyTorch {torch.__version__} with torch.set_num_threads({threads}), the cores JAX's CPU backend uses, "
            f"and OMP_WAIT_POLICY={peer.omp_wait_policy()} (see `_pyhessian_peer.unavailable`); PyHessian "
            f"{_version('pyhessian')}, whose `density` calls `torch.eig`, removed from PyTorch 2: a stand-in with "
            "the old return format (by `torch.linalg.eigh` of the symmetric tridiagonal) is installed for the "
            "duration of each call."
        )
    else:
        notes.append(f"PyHessian comparison: {reason}.")
    budget = budget_s if budget_s is not None else (20.0 if quick else 120.0)
    results = []
    for name in models:
        problem = make_problem(name, batch, quick)
        fns, args = functions(problem, spectra)
        calls: dict[str, Callable[[], Any]] = {}
        for variant, fn in fns.items():
            calls[variant] = _timed_call(jax.jit(fn).lower(*args).compile(), args)
            calls[variant]()  # warm-up
        peer_d = 0
        if reason is None:
            peer_calls, peer_d = peer.make_calls(problem, spectra, iterations, notes)  # plain and HVP warmed up
            calls |= {PEER + k: v for k, v in peer_calls.items()}
        times = _rounds(calls, repeats, budget, notes, name)
        d = int(ravel_pytree(problem["params"])[0].size)
        own = {k: v for k, v in times.items() if not k.startswith(PEER)}
        other = {k[len(PEER) :]: v for k, v in times.items() if k.startswith(PEER)}
        results.append({"model": name, "B": batch, "d": d, "times": own, "peer": other, "peer_d": peer_d})
        print(f"{name}: d = {d}, " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()), file=sys.stderr)
    return results


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def step_over_hvp(times: dict[str, float]) -> float:
    """Marginal seconds of one Lanczos step (single probe) over the seconds of one HVP; NaN without two m."""
    singles = sorted((int(k.split("×")[0]), v) for k, v in times.items() if k.endswith("×1"))
    if len(singles) < 2 or singles[-1][0] == singles[0][0] or "HVP" not in times:
        return float("nan")
    (m0, t0), (m1, t1) = singles[0], singles[-1]
    return (t1 - t0) / (m1 - m0) / times["HVP"]


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or not (np.isfinite(value) and np.isfinite(base) and base > 0):
        return "—"
    return f"{value / base:.2f}×"


def _spectrum_keys(results: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in results:
        for k in (*r["times"], *r["peer"]):
            if "×" in k and k not in keys:
                keys.append(k)
    return keys


def targets(results: list[dict], min_d: int = TARGET_MIN_D) -> list[str]:
    """The issue's speed targets on the models with at least ``min_d`` parameters: one line each, met or missed."""
    lines = []
    for r in results:
        if r["d"] < min_d:
            continue
        t, label = r["times"], NAMES.get(r["model"], r["model"])
        hvp_ratio = t["HVP"] / t["plain"]
        parts = [f"one HVP = {hvp_ratio:.2f}× a plain gradient (target ≤ 3×): {_verdict(hvp_ratio <= 3)}"]
        step = step_over_hvp(t)
        m_max = max((int(k.split("×")[0]) for k in t if k.endswith("×1")), default=0)
        if np.isfinite(step):
            parts.append(
                f"one Lanczos step = {step:.2f}× an HVP up to m = {m_max} (target ≤ 1.2× at m = 100): "
                + (_verdict(step <= 1.2) if m_max >= 100 else "not checked (m < 100)")
            )
        pairs = [(k, t[k] / r["peer"][k]) for k in t if "×" in k and k in r["peer"]]
        if pairs:
            faster = sum(ratio < 1 for _, ratio in pairs)
            cells = ", ".join(f"{k}: {ratio:.2f}" for k, ratio in pairs)
            parts.append(
                f"spectrum / PyHessian density {cells} — faster in {faster} of {len(pairs)}: "
                + _verdict(faster == len(pairs))
            )
        else:
            parts.append("spectrum vs PyHessian density: not measured")
        lines.append(f"- **{label}** (d = {r['d']:,}, B = {r['B']}): " + "; ".join(parts) + ".")
    return lines


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def render(results: list[dict], command: str, notes: Sequence[str] = (), machine: str | None = None) -> str:
    """The Markdown section."""
    keys = _spectrum_keys(results)
    head = ["model", "d", "B", "plain (ms)", "HVP", *keys, "Lanczos step / HVP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        base = r["times"]["plain"]
        cells = [NAMES.get(r["model"], r["model"]), str(r["d"]), str(r["B"]), f"{base * 1e3:.1f}"]
        cells += [_ratio(r["times"].get(k), base) for k in ["HVP", *keys]]
        ratio = step_over_hvp(r["times"])
        cells.append(f"{ratio:.2f}" if np.isfinite(ratio) else "—")
        lines.append("| " + " | ".join(cells) + " |")
    peers = [r for r in results if r["peer"]]
    peer_lines: list[str] = []
    if peers:
        extra = ["top eig", "trace"]
        head = ["model (PyTorch twin)", "d", "plain (ms)", "HVP", *keys, *extra]
        peer_lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in peers:
            base = r["peer"].get("plain")
            cells = [NAMES.get(r["model"], r["model"]), str(r["peer_d"]), f"{base * 1e3:.1f}" if base else "—"]
            cells += [_ratio(r["peer"].get(k), base) for k in ["HVP", *keys, *extra]]
            peer_lines.append("| " + " | ".join(cells) + " |")
        head = ["model", *keys]
        peer_lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in peers:
            cells = [NAMES.get(r["model"], r["model"])]
            for k in keys:
                a, b = r["times"].get(k), r["peer"].get(k)
                cells.append(f"{a / b:.2f} ({a:.2f} s / {b:.2f} s)" if a and b else "—")
            peer_lines.append("| " + " | ".join(cells) + " |")
    machine = machine or f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    goal = targets(results)
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}`. Machine: {machine}; JAX {jax.__version__}, backend "
            f"{jax.default_backend().upper()}.",
            "",
            "**adabatch.** Median time of jit-compiled calls as a ratio to a plain gradient (`jax.grad` of the mean "
            "loss) of the same model and batch in the same run. `HVP`: one Hessian-vector product from scratch; "
            "`m×n_v`: a whole `hessian_spectrum` with m Lanczos steps and n_v probes (linearisation, products, full "
            "re-orthogonalisation, eigendecompositions); `Lanczos step / HVP`: the marginal cost of one more "
            "single-probe step, (T(m_max×1) − T(m_min×1)) / (m_max − m_min), over one HVP.",
            "",
            *lines,
            "",
            *(
                [
                    "**PyHessian** on the PyTorch twin of each model (same layer sizes, same batch, mean "
                    "cross-entropy; the LM's logits flattened over tokens), as a ratio to a plain PyTorch "
                    "`backward()` in the same rounds. `HVP`: the `hessian(model, criterion, data=(x, y))` "
                    "constructor (a gradient with `create_graph=True`) and one double-backward product; `m×n_v`: "
                    f"constructor + `density(iter=m, n_v=n_v)`; `top eig`: `eigenvalues(maxIter={_iters(results)}, "
                    f"top_n=1)`; `trace`: `trace(maxIter={_iters(results)})`, both with `tol=-inf` so that exactly "
                    "that many products run. Then the head-to-head ratio, adabatch spectrum / PyHessian density for "
                    "the same m and n_v (below 1: adabatch is faster), with both medians.",
                    "",
                    *peer_lines,
                    "",
                ]
                if peer_lines
                else []
            ),
            "**Targets** (issue 13, models with ≥ 100k parameters):",
            "",
            *(goal or ["- no model with ≥ 100k parameters in this run."]),
            "",
            *(["Notes:", "", *[f"- {n}" for n in notes], ""] if notes else []),
        ]
    )


def _iters(results: list[dict]) -> str:
    return str(results[0].get("iterations", "k")) if results else "k"


def _write_section(path: str, text: str) -> None:
    """Replace (or append) the ``## Curvature`` section of ``path``; other sections stay untouched."""
    replace_section(path, SECTION, text)


def parse_spectra(text: str) -> tuple[tuple[int, int], ...]:
    """``"20x1,100x8"`` -> ``((20, 1), (100, 8))``; a ``SystemExit`` naming ``--spectra`` on anything else."""
    try:
        out = tuple(tuple(int(v) for v in item.replace("×", "x").split("x")) for item in text.split(","))
    except ValueError:
        out = ()
    if not out or any(len(p) != 2 or min(p) < 1 for p in out):
        raise SystemExit(f"--spectra must be a comma-separated list of MxN (m steps, n probes >= 1), got {text!r}")
    return tuple((p[0], p[1]) for p in out)


def execute(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args`` (the ``adabatch bench curvature`` entry point)."""
    models = tuple(m.strip() for m in args.models.split(","))
    bad = [m for m in models if m not in MODELS]
    batch = args.batch or (8 if args.quick else 128)
    if bad or batch < 1:
        raise SystemExit(f"--models must be a subset of {','.join(MODELS)} and --batch positive; got {args}")
    spectra = parse_spectra(args.spectra) if args.spectra else (QUICK_SPECTRA if args.quick else DEFAULT_SPECTRA)
    iterations = args.iterations or min(m for m, _ in spectra)
    notes: list[str] = []
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    results = run(
        models,
        batch,
        spectra,
        quick=args.quick,
        repeats=2 if args.quick else args.repeats,
        pyhessian=not args.no_pyhessian,
        iterations=iterations,
        notes=notes,
    )
    for r in results:
        r["iterations"] = iterations
    elapsed = time.perf_counter() - start
    command = "adabatch bench curvature" + (" --quick" if args.quick else "") + f" --models {args.models}"
    command += f" --batch {args.batch}" if args.batch else ""
    command += f" --spectra {args.spectra}" if args.spectra else ""
    command += f" --iterations {args.iterations}" if args.iterations else ""
    command += f" --repeats {args.repeats}" if args.repeats != 5 and not args.quick else ""
    command += " --no-pyhessian" if args.no_pyhessian else ""
    machine = f"{platform.processor() or platform.machine()}, {peer.jax_threads()} CPU cores"
    if load is not None:
        end = os.getloadavg()
        machine += (
            f", shared with other jobs (load average {load[0]:.1f} at the start, {end[0]:.1f} at the end: timings "
            f"are noisy, the ratios within a round less so); {elapsed:.0f} s in all"
        )
    text = render(results, command, notes, machine)
    if args.out:
        _write_section(args.out, text)
    print(text)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``adabatch bench curvature`` (also ``python -m adabatch.benchmarks.curvature``)."""
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps (a smoke test)")
    parser.add_argument("--models", default="mlp,cnn,lm", help="comma-separated subset of mlp,cnn,lm")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128; 8 with --quick)")
    parser.add_argument(
        "--spectra",
        default=None,
        help="spectra to time, MxN = M Lanczos steps and N probes, comma-separated "
        "(default 20x1,50x1,100x1,20x8,50x8,100x8; 2x1,4x1 with --quick)",
    )
    parser.add_argument(
        "--iterations", type=int, default=None, help="PyHessian power/Hutchinson iterations (default: the smallest M)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="at most this many timed rounds (default 5)")
    parser.add_argument("--no-pyhessian", action="store_true", help="skip the PyHessian comparison")
    parser.add_argument("--out", default=None, help="write the '## Curvature' section into this file")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    return execute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
