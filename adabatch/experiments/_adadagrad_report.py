r"""Analysis, ``summary.md`` and plots of the AdAdaGrad experiment (:mod:`adabatch.experiments.adadagrad`).

Definitions used by every number reported:

* a run's *smoothed* test metric at an evaluation is the mean of its last three evaluations (the 359-example test
  set moves in steps of 0.28%); its *final* metric is the smoothed value at the end of the budget;
* the *target* of an optimizer is the mean over seeds of the final metric of its small fixed-batch baseline, less
  ``target_tolerance`` (more for a loss): the same target for every arm of that optimizer, the baseline included;
* a run *reaches* the target at the first evaluation whose smoothed metric is at least the target; steps and samples
  to the target are counted there, on both sides of every ratio (never a whole budget);
* ratios are paired by seed (same initialisation and example stream): *fewer steps* is the baseline's steps to the
  target divided by the arm's, *samples* is the arm's samples to the target divided by the baseline's; reported as
  the geometric mean over the seeds where both reached, with a 95% t-interval on the logarithms;
* McCandlish et al.'s model :math:`S = S_{\min}(1 + B_\text{noise}/B)`, :math:`E = E_{\min}(1 + B/B_\text{noise})`
  (equivalently :math:`(S/S_{\min}-1)(E/E_{\min}-1) = 1`) is fitted by least squares of :math:`S = S_{\min} +
  E_{\min}/B` on the fixed batches that reached the target on every seed; an arm with
  :math:`(S/S_{\min}-1)(E/E_{\min}-1) < 1` beats every fixed batch of the fitted model on both axes at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adabatch.experiments._io import save_figure

__all__ = ["analyse", "fit_mcCandlish", "plot", "reach", "smoothed", "summary"]


def smoothed(values: list[float]) -> np.ndarray:
    """Running mean of the last three values.

    Example:
      >>> from adabatch.experiments._adadagrad_report import smoothed
      >>> smoothed([0.0, 3.0, 6.0, 9.0]).tolist()
      [0.0, 1.5, 3.0, 6.0]
    """
    x = np.asarray(values, np.float64)
    return np.array([x[max(0, i - 2) : i + 1].mean() for i in range(len(x))])


def reach(record: dict, target: float, higher_is_better: bool) -> tuple[int, int] | None:
    """(steps, samples) at the first evaluation after a step whose smoothed test metric meets ``target``, else
    None."""
    s = smoothed(record["evals"]["test"])
    hit = (s >= target if higher_is_better else s <= target) & (np.asarray(record["evals"]["step"]) > 0)
    if not hit.any():
        return None
    i = int(np.argmax(hit))
    return int(record["evals"]["step"][i]), int(record["evals"]["samples"][i])


def _interval(values: list[float]) -> list[float] | None:
    """95% t-interval of the mean (None with fewer than two values)."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return None
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return [float(x.mean() - half), float(x.mean() + half)]


def _geometric(ratios: list[float]) -> dict[str, Any]:
    if not ratios:
        return {"mean": None, "ci": None, "n": 0}
    logs = np.log(ratios)
    ci = _interval(list(logs))
    return {"mean": float(np.exp(logs.mean())), "ci": None if ci is None else np.exp(ci).tolist(), "n": len(ratios)}


def fit_mcCandlish(batch_sizes: list[int], steps: list[float]) -> dict[str, Any] | None:
    r"""Least-squares fit of :math:`S(B) = S_{\min} + E_{\min}/B` (None with fewer than two points or a
    non-positive coefficient).

    Example:
      >>> from adabatch.experiments._adadagrad_report import fit_mcCandlish
      >>> fit = fit_mcCandlish([8, 32, 128], [100 + 4000 / 8, 100 + 4000 / 32, 100 + 4000 / 128])
      >>> round(fit["s_min"]), round(fit["e_min"]), round(fit["b_noise"])
      (100, 4000, 40)
    """
    if len(batch_sizes) < 2:
        return None
    design = np.stack([np.ones(len(batch_sizes)), 1.0 / np.asarray(batch_sizes, np.float64)], 1)
    (s_min, e_min), *_ = np.linalg.lstsq(design, np.asarray(steps, np.float64), rcond=None)
    if s_min <= 0 or e_min <= 0:
        return None
    return {"s_min": float(s_min), "e_min": float(e_min), "b_noise": float(e_min / s_min), "n": len(batch_sizes)}


def _excess(fit: dict | None, steps: float | None, samples: float | None) -> float | None:
    if fit is None or steps is None or samples is None:
        return None
    return float((steps / fit["s_min"] - 1.0) * (samples / fit["e_min"] - 1.0))


def _family(entry: dict) -> str:
    return entry["arm"]["optimizer"]


def _baseline(result: dict, optimizer: str) -> dict | None:
    small = result["protocol"]["init_batch_size"] if optimizer == "sgd" else result["protocol"]["fixed_batch_sizes"][0]
    return next(
        (
            e
            for e in result["arms"]
            if e["arm"]["kind"] == "fixed" and e["arm"]["optimizer"] == optimizer and e["arm"]["batch_size"] == small
        ),
        None,
    )


def _batch_summary(entry: dict, cap: int) -> dict[str, Any]:
    """First batch, largest batch, steps until the cap (None: never) and number of distinct sizes, per seed 0."""
    rle = entry["runs"][0]["batch"]
    sizes = [size for size, _ in rle]
    steps_to_cap, t = None, 0
    for size, k in rle:
        if size >= cap:
            steps_to_cap = t
            break
        t += k
    return {"first": sizes[0], "max": max(sizes), "steps_to_cap": steps_to_cap, "distinct_sizes": len(set(sizes))}


def analyse(result: dict[str, Any]) -> dict[str, Any]:
    """Targets, steps and samples to the target, paired ratios, McCandlish fits and the verdict."""
    higher = result["higher_is_better"]
    tol = result["protocol"]["target_tolerance"]
    cap = result.get("max_batch_size", result["training_examples"])
    targets, baselines = {}, {}
    for optimizer in {_family(e) for e in result["arms"]}:
        base = _baseline(result, optimizer)
        if base is None:
            continue
        final = np.mean([smoothed(r["evals"]["test"])[-1] for r in base["runs"]])
        targets[optimizer] = float(final - tol if higher else final + tol)
        baselines[optimizer] = base
    arms = []
    for entry in result["arms"]:
        optimizer = _family(entry)
        target = targets.get(optimizer)
        finals = [float(smoothed(r["evals"]["test"])[-1]) for r in entry["runs"]]
        hits = [None if target is None else reach(r, target, higher) for r in entry["runs"]]
        base_runs = baselines[optimizer]["runs"] if optimizer in baselines else [None] * len(hits)
        base_hits = [None if r is None or target is None else reach(r, target, higher) for r in base_runs]
        paired = [(h, b) for h, b in zip(hits, base_hits, strict=True) if h is not None and b is not None]
        done = [h for h in hits if h is not None]
        row = {
            "name": entry["arm"]["name"],
            "optimizer": optimizer,
            "kind": entry["arm"]["kind"],
            "learning_rate": entry["learning_rate"],
            "lr_at_edge": entry["lr_at_edge"],
            "final": {"mean": float(np.mean(finals)), "ci": _interval(finals)},
            "steps": int(np.mean([r["steps"] for r in entry["runs"]])),
            "reached": len(done),
            "seeds": len(hits),
            "steps_to_target": {"mean": float(np.mean([h[0] for h in done])) if done else None,
                                "ci": _interval([h[0] for h in done])},
            "samples_to_target": {"mean": float(np.mean([h[1] for h in done])) if done else None,
                                  "ci": _interval([h[1] for h in done])},
            "fewer_steps": _geometric([b[0] / h[0] for h, b in paired]),
            "sample_ratio": _geometric([h[1] / b[1] for h, b in paired]),
            "batch": _batch_summary(entry, cap),
        }  # fmt: skip
        if entry["arm"]["kind"] == "rule":
            first = [r["evals"]["b_simple"][0] for r in entry["runs"]]
            eta = entry["arm"]["constant"]
            row["b_simple_at_init"] = float(np.mean(first))
            row["b_simple_over_eta2_at_init"] = float(np.mean(first) / eta**2)
        arms.append(row)
    fits = {}
    for optimizer in targets:
        fixed = [a for a in arms if a["optimizer"] == optimizer and a["kind"] == "fixed" and a["reached"] == a["seeds"]]
        sizes = [int(a["name"].split("/")[0].split("-")[1]) for a in fixed]
        fits[optimizer] = fit_mcCandlish(sizes, [a["steps_to_target"]["mean"] for a in fixed])
    for a in arms:
        if a["reached"] == a["seeds"]:
            a["mccandlish_excess"] = _excess(
                fits.get(a["optimizer"]), a["steps_to_target"]["mean"], a["samples_to_target"]["mean"]
            )
        else:
            a["mccandlish_excess"] = None
    analysis = {"targets": targets, "arms": arms, "mccandlish": fits}
    analysis["verdict"] = _verdict(result, analysis)
    return analysis


def _row(analysis: dict, name: str) -> dict | None:
    return next((a for a in analysis["arms"] if a["name"] == name), None)


def _ratio_text(a: dict) -> str:
    f, s = a["fewer_steps"], a["sample_ratio"]
    if f["mean"] is None:
        return f"reached the target on {a['reached']}/{a['seeds']} seeds"
    ci = "" if f["ci"] is None else f" [{f['ci'][0]:.2f}, {f['ci'][1]:.2f}]"
    sci = "" if s["ci"] is None else f" [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]"
    return (
        f"{f['mean']:.2f}×{ci} fewer steps with {s['mean']:.2f}×{sci} the samples to the target "
        f"({a['reached']}/{a['seeds']} seeds reached it)"
    )


def _verdict(result: dict, analysis: dict) -> list[str]:
    """Plain statements, each backed by the numbers of the analysis."""
    protocol = result["protocol"]
    cap = result.get("max_batch_size", result["training_examples"])
    lines = []
    for optimizer in protocol["optimizers"]:
        if optimizer not in analysis["targets"]:
            continue
        rules = [a for a in analysis["arms"] if a["kind"] == "rule" and a["optimizer"] == optimizer]
        at_authors = [a for a in rules if a["name"].startswith(tuple(f"{r}(η={protocol['constants'][0]:g})"
                                                                      for r in protocol["rules"]))]  # fmt: skip
        jumps = [a for a in at_authors if a["batch"]["steps_to_cap"] is not None and a["batch"]["steps_to_cap"] <= 3]
        if jumps:
            names = ", ".join(a["name"].split("/")[0] for a in jumps)
            worst = min(a.get("b_simple_over_eta2_at_init", np.inf) for a in jumps)
            lines.append(
                f"{optimizer}: at the authors' constant ({protocol['constants'][0]:g}) {names} reach the cap "
                f"({cap}) within 3 steps: the measured B_simple at initialisation divided by "
                f"η² is already ≥ {worst:.0f}, so the very first test asks for more than the data set. These arms "
                f"are full-batch AdaGrad{'-Norm' if optimizer == 'adagrad_norm' else ''}, not a growing batch."
            )
        growing = [a for a in rules if a["batch"]["distinct_sizes"] >= 5 and (a["batch"]["steps_to_cap"] or 10) >= 10]
        good = [a for a in growing if a["reached"] == a["seeds"] and a["fewer_steps"]["ci"] is not None
                and a["fewer_steps"]["ci"][0] > 1.0]  # fmt: skip
        if good:
            best = max(good, key=lambda a: a["fewer_steps"]["mean"])
            lines.append(f"{optimizer}: the best genuinely growing rule is {best['name']}: {_ratio_text(best)}.")
            cheap = [a for a in good if a["sample_ratio"]["mean"] <= 1.5 and a["fewer_steps"]["mean"] >= 2.0]
            if cheap:
                best = max(cheap, key=lambda a: a["fewer_steps"]["mean"])
                lines.append(
                    f"{optimizer}: ≥ 2× fewer steps with ≤ 1.5× the samples is met by {len(cheap)} growing rule "
                    f"setting(s), best {best['name']}."
                )
            else:
                lines.append(f"{optimizer}: no growing rule setting gives ≥ 2× fewer steps with ≤ 1.5× the samples.")
        else:
            lines.append(
                f"{optimizer}: no rule setting that grows the batch gradually reaches the target on every seed "
                "with significantly fewer steps than the small batch."
            )
        fit = analysis["mccandlish"].get(optimizer)
        if fit is not None:
            beats = [a for a in analysis["arms"] if a["optimizer"] == optimizer and a["kind"] in ("rule", "warmup")
                     and a["mccandlish_excess"] is not None and a["mccandlish_excess"] < 1.0]  # fmt: skip
            names = ", ".join(f"{a['name'].split('/')[0]} ({a['mccandlish_excess']:.2f})" for a in beats) or "none"
            lines.append(
                f"{optimizer}: fixed batches fit S_min = {fit['s_min']:.0f} steps, E_min = {fit['e_min']:.0f} samples "
                f"(B_noise = {fit['b_noise']:.0f}); arms below the fixed-batch curve, (S/S_min−1)(E/E_min−1) < 1: "
                f"{names}."
            )
    c = _row(analysis, f"coordinate_norm(η={protocol['constants'][0]:g})/adagrad")
    n = _row(analysis, f"norm(η={protocol['constants'][0]:g})/adagrad")
    if c is not None and n is not None:
        lines.append(
            f"coordinate-wise test with AdaGrad (authors' constant): final {result['metric']} "
            f"{c['final']['mean']:.4f} against {n['final']['mean']:.4f} for the norm test; {_ratio_text(c)}."
        )
    return lines


def _fmt_ci(value: dict, spec: str = ".0f") -> str:
    if value["mean"] is None:
        return "—"
    ci = "" if value["ci"] is None else f" [{value['ci'][0]:{spec}}, {value['ci'][1]:{spec}}]"
    return f"{value['mean']:{spec}}{ci}"


def _table(rows: list[dict], metric: str) -> list[str]:
    out = [
        f"| arm | lr | final {metric} | steps run | reached | steps to target | samples to target | × fewer steps "
        "| × samples | batch (seed 0) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in rows:
        b = a["batch"]
        batch = f"{b['first']}" if b["first"] == b["max"] else f"{b['first']}→{b['max']}"
        if b["steps_to_cap"] is not None and b["first"] != b["max"]:
            batch += f" (cap at step {b['steps_to_cap']})"
        lr = f"{a['learning_rate']:.3g}" + (" (edge)" if a["lr_at_edge"] else "")
        out.append(
            f"| {a['name']} | {lr} | {_fmt_ci(a['final'], '.4f')} | {a['steps']} | {a['reached']}/{a['seeds']} | "
            f"{_fmt_ci(a['steps_to_target'])} | {_fmt_ci(a['samples_to_target'])} | "
            f"{_fmt_ci(a['fewer_steps'], '.2f')} | {_fmt_ci(a['sample_ratio'], '.2f')} | {batch} |"
        )
    return out


def summary(result: dict[str, Any]) -> str:
    """The Markdown report."""
    analysis, protocol = result["analysis"], result["protocol"]
    m = result["machine"]
    lines = [
        f"# AdAdaGrad experiment on {protocol['data']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}, jax {m['jax']} ({m['backend']}); "
        f"wall time {result['elapsed_s']:.0f} s, {result['compilations']} compilations.",
        "",
        f"Budget {protocol['epochs']:g} epochs of {result['training_examples']} training examples for every arm; "
        f"{protocol['seeds']} evaluation seeds, learning rates tuned on {protocol['tuning_seeds']} other seed(s) by "
        "the final validation loss. Intervals: 95% t-intervals over seeds.",
        "",
        "Targets (the small fixed batch's final "
        f"{result['metric']}, mean over seeds, less the tolerance {protocol['target_tolerance']:g}): "
        + ", ".join(f"{k} {v:.4f}" for k, v in analysis["targets"].items()),
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in analysis["verdict"]],
    ]
    first = protocol["constants"][0]
    for optimizer in [*protocol["optimizers"], "sgd"]:
        rows = [a for a in analysis["arms"] if a["optimizer"] == optimizer]
        if not rows:
            continue
        main = [a for a in rows if a["kind"] != "rule" or f"(η={first:g})" in a["name"]]
        lines += ["", f"## {optimizer}: every arm at the authors' constant", "", *_table(main, result["metric"])]
        sweep = [a for a in rows if a["kind"] == "rule"]
        if sweep:
            lines += ["", f"## {optimizer}: sweep of each rule's constant", "", *_table(sweep, result["metric"])]
        fit = analysis["mccandlish"].get(optimizer)
        if fit is not None:
            lines += [
                "",
                f"McCandlish fit on the fixed batches ({fit['n']} sizes): S_min = {fit['s_min']:.0f}, "
                f"E_min = {fit['e_min']:.0f}, B_noise = E_min/S_min = {fit['b_noise']:.0f}.",
            ]
    rules = [a for a in analysis["arms"] if "b_simple_at_init" in a and f"(η={first:g})" in a["name"]]
    if rules:
        lines += ["", "## Why the batch moves as it does", "",
                  "| rule | B_simple at initialisation | B_simple/η² | cap | steps to the cap (seed 0) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        cap = result.get("max_batch_size", result["training_examples"])
        for a in rules:
            to_cap = a["batch"]["steps_to_cap"]
            lines.append(
                f"| {a['name']} | {a['b_simple_at_init']:.0f} | {a['b_simple_over_eta2_at_init']:.0f} | {cap} | "
                f"{'never' if to_cap is None else to_cap} |"
            )
    if result.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in result["plots"])]
    return "\n".join(lines) + "\n"


def _curve(records: list[dict], axis: str, grid: np.ndarray) -> np.ndarray:
    """Seed mean of the smoothed test metric interpolated on ``grid`` (log scale for steps)."""
    rows = []
    for r in records:
        x = np.asarray(r["evals"][axis], np.float64)
        y = smoothed(r["evals"]["test"])
        if axis == "step":
            x, g = np.log(np.maximum(x, 1.0)), np.log(grid)
        else:
            g = grid
        rows.append(np.interp(g, x, y, right=np.nan))
    return np.nanmean(np.array(rows), 0) if rows else np.full(len(grid), np.nan)


def plot(result: dict[str, Any], out: Path) -> list[str]:
    """``curves_<optimizer>.png``, ``batch_<optimizer>.png`` and ``pareto_<optimizer>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis, protocol = result["analysis"], result["protocol"]
    entries = {e["arm"]["name"]: e for e in result["arms"]}
    first = protocol["constants"][0]
    budget = protocol["epochs"] * result["training_examples"]
    files: list[str] = []
    for optimizer in protocol["optimizers"]:
        target = analysis["targets"].get(optimizer)
        fixed = [f"fixed-{b}/{optimizer}" for b in protocol["fixed_batch_sizes"]]
        shown = [fixed[0], fixed[len(fixed) // 2], fixed[-1]]
        shown += [f"warmup-{protocol['warmup_periods'][len(protocol['warmup_periods']) // 2]}/{optimizer}"]
        shown += [f"{r}(η={c:g})/{optimizer}" for r in protocol["rules"] for c in (first, 1.0)]
        shown = [s for s in dict.fromkeys(shown) if s in entries]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
        colors = plt.cm.tab20(np.linspace(0, 1, len(shown)))
        for name, color in zip(shown, colors, strict=True):
            runs = entries[name]["runs"]
            max_steps = max(r["evals"]["step"][-1] for r in runs)
            steps = np.unique(np.geomspace(1, max(max_steps, 1), 200).round())
            style = "--" if name.startswith(("fixed", "warmup")) else "-"
            axes[0].plot(steps, _curve(runs, "step", steps), style, color=color, lw=1.2, label=name.split("/")[0])
            samples = np.linspace(0, budget, 200)
            axes[1].plot(samples, _curve(runs, "samples", samples), style, color=color, lw=1.2)
        for ax, xlabel in zip(axes, ("optimizer steps", "training examples seen"), strict=True):
            if target is not None:
                ax.axhline(target, color="k", lw=0.8, ls=":", label="target" if ax is axes[0] else None)
            ax.set(xlabel=xlabel)
            ax.grid(alpha=0.3)
        axes[0].set(xscale="log", ylabel=f"{result['metric']} (mean of seeds, smoothed)")
        if result["higher_is_better"] and target is not None:
            axes[0].set_ylim(max(0.0, target - 0.25), min(1.0, target + 0.05))
        axes[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{optimizer} on {protocol['data']}: {result['metric']} against steps and samples")
        save_figure(fig, out, f"curves_{optimizer}.png", files)

        rules = [r for r in protocol["rules"] if f"{r}(η={first:g})/{optimizer}" in entries]
        ncols = min(len(rules), 3)
        nrows = -(-len(rules) // ncols)
        fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), sharey=True, squeeze=False)
        axes = grid.ravel()
        for ax in axes[len(rules) :]:
            ax.set_visible(False)
        constants = [c for c in protocol["constants"] if c in (first, 0.5, 1.0, 2.0)]
        palette = plt.cm.viridis(np.linspace(0, 0.9, len(constants)))
        for ax, rule in zip(axes, rules, strict=False):
            for c, color in zip(constants, palette, strict=True):
                name = f"{rule}(η={c:g})/{optimizer}"
                if name not in entries:
                    continue
                run = entries[name]["runs"][0]
                sizes = np.concatenate([[size] * k for size, k in run["batch"]])
                ax.step(np.arange(1, len(sizes) + 1), sizes, where="post", color=color, lw=1.2, label=f"η={c:g}")
                ev = run["evals"]
                ax.plot(np.maximum(ev["step"], 1), np.asarray(ev["b_simple"]) / c**2, ":", color=color, lw=1)
            ax.axhline(result.get("max_batch_size", result["training_examples"]), color="k", lw=0.8, ls="--")
            ax.set(xscale="log", yscale="log", title=rule.replace("_", " "), xlabel="step")
            ax.grid(alpha=0.3)
        for ax in grid[:, 0]:
            ax.set_ylabel("batch size (solid)\nB_simple/η² (dotted)")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{optimizer}: batch-size trajectories (seed 0); dashed: the cap")
        save_figure(fig, out, f"batch_{optimizer}.png", files)

        rows = [a for a in analysis["arms"] if a["optimizer"] == optimizer and a["reached"] == a["seeds"]]
        fig, ax = plt.subplots(figsize=(6.8, 5))
        fit = analysis["mccandlish"].get(optimizer)
        if fit is not None:
            s = np.geomspace(fit["s_min"] * 1.01, fit["s_min"] * 300, 200)
            ax.plot(s, fit["e_min"] * (1 + 1 / (s / fit["s_min"] - 1)), "k-", lw=0.8, label="fixed-batch fit")
        groups = {"fixed": ("ko", "fixed batch"), "warmup": ("gs", "warm-up")}
        for kind, (style, label) in groups.items():
            pts = [a for a in rows if a["kind"] == kind]
            if pts:
                ax.plot([a["steps_to_target"]["mean"] for a in pts], [a["samples_to_target"]["mean"] for a in pts],
                        style, ms=5, label=label)  # fmt: skip
        markers = dict(zip(protocol["rules"], "v^<>D", strict=False))
        for rule in protocol["rules"]:
            pts = [a for a in rows if a["kind"] == "rule" and a["name"].startswith(f"{rule}(")]
            if pts:
                ax.plot([a["steps_to_target"]["mean"] for a in pts], [a["samples_to_target"]["mean"] for a in pts],
                        marker=markers[rule], ls="-", lw=0.6, ms=5, label=rule.replace("_", " "))  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="steps to the target", ylabel="samples to the target",
               title=f"{optimizer}: steps against samples to the target (seed means)")  # fmt: skip
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        save_figure(fig, out, f"pareto_{optimizer}.png", files)
    return files
