"""Analysis, plots and summary of ``adabatch experiment batch-hessian`` (:mod:`adabatch.experiments.batch_hessian`):
per batch size the extremal eigenvalues with intervals, the random-matrix excess fit, the predicted maximal stable
learning rates with fitted exponents, their comparison with lr-vs-batch's measured optima, and which claims hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adabatch.experiments._io import save_figure
from adabatch.experiments.lr_vs_batch import fit_power_law

__all__ = ["analyse", "plot", "summary"]

SMALL_B_DEFAULT = 16  # the small-B regime when no lr-vs-batch noise scale is available: B <= 16
SGD_SERIES = "hessian/sgd"
ADAM_SERIES = ("hessian/adam/adam_batch", "hessian/adam/adam_state")
LR_FITS = (  # lr-vs-batch fit key, label, largest B as a fraction of its B_simple (None: its whole grid)
    ("power_law_well_below_noise_scale", "B ≤ B_simple/4", 0.25),
    ("power_law_below_noise_scale", "B ≤ B_simple", 1.0),
    ("power_law", "lr-vs-batch's whole grid", None),
)


def _groups(values: list) -> list[np.ndarray]:
    """(seeds, sizes, batches) nested lists (batches may differ between sizes) -> per size, the pooled finite values."""
    groups = []
    for i in range(len(values[0])):
        a = np.array([v for seed in values for v in seed[i]], dtype=float)  # None (non-finite in JSON) -> nan
        groups.append(a[np.isfinite(a)])
    return groups


def _describe(group: np.ndarray, rng: np.random.Generator, resamples: int) -> dict[str, Any]:
    if group.size == 0:
        return {"mean": None, "ci": None, "spread": None, "n": 0}
    means = [rng.choice(group, group.size).mean() for _ in range(resamples)] if group.size > 1 else [group[0]]
    return {
        "mean": float(group.mean()),
        "ci": [float(v) for v in np.percentile(means, [2.5, 97.5])],  # of the mean, bootstrap over batches/seeds
        "spread": [float(v) for v in np.percentile(group, [2.5, 97.5])],  # of a single batch
        "n": int(group.size),
    }


def _side(ci: list | None, full: float | None, sign: int) -> int:
    """+1 where the interval ``ci`` lies beyond ``full`` (larger in magnitude: above for λ_max, ``sign`` = 1, below
    for λ_min, ``sign`` = -1), -1 where it lies on the other side, 0 where it contains ``full``."""
    if ci is None or full is None:
        return 0
    lo, hi = sorted(sign * np.asarray(ci, float))
    return 1 if lo > sign * full else -1 if hi < sign * full else 0


def _fit(sizes, groups, keep, fn, full, rng, resamples) -> dict[str, Any]:
    """Power-law fit of ``fn(mean of group, full mean)`` against B over ``keep`` (points with a non-positive or
    non-finite value are left out), with the t-interval and a bootstrap interval over the batches of every B."""

    def points(means, full_mean):
        y = np.array([fn(m, full_mean) for m in means], float)
        ok = keep & np.isfinite(y) & (y > 0)
        return sizes[ok], y[ok]

    b, y = points([g.mean() if g.size else np.nan for g in groups], full.mean() if full.size else np.nan)
    fit = fit_power_law(b, y)
    fit["batch_sizes"] = b.tolist()
    draws = []
    if fit["n"] >= 2:
        for _ in range(resamples):
            means = [rng.choice(g, g.size).mean() if g.size else np.nan for g in groups]
            full_mean = rng.choice(full, full.size).mean() if full.size else np.nan
            bb, yy = points(means, full_mean)
            if len(bb) >= 2 and len(bb) == len(b):
                draws.append(fit_power_law(bb, yy)["exponent"])
    fit["exponent_bootstrap_ci"] = [float(v) for v in np.percentile(draws, [2.5, 97.5])] if len(draws) >= 10 else None
    return fit


def _interval(fit: dict) -> list | None:
    """The wider of the t-interval and the bootstrap interval (both when available)."""
    cis = [c for c in (fit.get("exponent_ci"), fit.get("exponent_bootstrap_ci")) if c is not None]
    if not cis:
        return None
    return [min(c[0] for c in cis), max(c[1] for c in cis)]


def _analyse_series(series: dict, sizes: np.ndarray, n: int, small: float, seed: int, resamples: int) -> dict:
    rng = np.random.default_rng(seed)
    hi, lo = _groups(series["lambda_max"]), _groups(series["lambda_min"])
    full_hi, full_lo = hi[-1], lo[-1]
    below = sizes < n
    out: dict[str, Any] = {
        "batch_sizes": sizes.tolist(),
        "lambda_max": [_describe(g, rng, resamples) for g in hi],
        "lambda_min": [_describe(g, rng, resamples) for g in lo],
        "predicted_lr": [],
    }
    for d in out["lambda_max"]:
        out["predicted_lr"].append(
            {"mean": 2 / d["mean"], "ci": [2 / d["ci"][1], 2 / d["ci"][0]]}
            if d["mean"] is not None and d["ci"][0] > 0
            else {"mean": None, "ci": None}
        )
    out["full"] = {"lambda_max": out["lambda_max"][-1]["mean"], "lambda_min": out["lambda_min"][-1]["mean"]}
    out["excess_max_fit"] = _fit(sizes, hi, below, lambda m, f: m - f, full_hi, rng, resamples)
    out["excess_min_fit"] = _fit(sizes, lo, below, lambda m, f: abs(m) - abs(f), full_lo, rng, resamples)
    fit = out["excess_max_fit"]
    if fit["exponent"] is not None and fit["exponent"] < 0 and out["full"]["lambda_max"] > 0:
        # c B^-β = λ_max(H): where the excess falls to the full-data outlier (the saturation threshold)
        out["crossover"] = float((np.exp(fit["intercept"]) / out["full"]["lambda_max"]) ** (-1 / fit["exponent"]))
    else:
        out["crossover"] = None
    every = np.ones(len(sizes), bool)
    out["lr_fits"] = {
        "small_b": _fit(sizes, hi, sizes <= small, lambda m, f: 2 / m, full_hi, rng, resamples),
        "all": _fit(sizes, hi, every, lambda m, f: 2 / m, full_hi, rng, resamples),
    }
    out["small_b_limit"] = small
    # per B < n: +1 where the 95% interval of the mean lies beyond the full-data value (larger in magnitude), -1
    # where it lies inside (smaller in magnitude), 0 where the difference is not resolved
    out["larger_than_full"] = {
        key: [_side(d["ci"], out["full"][key], sign) for d in out[key][:-1]]
        for key, sign in (("lambda_max", 1), ("lambda_min", -1))
    }
    return out


def _compare(series: dict, sizes: np.ndarray, groups: list, reference: dict, seed: int, resamples: int) -> list:
    """Predicted exponent on the batch sizes of each lr-vs-batch fit, against that fit's exponent."""
    rng = np.random.default_rng(seed)
    rows = []
    ref_b = np.array(reference["batch_sizes"])
    edge = np.array(reference["optimal"]["at_edge"], bool)
    for key, label, fraction in LR_FITS:
        measured = reference["fits"][key]
        limit = ref_b.max() if fraction is None else fraction * reference["b_simple"]
        used = set(ref_b[~edge & (ref_b <= limit)].tolist())
        keep = np.array([b in used for b in sizes.tolist()])
        predicted = _fit(sizes, groups, keep, lambda m, f: 2 / m, groups[-1], rng, resamples)
        p_ci = predicted["exponent_bootstrap_ci"] or predicted["exponent_ci"]  # the batch-to-batch noise
        m_ci = _interval(
            {
                "exponent_ci": measured["exponent_ci"],
                "exponent_bootstrap_ci": reference["bootstrap"].get(f"{key}_exponent_ci"),
            }
        )
        agree = None if p_ci is None or m_ci is None else bool(p_ci[0] <= m_ci[1] and m_ci[0] <= p_ci[1])
        rows.append({
            "range": label, "batch_sizes": predicted["batch_sizes"], "predicted": predicted, "measured_exponent":
            measured["exponent"], "measured_ci": measured["exponent_ci"], "measured_bootstrap_ci":
            reference["bootstrap"].get(f"{key}_exponent_ci"), "measured_n": measured["n"], "agree": agree,
        })  # fmt: skip
    return rows


def _contains(ci: list | None, value: float) -> bool | None:
    return None if ci is None else bool(ci[0] <= value <= ci[1])


def _sizes(s: dict, flags: np.ndarray, value: int) -> str:
    b = np.array(s["batch_sizes"])[: len(flags)][flags == value]
    return "no B" if b.size == 0 else "B = " + ", ".join(map(str, b.tolist()))


def _claims(d: dict, ref: dict) -> list[dict[str, str]]:
    series = d["series"]
    claims = []

    def verdict(flag: bool | None, yes="holds", no="does not hold") -> str:
        return "not testable" if flag is None else (yes if flag else no)

    for matrix in ("hessian", "ggn"):
        for point in ("init", "sgd"):
            s = series.get(f"{matrix}/{point}")
            if s is None:
                continue
            flags = np.array(s["larger_than_full"]["lambda_max"])
            fit = s["excess_max_fit"]
            ci = fit["exponent_bootstrap_ci"] or fit["exponent_ci"]
            shrink = None if ci is None else ci[1] < 0
            parts = [
                f"λ_max(H)={s['full']['lambda_max']:.4g}; λ_max(H_B) larger (95% interval) for {_sizes(s, flags, 1)}, "
                f"smaller for {_sizes(s, flags, -1)}, not resolved for {_sizes(s, flags, 0)}"
            ]
            if fit["exponent"] is not None:
                ci = _interval(fit)
                parts.append(
                    f"excess ∝ B^{fit['exponent']:.2f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")
                )
            claims.append({
                "claim": f"{matrix.upper() if matrix == 'ggn' else 'Hessian'} at {point}: λ_max(H_B) > λ_max(H), "
                         "excess shrinking with B",
                "verdict": verdict(None if shrink is None else bool((flags >= 0).all() and flags[0] == 1 and shrink),
                                   no="partly" if (flags == 1).any() or shrink else "does not hold"),
                "evidence": "; ".join(parts),
            })  # fmt: skip
            if matrix == "hessian":
                fl = np.array(s["larger_than_full"]["lambda_min"])
                fit_min = s["excess_min_fit"]
                claims.append({
                    "claim": f"Hessian at {point}: |λ_min(H_B)| > |λ_min(H)|",
                    "verdict": verdict(bool((fl >= 0).all() and fl[0] == 1),
                                       no="partly" if (fl == 1).any() else "does not hold"),
                    "evidence": f"λ_min(H)={s['full']['lambda_min']:.4g}; |λ_min(H_B)| larger for {_sizes(s, fl, 1)}, "
                    f"smaller for {_sizes(s, fl, -1)}, not resolved for {_sizes(s, fl, 0)}"
                    + ("" if fit_min["exponent"] is None else f"; |excess| ∝ B^{fit_min['exponent']:.2f}"),
                })  # fmt: skip
    for name, law, alpha in (("sgd", "linear law (SGD, α = 1)", 1.0), ("adam", "square-root law (Adam, α = ½)", 0.5)):
        key = SGD_SERIES if name == "sgd" else ADAM_SERIES[0]
        s = series.get(key)
        if s is None:
            continue
        small = s["lr_fits"]["small_b"]
        ci = _interval(small)
        comp = d["comparison"].get(name, [])
        agree = [f"{c['range']}: {'agree' if c['agree'] else 'disagree' if c['agree'] is False else 'n/a'}"
                 for c in comp]  # fmt: skip
        claims.append({
            "claim": f"{law}: curvature-predicted exponent (B ≤ {s['small_b_limit']:.3g})",
            "verdict": verdict(_contains(ci, alpha)),
            "evidence": (f"predicted α = {small['exponent']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] ({key})" if ci else "n/a")
            + "; vs lr-vs-batch " + ", ".join(agree),
        })  # fmt: skip
    s = series.get(SGD_SERIES)
    if s is not None:
        knee = ref.get("sgd", {}).get("fits", {}).get("mccandlish", {}).get("noise_scale")
        sizes = np.array(d["batch_sizes"])
        lr = np.array([p["mean"] if p["mean"] is not None else np.nan for p in s["predicted_lr"]])
        half = sizes[np.argmax(lr >= 0.5 * lr[-1])] if np.isfinite(lr).all() else None
        claims.append({
            "claim": "saturation threshold: the predicted SGD rate stops growing once the full-data outlier dominates",
            "verdict": verdict(s["crossover"] is not None and s["crossover"] < sizes[-1]),
            "evidence": (f"excess = λ_max(H) at B ≈ {s['crossover']:.3g}" if s["crossover"] else "no crossover fitted")
            + (f"; predicted rate reaches half its full-batch value at B = {half}" if half is not None else "")
            + (f"; lr-vs-batch's McCandlish knee B_noise = {knee:.3g}" if knee else ""),
        })  # fmt: skip
    return claims


def analyse(result: dict[str, Any]) -> dict[str, Any]:
    """The analysis of a ``batch-hessian`` result (everything derived, nothing measured)."""
    out: dict[str, Any] = {}
    for data, part in result["parts"]["spectra"].items():
        protocol = result["protocols"][data]
        sizes, n = np.array(part["batch_sizes"]), part["n"]
        ref = result["lr_vs_batch"].get(data, {})
        b_simple = ref.get("sgd", {}).get("b_simple")
        small = 0.25 * b_simple if b_simple else SMALL_B_DEFAULT
        if np.sum(sizes <= small) < 3:  # too few points for a fit with an interval: fall back to B <= 16
            small = max(small, SMALL_B_DEFAULT)
        resamples = protocol["bootstrap"]
        d: dict[str, Any] = {"batch_sizes": sizes.tolist(), "n": n, "series": {}, "comparison": {}}
        for i, s in enumerate(part["series"]):
            d["series"][s["name"]] = _analyse_series(s, sizes, n, small, i, resamples)
        raw = {s["name"]: s for s in part["series"]}
        for opt, keys in (("sgd", (SGD_SERIES,)), ("adam", ADAM_SERIES)):
            if opt not in ref:
                continue
            for key in keys:
                if key in raw:
                    rows = _compare(raw[key], sizes, _groups(raw[key]["lambda_max"]), ref[opt], 7, resamples)
                    d["comparison"].setdefault(opt, rows)
                    d["comparison"][f"{opt}:{key}"] = rows
        d["claims"] = _claims(d, ref)
        out[data] = d
    return out


def plot(result: dict[str, Any], out: Path) -> list[str]:
    """``eigenvalues_<data>.png`` (λ_max and |λ_min| against B) and ``learning_rates_<data>.png`` (2/λ_max against B
    with lr-vs-batch's measured optima)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    for data, d in result["analysis"].items():
        sizes = np.array(d["batch_sizes"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, (name, s) in enumerate(d["series"].items()):
            if "/adam" in name and name != "hessian/adam":
                continue  # preconditioned spectra are on another scale: shown in the learning-rate plot
            for ax, key, sign in ((axes[0], "lambda_max", 1), (axes[1], "lambda_min", -1)):
                mean = np.array([np.nan if v["mean"] is None else sign * v["mean"] for v in s[key]])
                ci = np.array(
                    [[np.nan, np.nan] if v["ci"] is None else sorted(sign * np.array(v["ci"])) for v in s[key]]
                )
                ok = mean > 0
                ax.errorbar(sizes[ok], mean[ok], yerr=np.abs([mean[ok] - ci[ok, 0], ci[ok, 1] - mean[ok]]),
                            fmt="o-", ms=3, lw=1, capsize=2, color=f"C{i}", label=name)  # fmt: skip
                if ok[-1]:
                    ax.axhline(mean[-1], color=f"C{i}", lw=0.6, ls=":")
        axes[0].set(xscale="log", yscale="log", xlabel="batch size B", ylabel="λ_max(H_B)", title=f"{data}: λ_max")
        axes[1].set(xscale="log", yscale="log", xlabel="batch size B", ylabel="−λ_min(H_B)", title=f"{data}: |λ_min|")
        axes[0].legend(fontsize=7)
        save_figure(fig, out, f"eigenvalues_{data}.png", files)

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        ref = result["lr_vs_batch"].get(data, {})
        for ax, opt, keys in (
            (axes[0], "sgd", (SGD_SERIES, "ggn/sgd", "hessian/init")),
            (axes[1], "adam", ADAM_SERIES),
        ):
            for i, key in enumerate(keys):
                s = d["series"].get(key)
                if s is None:
                    continue
                lr = np.array([np.nan if p["mean"] is None else p["mean"] for p in s["predicted_lr"]])
                ci = np.array([[np.nan, np.nan] if p["ci"] is None else p["ci"] for p in s["predicted_lr"]])
                ok = np.isfinite(lr)
                ax.errorbar(sizes[ok], lr[ok], yerr=np.abs([lr[ok] - ci[ok, 0], ci[ok, 1] - lr[ok]]), fmt="o-", ms=3,
                            lw=1, capsize=2, color=f"C{i}", label=f"2/λ_max, {key}")  # fmt: skip
            if opt in ref:
                b, lr_star = np.array(ref[opt]["batch_sizes"]), np.array(ref[opt]["optimal"]["learning_rate"])
                ax.plot(b, lr_star, "ks--", ms=4, lw=1, label="lr-vs-batch optimal lr")
            ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="learning rate", title=f"{data}: {opt}")
            ax.legend(fontsize=7)
        save_figure(fig, out, f"learning_rates_{data}.png", files)
    return files


def _ci(ci: list | None, spec: str = ".2f") -> str:
    return "n/a" if ci is None else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _num(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def _cell(d: dict) -> str:
    return f"{_num(d['mean'])} {_ci(d['ci'], '.3g')}"


def _exponent(fit: dict) -> str:
    if fit["exponent"] is None:
        return "n/a"
    return f"{fit['exponent']:.2f} {_ci(fit['exponent_ci'])}; {_ci(fit['exponent_bootstrap_ci'])} (n={fit['n']})"


def summary(result: dict[str, Any]) -> str:
    """The tables of ``summary.md``."""
    m = result["machine"]
    rows = [
        "# batch-hessian",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}, jax {m['jax']}; "
        f"wall time {result.get('elapsed_s', 0):.0f} s",
    ]
    for data, d in result["analysis"].items():
        p, part = result["protocols"][data], result["parts"]["spectra"][data]
        rows += ["", f"## {data}", "", f"n = {d['n']} examples, d = {part['dim']} parameters, m = {p['num_steps']} "
                 f"Lanczos steps, {p['num_probes']} probe(s), {p['seeds']} seed(s), batches per B: "
                 f"{', '.join(f'{k} (B ≤ {b})' for b, k in p['buckets'])}.", ""]  # fmt: skip
        rows += ["Training loss at the points: " + ", ".join(
            f"{k} {np.mean(v['loss']):.4g}" for k, v in part["points"].items()) + ".", ""]  # fmt: skip
        rows += ["Mean extremal eigenvalues per B (95% bootstrap interval of the mean over batches and seeds):", ""]
        names = list(d["series"])
        rows += ["| B | " + " | ".join(f"λ_max {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
        for i, b in enumerate(d["batch_sizes"]):
            cells = [_cell(d["series"][n]["lambda_max"][i]) for n in names]
            rows.append(f"| {b} | " + " | ".join(cells) + " |")
        hess = [n for n in names if n.startswith("hessian")]
        rows += ["", "| B | " + " | ".join(f"λ_min {n}" for n in hess) + " |", "|---|" + "---|" * len(hess)]
        for i, b in enumerate(d["batch_sizes"]):
            cells = [_cell(d["series"][n]["lambda_min"][i]) for n in hess]
            rows.append(f"| {b} | " + " | ".join(cells) + " |")
        rows += ["", "Fits (exponents of power laws in B; 95% t-interval; bootstrap interval):", "",
                 "| series | excess λ_max − λ_max(H) | excess |λ_min| − |λ_min(H)| | crossover B | 2/λ_max, small B "
                 "| 2/λ_max, all B |", "|---|---|---|---|---|---|"]  # fmt: skip
        for n, s in d["series"].items():
            cells = []
            for f in (s["excess_max_fit"], s["excess_min_fit"]):
                cells.append(_exponent(f))
            cells.append(_num(s["crossover"], ".3g"))
            for f in (s["lr_fits"]["small_b"], s["lr_fits"]["all"]):
                cells.append(_exponent(f))
            rows.append(f"| {n} | " + " | ".join(cells) + " |")
        small = next(iter(d["series"].values()))["small_b_limit"]
        rows += ["", f"Small B: B ≤ {small:.3g} (a quarter of lr-vs-batch's measured B_simple for SGD, else 16).", ""]
        ref = result["lr_vs_batch"].get(data, {})
        rows += ["Predicted exponent against lr-vs-batch's measured one, on the same batch sizes:", "",
                 "| optimizer | series | range | predicted α (t; bootstrap) | measured α (t; bootstrap) | agree |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        for key, comp in d["comparison"].items():
            if ":" not in key:
                continue
            opt, series = key.split(":")
            for c in comp:
                pr = c["predicted"]
                pred = _exponent(pr)
                meas = "n/a" if c["measured_exponent"] is None else (
                    f"{c['measured_exponent']:.2f} {_ci(c['measured_ci'])}; {_ci(c['measured_bootstrap_ci'])} "
                    f"(n={c['measured_n']})")  # fmt: skip
                agree = {True: "yes", False: "no", None: "n/a"}[c["agree"]]
                rows.append(f"| {opt} | {series} | {c['range']} | {pred} | {meas} | {agree} |")
        for opt, r in ref.items():
            rows.append(f"\nlr-vs-batch {opt}: {r['source']}; B_simple = {r['b_simple']:.3g}.")
        rows += ["", "Claims:", ""] + [f"- **{c['verdict']}**: {c['claim']} ({c['evidence']})" for c in d["claims"]]
    return "\n".join(rows) + "\n"
