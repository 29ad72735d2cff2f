"""Benchmark the per-example statistics producers against a plain gradient step, and against PyTorch peers.

For seven models — an MLP 784-512-512-10 (scikit-learn digits upsampled to 28×28), ``adabatch.flax.models.CNN``
on the 8×8 digits, a small ``TransformerLM`` on ``pydoc_data.topics`` bytes, and three layer-type probes on 64
tokens of the same bytes (``embed``: an ``Embed(97, 128)`` whose mean over tokens feeds a 10-way head;
``conv1d``: a 1-D ``Conv(128, (3,))`` over 64 positions of 32 channels, mean-pooled into a 10-way head;
``seq5``: Embed(97, 128) → Dense(128) → LayerNorm → Conv1D(128, 3) → Dense(97), a next-token loss; ``nnx``: the
transformer LM written with Flax NNX layers) — and batch sizes ``B``, it times
every method (median of jit-compiled calls after a warm-up, ``block_until_ready``, methods interleaved round by
round) and measures its memory (XLA's compiled ``memory_analysis()``: temporary + output bytes, deterministic), and
reports both as ratios to a plain gradient step (``jax.grad`` of the mean loss) measured in the same run. The
PyTorch peers (``torch.func`` vmap per-sample gradients, BackPACK ``BatchL2Grad`` + ``SumGradSquared``, Opacus
grad samples and Opacus ghost-clipping norms) run in the same process when installed (the ``bench`` extra) and are
timed against a plain PyTorch ``backward()`` of the equivalent model.

The section also lists the form the ghost cost model chose for each layer (``ghost_report``). Run with glibc's
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set (freed memory stays in the process, so XLA's
temporaries are not page-faulted anew on every call), it writes a separate ``, resident heap`` section.

Run ``adabatch bench stats [--quick] [--out docs/benchmarks.md]`` or ``python -m adabatch.benchmarks.stats``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from adabatch.benchmarks._report import replace_section
from adabatch.datasets import load_digits, load_text
from adabatch.flax.models import CNN, MLP, TransformerLM, classification_loss, language_model_loss
from adabatch.stats import ghost_report, grad_stats, inner_products

__all__ = [
    "ALLOCATOR_ENV",
    "JAX_METHODS",
    "TORCH_METHODS",
    "add_arguments",
    "allocator",
    "execute",
    "heading",
    "main",
    "run",
    "write_section",
]

SECTION = "## Per-example statistics"
# glibc's settings that keep freed memory in the process: set both, and XLA's temporaries are not page-faulted anew on
# every call (on the benchmark VM that cost as much as the arithmetic; see docs/benchmarks.md)
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
MODELS = ("mlp", "cnn", "lm", "embed", "conv1d", "seq5", "nnx")
DEFAULT_SIZES = (64, 128, 256, 512, 1024)
QUICK_SIZES = (16,)
# method name -> keyword arguments of grad_stats (None: plain gradient + forward-mode inner products)
JAX_METHODS: dict[str, dict | None] = {
    "ghost": {"method": "ghost"},
    "ghost+S2": {"method": "ghost", "sq_sum": True},
    "ghost+inner": {"method": "ghost", "inner_sq_sum": True},
    "jvp-inner": None,
    "microbatch(8)": {"method": "microbatch", "num_microbatches": 8},
    "vmap": {"method": "vmap"},
}
TORCH_METHODS = ("torch.func", "BackPACK", "Opacus", "Opacus-ghost")


# ----------------------------------------------------------------------------------------------------------------
# Problems

PROBE_VOCAB = 97  # the layer-type probes read bytes modulo this vocabulary


class EmbedProbe(nn.Module):
    """``embed``: an embedding of ``tokens`` averaged over the tokens, then a dense ``num_classes``-way head."""

    features: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nn.Embed(PROBE_VOCAB, self.features)(tokens)
        return nn.Dense(self.num_classes)(jnp.mean(h, axis=1))


class Conv1DProbe(nn.Module):
    """``conv1d``: a 1-D convolution (SAME padding) over ``(b, positions, channels)``, ReLU, mean over positions,
    then a dense ``num_classes``-way head."""

    features: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Conv(self.features, (3,))(x))
        return nn.Dense(self.num_classes)(jnp.mean(h, axis=1))


class Seq5Probe(nn.Module):
    """``seq5``: Embed → Dense → LayerNorm → Conv1D(3) → Dense(vocab) per token (ReLU after the dense layer and the
    convolution), the five layer kinds of a small sequence model."""

    embed: int = 128
    hidden: int = 128

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(self.hidden)(nn.Embed(PROBE_VOCAB, self.embed)(tokens)))
        h = nn.relu(nn.Conv(self.hidden, (3,))(nn.LayerNorm()(h)))
        return nn.Dense(PROBE_VOCAB)(h)


def _probe(name: str, quick: bool) -> tuple[nn.Module, Callable, np.ndarray, np.ndarray]:
    """Model, loss and data of a layer-type probe (64 tokens; 24 and narrower layers with ``quick``)."""
    seq_len = 24 if quick else 64
    data = load_text(seq_len=seq_len)
    tokens = np.asarray(data.x_train) % PROBE_VOCAB
    labels = np.asarray(data.y_train)[:, -1] % 10  # the byte after the window, a 10-way label
    if name == "embed":
        model: nn.Module = EmbedProbe(features=48 if quick else 128)
        return model, classification_loss(model.apply), tokens, labels
    if name == "conv1d":
        channels = 16 if quick else 32
        signals = np.cos(tokens[:, :, None] * (np.arange(channels) + 1) / PROBE_VOCAB).astype(np.float32)
        model = Conv1DProbe(features=32 if quick else 128)
        return model, classification_loss(model.apply), signals, labels
    model = Seq5Probe(embed=48, hidden=32) if quick else Seq5Probe()
    return model, language_model_loss(model.apply), tokens, np.asarray(data.y_train) % PROBE_VOCAB


def make_problem(name: str, batch_size: int, quick: bool) -> dict[str, Any]:
    """The model, per-example loss, parameters and one batch of real data for ``name`` in :data:`MODELS`."""
    if name == "nnx":  # the same transformer written with Flax NNX layers (captured by the NNX ghost backend)
        from adabatch.benchmarks._nnx_problem import make_nnx_problem

        return make_nnx_problem(batch_size, quick)
    rng = np.random.default_rng(0)
    model: nn.Module
    size: dict[str, Any]
    if name == "mlp":
        data = load_digits()
        x = np.asarray(jax.image.resize(data.x_train, (len(data.x_train), 28, 28, 1), "bilinear"))
        y = data.y_train
        model = MLP(features=(32, 32) if quick else (512, 512))
        loss = classification_loss(model.apply)
    elif name == "cnn":
        data = load_digits()
        x, y = data.x_train, data.y_train
        model = CNN()
        loss = classification_loss(model.apply)
    elif name in ("embed", "conv1d", "seq5"):
        model, loss, x, y = _probe(name, quick)
    else:
        seq_len = 16 if quick else 32
        data = load_text(seq_len=seq_len)
        x, y = data.x_train, data.y_train
        size = {"d_model": 16, "num_heads": 2, "num_layers": 1} if quick else {"d_model": 64, "num_heads": 4}
        model = TransformerLM(max_len=seq_len, **size)
        loss = language_model_loss(model.apply)
    index = rng.choice(len(x), size=batch_size, replace=batch_size > len(x))
    batch = (jnp.asarray(x[index]), jnp.asarray(y[index]))
    params = model.init(jax.random.key(0), batch[0][:1])["params"]
    return {"name": name, "loss": loss, "params": params, "batch": batch, "quick": quick}


def jax_functions(problem: dict) -> dict[str, Callable]:
    """``name -> f(params, batch)`` for the plain step and every method of :data:`JAX_METHODS`."""
    loss = problem["loss"]

    def plain(p, batch):
        return jax.grad(lambda q: jnp.mean(loss(q, batch)))(p)

    def jvp_inner(p, batch):
        mean = plain(p, batch)
        return mean, jnp.sum(jnp.square(inner_products(loss, p, batch, mean)))

    fns: dict[str, Callable] = {"plain": plain}
    for method, kwargs in JAX_METHODS.items():
        fns[method] = jvp_inner if kwargs is None else (lambda p, b, kw=kwargs: grad_stats(loss, p, b, **kw))
    return fns


# ----------------------------------------------------------------------------------------------------------------
# Measurement


def _interleaved(calls: Mapping[str, Callable[[], Any]], repeats: int, budget_s: float) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds (one call of each per round, after a
    warm-up call each), so that load changes on a shared machine hit every method alike. At least two rounds;
    at most ``repeats``, fewer once ``budget_s`` is spent."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    spent = 0.0
    for round_ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent += elapsed
        if round_ >= 1 and spent > budget_s:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def measure_jax(fns: dict[str, Callable], args: tuple, repeats: int, budget_s: float, skip: set) -> dict[str, dict]:
    """Memory (every method) and time (methods not in ``skip``) of the jit-compiled ``fns`` on ``args``."""
    out: dict[str, dict] = {}
    calls: dict[str, Callable[..., Any]] = {}  # each called with no arguments
    for name, fn in fns.items():
        compiled = jax.jit(fn).lower(*args).compile()
        analysis = compiled.memory_analysis()
        memory = np.nan if analysis is None else float(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
        out[name] = {"time": np.nan, "memory": memory}
        if name not in skip:
            calls[name] = lambda compiled=compiled: jax.block_until_ready(compiled(*args))
    for name, seconds in _interleaved(calls, repeats, budget_s).items():
        out[name]["time"] = seconds
    return out


def torch_available() -> dict[str, str | None]:
    """Which PyTorch peers can run: name -> None when available, else why not."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return dict.fromkeys(("plain", *TORCH_METHODS), "torch not installed")
    out: dict[str, str | None] = {"plain": None, "torch.func": None}
    for name, module in (("BackPACK", "backpack"), ("Opacus", "opacus"), ("Opacus-ghost", "opacus")):
        try:
            __import__(module)
            out[name] = None
        except ImportError:
            out[name] = f"{module} not installed"
    return out


def _torch_model(problem: dict):
    """The PyTorch twin of ``problem``'s model (same layer sizes; its own random initialisation)."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.heads = heads
            self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x):
            b, t, d = x.shape

            def split(z):
                return z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
            return self.out((weights @ v).transpose(1, 2).contiguous().view(b, t, d))

    class Block(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attention = Attention(d, heads)
            self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            x = x + self.attention(self.ln1(x))
            return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))

    class LM(nn.Module):
        def __init__(self, d: int, heads: int, layers: int, seq_len: int):
            super().__init__()
            self.embed, self.positions = nn.Embedding(256, d), nn.Embedding(seq_len, d)
            self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256)

        def forward(self, tokens):
            positions = torch.arange(tokens.shape[1], device=tokens.device).repeat(tokens.shape[0], 1)
            return self.head(self.ln(self.blocks(self.embed(tokens) + self.positions(positions))))

    class Probe(nn.Module):
        def __init__(self, name: str, quick: bool):
            super().__init__()
            self.name = name
            if name == "embed":
                width = 48 if quick else 128
                self.embed, self.head = nn.Embedding(PROBE_VOCAB, width), nn.Linear(width, 10)
            elif name == "conv1d":
                channels, width = (16, 32) if quick else (32, 128)
                self.conv, self.head = nn.Conv1d(channels, width, 3, padding=1), nn.Linear(width, 10)
            else:
                embed, hidden = (48, 32) if quick else (128, 128)
                self.embed, self.dense = nn.Embedding(PROBE_VOCAB, embed), nn.Linear(embed, hidden)
                self.norm, self.conv = nn.LayerNorm(hidden), nn.Conv1d(hidden, hidden, 3, padding=1)
                self.head = nn.Linear(hidden, PROBE_VOCAB)

        def forward(self, x):
            if self.name == "embed":
                return self.head(self.embed(x).mean(1))
            if self.name == "conv1d":
                return self.head(torch.relu(self.conv(x.transpose(1, 2))).mean(2))
            h = self.norm(torch.relu(self.dense(self.embed(x))))
            return self.head(torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2).contiguous())

    name, quick = problem["name"], problem["quick"]
    if name in ("embed", "conv1d", "seq5"):
        return Probe(name, quick)
    if name == "mlp":
        width = 32 if quick else 512
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )
    seq_len = problem["batch"][0].shape[1]
    return LM(16, 2, 1, seq_len) if quick else LM(64, 4, 2, seq_len)


def measure_torch(problem: dict, available: dict, repeats: int, budget_s: float, skip: set, notes: list) -> dict:
    """Seconds per call of a plain PyTorch backward and of each available peer computing q = Σ‖g_i‖² (and S₂ where
    the peer offers it) on the PyTorch twin of ``problem``'s model."""
    import copy

    import torch
    from torch import nn

    torch.manual_seed(0)
    model = _torch_model(problem)
    x, y = (torch.from_numpy(np.array(a)) for a in problem["batch"])
    if problem["name"] == "cnn":
        x = x.permute(0, 3, 1, 2).contiguous()
    y = y.long()
    x = x.long() if problem["name"] in ("lm", "nnx", "embed", "seq5") else x

    def per_example(logits, target):
        if logits.ndim == 3:  # (b, t, vocab): each sequence's mean token loss
            return nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)
        return nn.functional.cross_entropy(logits, target, reduction="none")

    def plain():
        model.zero_grad(set_to_none=True)
        per_example(model(x), y).mean().backward()

    def make_torch_func():
        from torch.func import functional_call, grad, vmap

        def one(p, xi, yi):
            return per_example(functional_call(model, p, (xi[None],)), yi[None])[0]

        def call():
            params = {k: v.detach() for k, v in model.named_parameters()}
            grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
            return sum(g.flatten(1).pow(2).sum() for g in grads.values()), [g.pow(2).sum(0) for g in grads.values()]

        return call

    def make_backpack():
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad, SumGradSquared

        net, loss_fn = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())

        def call():
            net.zero_grad(set_to_none=True)
            logits = net(x)
            loss = loss_fn(logits.transpose(1, 2) if logits.ndim == 3 else logits, y)
            with backpack(BatchL2Grad(), SumGradSquared()):
                loss.backward()
            return sum(p.batch_l2.sum() for p in net.parameters()), [p.sum_grad_squared for p in net.parameters()]

        return call

    def make_opacus():
        from opacus import GradSampleModule

        net = GradSampleModule(copy.deepcopy(model))

        def call():
            net.zero_grad(set_to_none=True)
            per_example(net(x), y).mean().backward()
            samples = [p.grad_sample for p in net.parameters()]
            return sum(g.flatten(1).pow(2).sum() for g in samples), [g.pow(2).sum(0) for g in samples]

        return call

    def make_opacus_ghost():
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        net = GradSampleModuleFastGradientClipping(copy.deepcopy(model), max_grad_norm=1.0, use_ghost_clipping=True)

        def call():
            net.zero_grad(set_to_none=True)
            per_example(net(x), y).mean().backward()
            return net.get_norm_sample().pow(2).sum()

        return call

    makers = {
        "torch.func": make_torch_func,
        "BackPACK": make_backpack,
        "Opacus": make_opacus,
        "Opacus-ghost": make_opacus_ghost,
    }
    calls: dict[str, Callable] = {"plain": plain}
    for name, make in makers.items():
        if available.get(name) is not None or name in skip:
            continue
        try:
            call = make()
            call()  # a peer that does not support a layer of this model fails here
            calls[name] = call
        except Exception as exc:
            note = f"{name} failed on {problem['name']}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            if note not in notes:
                notes.append(note)
    return _interleaved(calls, repeats, budget_s)


def run(
    models: Sequence[str] = MODELS,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    quick: bool = False,
    repeats: int = 5,
    budget_s: float = 3.0,
    slow_s: float = 2.0,
    torch_peers: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], list[str]]:
    """Measure everything; returns ``(results, notes)``. A method one call of which took more than ``slow_s`` at
    some size is not timed at larger sizes (its memory still is)."""
    notes: list[str] = []
    available = torch_available() if torch_peers else {}
    missing = {k: v for k, v in available.items() if v is not None and k != "plain"}
    if available.get("plain") is not None:
        notes.append("PyTorch peers skipped: torch is not installed (pip install 'adabatch[bench]')")
    elif missing:
        notes.append("PyTorch peers skipped: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    results = []
    for model in models:
        too_slow: set[str] = set()
        for b in sizes:
            problem = make_problem(model, b, quick)
            report = ghost_report(problem["loss"], problem["params"], problem["batch"])
            row: dict[str, Any] = {"model": model, "B": b, "torch": {}}
            row["forms"] = {layer.name: layer.form for layer in report.layers}
            row["jax"] = measure_jax(
                jax_functions(problem), (problem["params"], problem["batch"]), repeats, budget_s, too_slow
            )
            for method, m in row["jax"].items():
                too_slow.update([method] if m["time"] > slow_s else [])
                log(f"{model} B={b} {method}: {m['time'] * 1e3:.1f} ms, {m['memory'] / 2**20:.1f} MB")
            if torch_peers and available.get("plain") is None:
                row["torch"] = measure_torch(problem, available, repeats, budget_s, too_slow, notes)
                for method, seconds in row["torch"].items():
                    too_slow.update([method] if seconds > slow_s and method != "plain" else [])
                    log(f"{model} B={b} torch {method}: {seconds * 1e3:.1f} ms")
            results.append(row)
        too_slow.discard("plain")
        if too_slow:
            notes.append(
                f"{model}: not timed at larger B once a call took > {slow_s:g} s: {', '.join(sorted(too_slow))}"
            )
    return results, notes


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def _ratio(value: float, base: float) -> str:
    if not (np.isfinite(value) and np.isfinite(base) and base > 0):
        return "—"
    return f"{value / base:.2f}×"


def table(results: list[dict], model: str, key: str) -> str:
    """Markdown table for one model: rows B, columns methods, cells method / plain (the plain step in ms or MB)."""
    rows = [r for r in results if r["model"] == model]
    methods = [m for m in JAX_METHODS if any(m in r["jax"] for r in rows)]
    peers = [m for m in TORCH_METHODS if any(m in r["torch"] for r in rows)] if key == "time" else []
    head = ["B", "plain (ms)" if key == "time" else "plain (MB)", *methods]
    if peers:
        head += ["torch plain (ms)", *peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    scale = 1e3 if key == "time" else 1 / 2**20
    for r in rows:
        base = r["jax"]["plain"][key]
        cells = [str(r["B"]), f"{base * scale:.1f}"] + [_ratio(r["jax"][m][key], base) for m in methods]
        if peers:
            torch_base = r["torch"].get("plain", np.nan)
            cells.append(f"{torch_base * 1e3:.1f}" if np.isfinite(torch_base) else "—")
            cells += [_ratio(r["torch"].get(m, np.nan), torch_base) for m in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(results: list[dict], notes: list[str], command: str, conclusion: str = "") -> str:
    """The Markdown section: command, machine, method, tables, notes and the conclusion."""
    cpu = platform.processor() or platform.machine()
    versions = f"jax {jax.__version__}" + (
        f", torch {sys.modules['torch'].__version__}" if "torch" in sys.modules else ""
    )
    parts = [
        heading(),
        "",
        f"Command: `{command}`. Machine: {cpu}, {os.cpu_count()} cores, JAX backend "
        f"{jax.default_backend().upper()}; {versions}; glibc malloc: {allocator() or 'default settings'}.",
        "",
        "Time: median of jit-compiled calls after a warm-up (`block_until_ready`; the methods of one model and batch "
        "size are interleaved round by round), as a ratio to a plain gradient step (`jax.grad` of the mean loss) of "
        "the same model and batch in the same run. PyTorch peers: ratio to a plain PyTorch `backward()` of the "
        "equivalent model, in the same run. Memory: XLA's compiled `memory_analysis()` temporary + output bytes "
        "(deterministic), as a ratio to the plain step; not measured for PyTorch. `—`: not run (see the notes). "
        "Methods: `ghost` q = Σ‖gᵢ‖² (norm test); `+S2` also Σgᵢ⊙gᵢ (coordinate test); `+inner` also "
        "Σ⟨gᵢ,ḡ⟩² (inner-product tests); `jvp-inner` plain gradient + ⟨gᵢ,ḡ⟩ by one JVP; `microbatch(8)` the "
        "8-group estimate; `vmap` materialised per-example gradients. Peers compute q and S₂ (Opacus-ghost: q).",
        "",
    ]
    names = {
        "mlp": "MLP 784-512-512-10",
        "cnn": "CNN (digits 8×8)",
        "lm": "TransformerLM (pydoc text)",
        "embed": "Embed(97, 128) on 64 tokens + head",
        "conv1d": "Conv1D(32 → 128, 3) on 64 positions + head",
        "seq5": "Embed → Dense → LayerNorm → Conv1D → Dense (64 tokens, width 128)",
        "nnx": "TransformerLM written with Flax NNX (pydoc text)",
    }
    for model in dict.fromkeys(r["model"] for r in results):
        parts += [f"### {names.get(model, model)}: time", "", table(results, model, "time"), ""]
        forms = next(r.get("forms", {}) for r in results if r["model"] == model)
        if forms:
            chosen = ", ".join(f"`{name}` {form}" for name, form in forms.items())
            parts += [f"Forms chosen by the cost model (`ghost`): {chosen}.", ""]
        parts += [f"### {names.get(model, model)}: memory", "", table(results, model, "memory"), ""]
    if notes:
        parts += ["Notes:", "", *[f"* {n}" for n in notes], ""]
    if conclusion:
        parts += [conclusion.strip(), ""]
    return "\n".join(parts)


def allocator(separator: str = ", ") -> str:
    """How glibc's allocator was told to behave: the ``ALLOCATOR_ENV`` variables that are set, as ``NAME=value``
    joined by ``separator`` (``""`` when none is)."""
    return separator.join(f"{k}={os.environ[k]}" for k in ALLOCATOR_ENV if k in os.environ)


def heading() -> str:
    """``## Per-example statistics``, plus ``, resident heap`` when ``allocator()`` is not empty: the two runs
    stand side by side in docs/benchmarks.md."""
    return SECTION + (", resident heap" if allocator() else "")


def write_section(path: str, text: str) -> None:
    """Replace (or append) this run's section (``heading()``) of ``path``; other sections stay untouched."""
    replace_section(path, heading(), text)


def execute(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; print the section and write it to ``--out``."""
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else QUICK_SIZES if args.quick else DEFAULT_SIZES
    models = tuple(m.strip() for m in args.models.split(","))
    bad = [m for m in models if m not in MODELS]
    if bad or any(b < 2 for b in sizes):
        raise SystemExit(f"--models must be a subset of {','.join(MODELS)} and --sizes at least 2; got {args}")
    results, notes = run(models, sizes, quick=args.quick, repeats=2 if args.quick else 5, torch_peers=not args.no_torch)
    command = "adabatch bench stats" + (" --quick" if args.quick else "")
    if allocator():
        command = f"{allocator(' ')} {command}"
    if args.models != ",".join(MODELS):
        command += f" --models {args.models}"
    if args.sizes:
        command += f" --sizes {args.sizes}"
    if args.no_torch:
        command += " --no-torch"
    conclusion = ""
    if args.conclusion:
        with open(args.conclusion, encoding="utf-8") as f:
            conclusion = f.read()
    text = render(results, notes, command, conclusion)
    if args.out:
        write_section(args.out, text)
    print(text)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``adabatch bench stats`` (also ``python -m adabatch.benchmarks.stats``)."""
    parser.add_argument("--quick", action="store_true", help="tiny models, one batch size (a smoke test)")
    parser.add_argument("--out", default=None, help="write the '## Per-example statistics' section into this file")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--sizes", default=None, help="comma-separated batch sizes (default 64,128,...,1024)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    parser.add_argument("--conclusion", default=None, help="a Markdown file whose text ends the section")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return execute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
