r"""Analysis, ``summary.md`` and plots of the optimizer comparison (:mod:`adabatch.experiments.optimizers`).

Definitions used by every number reported (the smoothing, the reach and the intervals are those of the AdAdaGrad
experiment, :mod:`adabatch.experiments._adadagrad_report`):

* a run's *final* test metric is the mean of its last three evaluations;
* the *target* is the mean over seeds of the final metric of fixed-batch Adam, less ``target_tolerance`` (plus, for a
  loss): one target for every arm; a run *reaches* it at the first evaluation whose mean of the last three
  evaluations meets it, and steps and samples to the target are counted there;
* *Δ vs Adam* is the arm's final metric minus Adam's with the same batching (fixed Adam for the optimal-batch arm),
  paired by seed (same initialisation and example stream), with a 95% t-interval of the paired differences;
* *× fewer steps* (a rule's arm against the same optimizer's fixed batch, or an optimizer against Adam) is the
  reference's steps to the target over the arm's, *× samples* the arm's samples over the reference's, both paired by
  seed over the seeds where both reached the target: geometric mean with a 95% t-interval on the logarithms;
* the *learning-rate span* of an arm is the ratio of the largest to the smallest learning rate of the contiguous
  stretch of its grid around the tuned one whose mean final validation metric (tuning seeds) is within
  ``target_tolerance`` of the best; a stretch that touches an edge of the grid is a lower bound (``≥``).

A claim *shows* when the interval of its comparison lies on the claimed side, is *opposite* when it lies on the other
side, and is *not resolved* otherwise (see :func:`claims`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adabatch.experiments._adadagrad_report import _batch_summary, _geometric, _interval, reach, smoothed
from adabatch.experiments._io import save_figure

__all__ = ["CLAIMS", "VERDICTS", "analyse", "claims", "lr_span", "paired_difference", "plot", "summary"]

# The paper's claim for each method, as its docs page states it, and how this experiment tests it.
CLAIMS: dict[str, tuple[str, str]] = {
    "adagrad_norm": ("Ward, Wu & Bottou 2019", "one scalar AdaGrad step size is robust to the initial learning rate"),
    "adabelief": ("Zhuang et al. 2020", "as fast as Adam and generalises as well as SGD with momentum"),
    "eve": ("Kunze, Townsend & Barber 2021", "the examplewise second moment trains faster than Adam"),
    "tom": ("Maiya et al. 2021", "the trend-corrected first moment improves on Adam"),
    "maxva": ("Zhu et al. 2020", "the variance-maximising adaptive β₂ improves on Adam"),
    "active_adam": (
        "Wadi, Fredette & Senecal 2023",
        "the sign-driven gain makes Adam insensitive to its initial learning rate",
    ),  # fmt: skip
    "adalomo": ("Lv et al. 2023", "matches Adam(W) with O(n+m) optimizer memory per n×m matrix"),
    "clars": (
        "Huo, Gu & Huang 2021",
        "layer-wise rates from the gradient variance train large batches without warm-up",
    ),  # fmt: skip
    "sgd": ("Alfarra et al. 2020", "the learned batch size minimises SGD's total work (samples) to a target"),
    "extrap_sgd": (
        "Lin, Kong, Stich & Jaggi 2020",
        "extrapolating before each step improves on SGD with Nesterov momentum, above all with large batches",
    ),  # fmt: skip
    "slq_learner": (
        "Granziol, Zohren & Roberts 2022",
        "a learning rate and momentum learned from the Hessian spectrum, untuned, train as well as tuned SGD-momentum",
    ),  # fmt: skip
}


def paired_difference(values: list[float], reference: list[float]) -> dict[str, Any]:
    """Mean and 95% t-interval of the paired differences ``values - reference`` (by seed).

    Example:
      >>> from adabatch.experiments._optimizers_report import paired_difference
      >>> d = paired_difference([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
      >>> round(d["mean"], 6), [round(v, 6) for v in d["ci"]], d["n"]
      (0.1, [0.1, 0.1], 3)
    """
    diff = np.asarray(values, np.float64) - np.asarray(reference, np.float64)
    diff = diff[np.isfinite(diff)]
    if len(diff) == 0:
        return {"mean": None, "ci": None, "n": 0}
    return {"mean": float(diff.mean()), "ci": _interval(list(diff)), "n": int(len(diff))}


def lr_span(learning_rates: list[float], metric: list[float], tolerance: float, higher_is_better: bool,
            best: int) -> dict[str, Any]:  # fmt: skip
    """The contiguous stretch of the grid around index ``best`` whose metric is within ``tolerance`` of the best
    value: ``low``, ``high``, ``ratio = high/low`` and ``at_edge`` (the stretch touches an end of the grid, so the
    ratio is a lower bound). Non-finite metrics (diverged runs) are outside the stretch.

    Example:
      >>> from adabatch.experiments._optimizers_report import lr_span
      >>> lr_span([0.1, 0.2, 0.4, 0.8, 1.6], [0.5, 0.9, 0.95, 0.9, 0.2], 0.05, True, 2)
      {'low': 0.2, 'high': 0.8, 'ratio': 4.0, 'at_edge': False}
    """
    m = np.asarray(metric, np.float64)
    sign = 1.0 if higher_is_better else -1.0
    ok = np.isfinite(m)
    if not ok[best]:
        return {"low": None, "high": None, "ratio": None, "at_edge": False}
    good = ok & (sign * m >= sign * m[best] - tolerance)
    lo = hi = best
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(m) - 1 and good[hi + 1]:
        hi += 1
    low, high = float(learning_rates[lo]), float(learning_rates[hi])
    return {"low": low, "high": high, "ratio": high / low, "at_edge": lo == 0 or hi == len(m) - 1}


def _finals(entry: dict) -> list[float]:
    return [float(smoothed(r["evals"]["test"])[-1]) for r in entry["runs"]]


def _ratios(hits: list, reference: list) -> tuple[dict, dict]:
    paired = [(h, b) for h, b in zip(hits, reference, strict=True) if h is not None and b is not None]
    return _geometric([b[0] / h[0] for h, b in paired]), _geometric([h[1] / b[1] for h, b in paired])


def analyse(result: dict[str, Any]) -> dict[str, Any]:
    """The target, every arm's row (final metric, steps and samples to the target, paired comparisons with Adam and
    with the same optimizer's fixed batch, the learning-rate span) and the claims."""
    higher = result["higher_is_better"]
    tol = result["protocol"]["target_tolerance"]
    cap = result.get("max_batch_size", result["training_examples"])
    entries = {e["arm"]["name"]: e for e in result["arms"]}
    reference = entries.get("adam/fixed") or next(e for e in result["arms"] if e["arm"]["batching"] == "fixed")
    final = float(np.mean(_finals(reference)))
    target = final - tol if higher else final + tol
    hits = {name: [reach(r, target, higher) for r in e["runs"]] for name, e in entries.items()}
    rows = []
    for name, entry in entries.items():
        optimizer, batching = entry["arm"]["optimizer"], entry["arm"]["batching"]
        finals, done = _finals(entry), [h for h in hits[name] if h is not None]
        adam = entries.get(f"adam/{batching}") or entries.get("adam/fixed")
        fixed = entries.get(f"{optimizer}/fixed")
        row: dict[str, Any] = {
            "name": name,
            "optimizer": optimizer,
            "batching": batching,
            "learning_rate": entry["learning_rate"],
            "lr_at_edge": entry["lr_at_edge"],
            "finals": finals,
            "final": {"mean": float(np.mean(finals)), "ci": _interval(finals)},
            "final_val_loss": {"mean": float(np.mean([r["evals"]["val_loss"][-1] for r in entry["runs"]]))},
            "steps": float(np.mean([r["steps"] for r in entry["runs"]])),
            "mean_batch": float(np.mean([r["samples"] / max(r["steps"], 1) for r in entry["runs"]])),
            "reached": len(done),
            "seeds": len(finals),
            "steps_to_target": {"mean": float(np.mean([h[0] for h in done])) if done else None,
                                "ci": _interval([h[0] for h in done])},
            "samples_to_target": {"mean": float(np.mean([h[1] for h in done])) if done else None,
                                  "ci": _interval([h[1] for h in done])},
            "batch": _batch_summary(entry, cap),
            "lr_span": lr_span(entry["learning_rates"], entry["tuning_val_metric"], tol, higher,
                               entry["learning_rates"].index(entry["learning_rate"])),
        }  # fmt: skip
        if adam is not None and adam is not entry:
            row["vs_adam"] = paired_difference(finals, _finals(adam))
            row["vs_adam"]["fewer_steps"], row["vs_adam"]["sample_ratio"] = _ratios(
                hits[name], hits[adam["arm"]["name"]]
            )
        if fixed is not None and fixed is not entry:
            row["vs_fixed"] = paired_difference(finals, _finals(fixed))
            row["vs_fixed"]["fewer_steps"], row["vs_fixed"]["sample_ratio"] = _ratios(
                hits[name], hits[fixed["arm"]["name"]]
            )
        rows.append(row)
    analysis: dict[str, Any] = {"target": target, "reference_final": final, "tolerance": tol, "arms": rows}
    analysis["claims"] = claims(analysis, higher)
    return analysis


def _side(ci: list[float] | None, threshold: float) -> int:
    """+1 when the interval lies above ``threshold``, -1 below, 0 when it straddles it (or is missing)."""
    if ci is None:
        return 0
    return 1 if ci[0] > threshold else -1 if ci[1] < threshold else 0


def _oriented(ci: list[float] | None, higher_is_better: bool) -> list[float] | None:
    """An interval of differences turned so that positive is better."""
    if ci is None or higher_is_better:
        return ci
    return [-ci[1], -ci[0]]


VERDICTS = {1: "shows", -1: "opposite", 0: "not resolved"}


def _ci(value: dict, spec: str) -> str:
    if value.get("mean") is None:
        return "—"
    ci = value.get("ci")
    return f"{value['mean']:{spec}}" + ("" if ci is None else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]")


def _span_text(row: dict) -> str:
    s = row["lr_span"]
    if s["ratio"] is None:
        return "—"
    return f"{'≥ ' if s['at_edge'] else ''}{s['ratio']:.0f}×"


def _combine(sides: list[int]) -> int:
    """All positive: shows; any negative: opposite; otherwise not resolved."""
    if sides and all(s > 0 for s in sides):
        return 1
    return -1 if any(s < 0 for s in sides) else 0


def claims(analysis: dict[str, Any], higher_is_better: bool = True) -> list[dict[str, Any]]:
    """One entry per claim of :data:`CLAIMS` whose arms ran: ``optimizer``, ``paper``, ``claim``, ``verdict``
    (:data:`VERDICTS`: ``shows`` when the interval of the comparison lies on the claimed side, ``opposite`` when it
    lies on the other, ``not resolved`` otherwise) and ``evidence`` (the numbers).

    "Better than Adam" compares the paired final metric with Adam's of the same batching; "faster" the paired steps
    to the target; "matches" and "as well as" are non-inferiority at the margin ``tolerance`` (the interval of the
    difference lies above ``-tolerance``); robustness to the learning rate compares learning-rate spans (no interval:
    a span on the grid's edge is a lower bound, so only a strict order of spans that edges cannot reverse counts).
    """
    rows = {a["name"]: a for a in analysis["arms"]}
    tol = analysis["tolerance"]
    out: list[dict[str, Any]] = []

    def add(optimizer: str, verdict: int, evidence: list[str]) -> None:
        paper, claim = CLAIMS[optimizer]
        out.append({"optimizer": optimizer, "paper": paper, "claim": claim, "verdict": VERDICTS[verdict],
                    "evidence": "; ".join(evidence)})  # fmt: skip

    def versus(name: str, other: str, margin: float) -> tuple[int, str]:
        """Paired final-metric difference (positive: better): +1 if its interval lies above ``-margin``, -1 if below."""
        d = paired_difference(rows[name]["finals"], rows[other]["finals"])
        side = _side(_oriented(d["ci"], higher_is_better), -margin)
        return side, f"{name} − {other}: Δ final {_ci(d, '+.4f')}"

    def faster(name: str) -> tuple[int, str]:
        f = rows[name].get("vs_adam", {}).get("fewer_steps")
        if f is None or f["mean"] is None:
            return 0, f"{name}: {rows[name]['reached']}/{rows[name]['seeds']} seeds reached the target"
        return _side(f["ci"], 1.0), f"{name}: {_ci(f, '.2f')}× fewer steps to the target than Adam ({f['n']} seeds)"

    batchings = [b for b in ("fixed", "norm") if f"adam/{b}" in rows]
    if any(f"eve/{b}" in rows for b in batchings):
        pairs = [faster(f"eve/{b}") for b in batchings if f"eve/{b}" in rows]
        add("eve", _combine([p[0] for p in pairs]), [p[1] for p in pairs])
    for optimizer in ("tom", "maxva"):
        pairs = [versus(f"{optimizer}/{b}", f"adam/{b}", 0.0) for b in batchings if f"{optimizer}/{b}" in rows]
        if pairs:
            add(optimizer, _combine([p[0] for p in pairs]), [p[1] for p in pairs])
    if "adabelief/fixed" in rows and "adam/fixed" in rows and "sgd_momentum/fixed" in rows:
        speed, speed_text = faster("adabelief/fixed")
        general, general_text = versus("adabelief/fixed", "sgd_momentum/fixed", tol)
        verdict = -1 if min(speed, general) < 0 else 1 if general > 0 else 0  # "as fast": not slower
        add("adabelief", verdict, [speed_text, general_text + f" (non-inferiority margin {tol:g})"])
    for optimizer, base in (("active_adam", "adam"), ("adagrad_norm", "sgd")):
        mine, ref = rows.get(f"{optimizer}/fixed"), rows.get(f"{base}/fixed")
        if mine is None or ref is None or mine["lr_span"]["ratio"] is None or ref["lr_span"]["ratio"] is None:
            continue
        a, b = mine["lr_span"], ref["lr_span"]
        if a["ratio"] > b["ratio"] and not b["at_edge"]:
            verdict = 1
        elif a["ratio"] < b["ratio"] and not a["at_edge"]:
            verdict = -1
        else:
            verdict = 0
        add(optimizer, verdict, [f"learning-rate span {_span_text(mine)} against {base}'s {_span_text(ref)} "
                                 "(fixed batch, tuning seeds)"])  # fmt: skip
    pairs = [versus(f"adalomo/{b}", f"adam/{b}", tol) for b in batchings if f"adalomo/{b}" in rows]
    if pairs:
        add("adalomo", _combine([p[0] for p in pairs]), [p[1] + f" (margin {tol:g})" for p in pairs])
    if "clars/norm" in rows and "clars/fixed" in rows:
        side, text = versus("clars/norm", "clars/fixed", tol)
        evidence = [f"mean batch {rows['clars/norm']['mean_batch']:.0f} under the norm test; {text} (margin {tol:g})"]
        if "sgd_momentum/norm" in rows:
            evidence.append(versus("clars/norm", "sgd_momentum/norm", 0.0)[1])
        add("clars", side, evidence)
    pairs = [versus(f"extrap_sgd/{b}", f"sgd_momentum/{b}", 0.0) for b in ("norm", "fixed")
             if f"extrap_sgd/{b}" in rows and f"sgd_momentum/{b}" in rows]  # fmt: skip
    if pairs:
        add("extrap_sgd", _combine([p[0] for p in pairs]), [p[1] for p in pairs])
    pairs = [
        versus(f"slq_learner/{b}", f"sgd_momentum/{b}", tol)
        for b in ("fixed", "norm")
        if f"slq_learner/{b}" in rows and f"sgd_momentum/{b}" in rows
    ]
    if pairs:
        evidence = [p[1] + f" (margin {tol:g})" for p in pairs]
        evidence += [versus(f"slq_learner/{b}", f"adam/{b}", tol)[1] for b in batchings if f"slq_learner/{b}" in rows]
        tuned = [b for b in ("fixed", "norm") if f"slq_learner_tuned/{b}" in rows and f"sgd_momentum/{b}" in rows]
        evidence += [versus(f"slq_learner_tuned/{b}", f"sgd_momentum/{b}", tol)[1] + " (s tuned)" for b in tuned]
        add("slq_learner", _combine([p[0] for p in pairs]), evidence)
    optimal = rows.get("sgd/optimal")
    if optimal is not None and "vs_fixed" in optimal:
        s = optimal["vs_fixed"]["sample_ratio"]
        evidence = [f"samples to the target {_ci(s, '.2f')}× those of fixed-batch SGD ({s['n']} paired seeds; "
                    f"reached {optimal['reached']}/{optimal['seeds']})"]  # fmt: skip
        norm = rows.get("sgd/norm")
        if norm is not None and norm["samples_to_target"]["mean"] is not None:
            evidence.append(f"the norm test with SGD: {norm['samples_to_target']['mean']:.0f} samples "
                            f"({norm['reached']}/{norm['seeds']})")  # fmt: skip
        add("sgd", -_side(s["ci"], 1.0), evidence)
    return out


def _table(rows: list[dict], metric: str) -> list[str]:
    out = [
        f"| arm | lr | final {metric} | Δ vs Adam | reached | steps to target | samples to target | × fewer steps "
        "vs fixed | × samples vs fixed | mean batch | batch (seed 0) | lr span |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in rows:
        b = a["batch"]
        batch = f"{b['first']}" if b["first"] == b["max"] else f"{b['first']}→{b['max']}"
        lr = f"{a['learning_rate']:.3g}" + (" (edge)" if a["lr_at_edge"] else "")
        vs_adam = _ci(a["vs_adam"], "+.4f") if "vs_adam" in a else "—"
        fixed = a.get("vs_fixed", {})
        out.append(
            f"| {a['name']} | {lr} | {_ci(a['final'], '.4f')} | {vs_adam} | {a['reached']}/{a['seeds']} | "
            f"{_ci(a['steps_to_target'], '.0f')} | {_ci(a['samples_to_target'], '.0f')} | "
            f"{_ci(fixed.get('fewer_steps', {}), '.2f')} | {_ci(fixed.get('sample_ratio', {}), '.2f')} | "
            f"{a['mean_batch']:.0f} | {batch} | {_span_text(a)} |"
        )
    return out


def summary(result: dict[str, Any]) -> str:
    """The Markdown report."""
    analysis, protocol, m = result["analysis"], result["protocol"], result["machine"]
    rule = result.get("optimal_rule", {})
    lines = [
        f"# The optimizers compared on {protocol['data']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}, jax {m['jax']} ({m['backend']}); "
        f"wall time {result['elapsed_s']:.0f} s, {result['compilations']} compilations.",
        "",
        f"Budget {protocol['epochs']:g} epochs of {result['training_examples']} training examples for every arm; fixed "
        f"batch {protocol['batch_size']}; norm test η = {protocol['eta']:g} from batch {protocol['batch_size']} to "
        f"{result['max_batch_size']}; optimal-batch rule with L = L_max = μ = 1 and ε = {rule.get('accuracy', 0):.4g} "
        f"(τ* = {protocol['optimal_batch_at_init']} at initialisation, where the mean per-example squared gradient "
        f"norm is {rule.get('h_init', 0):.3g}). {protocol['seeds']} evaluation seeds; learning rates tuned on "
        f"{protocol['tuning_seeds']} other seed(s) by the final validation loss. Intervals: 95% t-intervals over "
        "seeds.",
        "",
        f"Target: fixed-batch Adam's final {result['metric']} {analysis['reference_final']:.4f} "
        f"{'less' if result['higher_is_better'] else 'plus'} {protocol['target_tolerance']:g} = "
        f"{analysis['target']:.4f}.",
        "",
        "## Claims",
        "",
        "| method | paper | claim | here | evidence |",
        "|---|---|---|---|---|",
        *[
            f"| {c['optimizer']} | {c['paper']} | {c['claim']} | **{c['verdict']}** | {c['evidence']} |"
            for c in analysis["claims"]
        ],  # fmt: skip
    ]
    for batching in protocol["batchings"]:
        rows = [a for a in analysis["arms"] if a["batching"] == batching]
        if rows:
            lines += ["", f"## {batching}", "", *_table(rows, result["metric"])]
    if result.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in result["plots"])]
    return "\n".join(lines) + "\n"


_TITLES = {"fixed": "fixed batch", "norm": "norm test", "optimal": "learned optimal batch (SGD)"}


def _curve(records: list[dict], axis: str, grid: np.ndarray) -> np.ndarray:
    rows = []
    for r in records:
        x = np.asarray(r["evals"][axis], np.float64)
        y = smoothed(r["evals"]["test"])
        x, g = (np.log(np.maximum(x, 1.0)), np.log(grid)) if axis == "step" else (x, grid)
        rows.append(np.interp(g, x, y, right=np.nan))
    return np.nanmean(np.array(rows), 0) if rows else np.full(len(grid), np.nan)


def plot(result: dict[str, Any], out: Path) -> list[str]:
    """``final.png`` (final metric per arm), ``curves.png`` (metric against steps and samples), ``lr.png`` (tuning
    loss against the learning rate) and ``batch.png`` (the rules' batch sizes, seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis, protocol = result["analysis"], result["protocol"]
    entries = {e["arm"]["name"]: e for e in result["arms"]}
    optimizers = [o for o in protocol["optimizers"] if any(a["optimizer"] == o for a in analysis["arms"])]
    colors = dict(zip(optimizers, plt.cm.tab20(np.linspace(0, 1, max(len(optimizers), 2))), strict=False))
    batchings = [b for b in protocol["batchings"] if any(a["batching"] == b for a in analysis["arms"])]
    files: list[str] = []

    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(batchings)
    for j, batching in enumerate(batchings):
        for i, optimizer in enumerate(optimizers):
            row = next((a for a in analysis["arms"] if a["name"] == f"{optimizer}/{batching}"), None)
            if row is None:
                continue
            mean, ci = row["final"]["mean"], row["final"]["ci"] or [row["final"]["mean"]] * 2
            ax.errorbar(i + (j - (len(batchings) - 1) / 2) * width, mean, yerr=[[mean - ci[0]], [ci[1] - mean]],
                        fmt="os^"[j % 3], color="C" + str(j), capsize=3,
                        label=batching if i == 0 or optimizer == "sgd" and batching == "optimal" else None)  # fmt: skip
    ax.axhline(analysis["target"], color="k", lw=0.8, ls=":", label="target")
    ax.set_xticks(range(len(optimizers)), [o.replace("_", "\n") for o in optimizers], fontsize=8)
    ax.set(ylabel=f"final {result['metric']} (95% CI)", title=f"final {result['metric']} on {protocol['data']}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    save_figure(fig, out, "final.png", files)

    budget = protocol["epochs"] * result["training_examples"]
    fig, axes = plt.subplots(len(batchings), 2, figsize=(12, 3.8 * len(batchings)), sharey=True, squeeze=False)
    for (ax_steps, ax_samples), batching in zip(axes, batchings, strict=True):
        for optimizer in optimizers:
            entry = entries.get(f"{optimizer}/{batching}")
            if entry is None:
                continue
            runs = entry["runs"]
            steps = np.unique(np.geomspace(1, max(max(r["evals"]["step"][-1] for r in runs), 1), 200).round())
            ax_steps.plot(steps, _curve(runs, "step", steps), color=colors[optimizer], lw=1.1, label=optimizer)
            samples = np.linspace(0, budget, 200)
            ax_samples.plot(samples, _curve(runs, "samples", samples), color=colors[optimizer], lw=1.1)
        for ax, xlabel in ((ax_steps, "optimizer steps"), (ax_samples, "training examples seen")):
            ax.axhline(analysis["target"], color="k", lw=0.8, ls=":")
            ax.set(xlabel=xlabel, title=_TITLES.get(batching, batching))
            ax.grid(alpha=0.3)
        ax_steps.set(xscale="log", ylabel=f"{result['metric']} (seed mean)")
        if result["higher_is_better"]:
            ax_steps.set_ylim(max(0.0, analysis["target"] - 0.2), min(1.0, analysis["target"] + 0.04))
        ax_steps.legend(fontsize=7, ncol=2)
    save_figure(fig, out, "curves.png", files)

    fig, axes = plt.subplots(1, len(batchings), figsize=(5.2 * len(batchings), 4), sharey=True, squeeze=False)
    for ax, batching in zip(axes[0], batchings, strict=True):
        for optimizer in optimizers:
            entry = entries.get(f"{optimizer}/{batching}")
            if entry is not None:
                loss = np.asarray(entry["tuning_val_loss"], np.float64)
                ax.plot(entry["learning_rates"], loss, "o-", ms=3, color=colors[optimizer], lw=1, label=optimizer)
        ax.set(xscale="log", yscale="log", xlabel="learning rate", title=_TITLES.get(batching, batching))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation loss (tuning seeds)")
    axes[0][0].legend(fontsize=7, ncol=2)
    save_figure(fig, out, "lr.png", files)

    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name, entry in entries.items():
        if entry["arm"]["batching"] == "fixed":
            continue
        sizes = np.concatenate([[size] * k for size, k in entry["runs"][0]["batch"]])
        style = "--" if entry["arm"]["batching"] == "optimal" else "-"
        ax.step(np.arange(1, len(sizes) + 1), sizes, style, where="post", color=colors[entry["arm"]["optimizer"]],
                lw=1.1, label=name)  # fmt: skip
    ax.axhline(result["max_batch_size"], color="k", lw=0.8, ls="--")
    ax.set(xscale="log", yscale="log", xlabel="step", ylabel="batch size",
           title="batch-size trajectories (seed 0); dashed line: the cap")  # fmt: skip
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    save_figure(fig, out, "batch.png", files)
    return files
