"""What the experiments built on :mod:`adabatch.experiments._variable_batch` share: learning-rate tuning on seeds
that are not evaluation seeds, the progress bar, and writing / re-analysing an output folder."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adabatch.experiments._io import json_safe
from adabatch.experiments._variable_batch import Problem, stream

__all__ = [
    "TUNING_SEED_OFFSET",
    "SeedData",
    "final_val_loss",
    "finish",
    "journal_path",
    "progress",
    "reanalyse",
    "run_arms",
    "tune_and_run",
    "write",
]

TUNING_SEED_OFFSET = 10_000  # tuning seeds are 10_000, 10_001, ...: never an evaluation seed


class SeedData:
    """Per seed, the initial parameters and the example stream (enough for ``samples`` examples plus one more
    batch), computed once and shared by every arm of that seed: comparisons are paired by seed."""

    def __init__(self, problem: Problem, samples: int):
        self.problem, self.samples = problem, samples
        self._cache: dict[int, tuple[Any, jax.Array]] = {}

    def __call__(self, seed: int) -> tuple[Any, jax.Array]:
        if seed not in self._cache:
            n = int(self.problem.x.shape[0])
            params = self.problem.init_fn(jax.random.key(seed))
            self._cache[seed] = (params, jnp.asarray(stream(n, self.samples + n + 1, seed)))
        return self._cache[seed]


def finish(result: dict[str, Any], report: ModuleType, start: float, out: str | Path | None) -> dict[str, Any]:
    """Add ``report.analyse``'s analysis and the elapsed time to ``result``; write it to ``out`` when given."""
    result["analysis"] = report.analyse(result)
    result["elapsed_s"] = time.time() - start
    if out is not None:
        write(result, out, report)
        journal = journal_path(out)
        if journal is not None and journal.exists():
            journal.unlink()
    return result


def final_val_loss(record: dict) -> float:
    """The last validation loss of a run (+inf when it diverged)."""
    loss = record["evals"]["val_loss"][-1]
    return float(loss) if np.isfinite(loss) else float("inf")


def tune_and_run(
    run_one: Callable[[float, int, bool], dict],
    arm: Any,
    learning_rates: Sequence[float],
    tuning_seeds: int,
    seeds: int,
    tick: Callable[[], None],
) -> dict[str, Any]:
    """Pick the learning rate with the lowest mean final validation loss over ``tuning_seeds`` tuning seeds, then run
    the evaluation seeds ``0 … seeds-1`` at it. ``run_one(lr, seed, tuning)`` returns a run record.

    Example:
      >>> from adabatch.experiments._protocol import tune_and_run
      >>> def run_one(lr, seed, tuning):  # a toy whose validation loss is smallest at lr = 0.1
      ...     return {"evals": {"val_loss": [(lr - 0.1) ** 2], "val_metric": [1.0]}, "seed": seed}
      >>> entry = tune_and_run(run_one, None, [0.01, 0.1, 1.0], 2, 3, lambda: None)
      >>> entry["learning_rate"], entry["lr_at_edge"], [r["seed"] for r in entry["runs"]]
      (0.1, False, [0, 1, 2])
    """
    losses, metrics = [], []
    for lr in learning_rates:
        row, metric = [], []
        for seed in range(TUNING_SEED_OFFSET, TUNING_SEED_OFFSET + tuning_seeds):
            record = run_one(lr, seed, True)
            row.append(final_val_loss(record))
            value = record["evals"]["val_metric"][-1]
            metric.append(float(value) if np.isfinite(value) else float("nan"))
            tick()
        losses.append(row)
        metrics.append(float(np.mean(metric)))
    mean = np.mean(np.asarray(losses), axis=1)
    best = int(np.argmin(mean))
    runs = []
    for seed in range(seeds):
        runs.append(run_one(learning_rates[best], seed, False))
        tick()
    if dataclasses.is_dataclass(arm) and not isinstance(arm, type):
        arm = dataclasses.asdict(arm) | ({"name": arm.name} if hasattr(arm, "name") else {})
    return {
        "arm": arm,
        "learning_rate": learning_rates[best],
        "lr_at_edge": best in (0, len(learning_rates) - 1),
        "learning_rates": list(learning_rates),
        "tuning_val_loss": mean.tolist(),
        "tuning_val_metric": metrics,
        "runs": runs,
    }


def run_arms(
    arms: Sequence[Any],
    bind: Callable[[Any], Callable[[float, int, bool], dict]],
    protocol: Any,
    enabled: bool,
    desc: str,
    journal: str | Path | None = None,
) -> list[dict[str, Any]]:
    """:func:`tune_and_run` every arm (``bind(arm)`` gives its ``run_one``) on the learning rates
    ``protocol.lrs(arm.optimizer)``, with ``protocol.tuning_seeds`` and ``protocol.seeds``, under one progress bar.

    With a ``journal`` path, each finished arm is appended to it (one JSON line, tagged with the protocol), and arms
    already there for the same protocol are read back instead of being run again: an interrupted experiment resumes
    where it stopped (runs are deterministic per seed, so the result is the same). :func:`finish` removes it."""
    per_arm = {id(arm): len(protocol.lrs(arm.optimizer)) * protocol.tuning_seeds + protocol.seeds for arm in arms}
    tick, close = progress(sum(per_arm.values()), enabled, desc)
    tag = json.dumps(json_safe(dataclasses.asdict(protocol)), sort_keys=True)
    done = _journal_entries(journal, tag)
    results = []
    try:
        for arm in arms:
            key = repr(arm)
            if key in done:
                results.append(done[key])
                for _ in range(per_arm[id(arm)]):
                    tick()
                continue
            lrs = protocol.lrs(arm.optimizer)
            entry = tune_and_run(bind(arm), arm, lrs, protocol.tuning_seeds, protocol.seeds, tick)
            results.append(entry)
            if journal is not None:
                Path(journal).parent.mkdir(parents=True, exist_ok=True)
                with open(journal, "a", encoding="utf-8") as f:
                    line = {"protocol": tag, "arm": key, "entry": json_safe(entry)}
                    f.write(json.dumps(line, allow_nan=False) + "\n")
        return results
    finally:
        close()


def _journal_entries(journal: str | Path | None, tag: str) -> dict[str, dict]:
    """The arms recorded in ``journal`` for the protocol ``tag`` (a torn last line, from a kill mid-write, is
    skipped)."""
    if journal is None or not Path(journal).is_file():
        return {}
    done = {}
    for line in Path(journal).read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if item.get("protocol") == tag:
            done[item["arm"]] = item["entry"]
    return done


def journal_path(out: str | Path | None) -> Path | None:
    """Where :func:`run_arms` keeps its journal for an output folder ``out`` (None without one)."""
    return None if out is None else Path(out) / "arms.partial.jsonl"


def progress(total: int, enabled: bool, desc: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(tick, close)`` of a tqdm bar over ``total`` runs (no-ops when not ``enabled``)."""
    if not enabled:
        return (lambda: None), (lambda: None)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="run")
    return (lambda: bar.update(1)), bar.close


def write(result: dict[str, Any], out: str | Path, report: ModuleType) -> None:
    """Write ``results.json`` (first: plotting may fail), ``report.plot``'s PNGs and ``report.summary`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(json_safe(result), allow_nan=False))
    result["plots"] = report.plot(result, out)
    (out / "summary.md").write_text(report.summary(result))
    (out / "results.json").write_text(json.dumps(json_safe(result), allow_nan=False))


def reanalyse(out: str | Path, report: ModuleType) -> dict[str, Any]:
    """Recompute the analysis (``report.analyse``), plots and summary of ``out/results.json`` without training."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the experiment first")
    result = json.loads(path.read_text())
    result["analysis"] = report.analyse(result)
    write(result, out, report)
    return result
