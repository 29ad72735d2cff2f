"""Every flag of ``adabatch train`` and ``adabatch demo`` is honoured or rejected before any work starts: a bad value
exits with code 2 and one line naming the flag, no traceback, nothing written."""

from __future__ import annotations

import json

import pytest

from adabatch.cli import main


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse reports a bad value by exiting
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


BAD = [
    (["train", "--steps", "0"], "--steps"),
    (["train", "--steps", "x"], "--steps"),
    (["train", "--eval-every", "0"], "--eval-every"),
    (["train", "--eval-every", "-1"], "--eval-every"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--batch-size", "1"], "--batch-size"),
    (["train", "--batch-size", "64", "--max-batch-size", "32"], "--max-batch-size"),
    (["train", "--max-batch-size", "0"], "--max-batch-size"),
    (["train", "--micro-batch-size", "0"], "--micro-batch-size"),
    (["train", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["train", "--lr", "-0.1"], "--lr"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--eta", "0"], "--eta"),
    (["train", "--seed", "-3"], "--seed"),
    (["train", "--resume"], "--checkpoint-dir"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["demo", "--eval-every", "0"], "--eval-every"),
    (["demo", "--steps", "1"], "--steps"),
    (["demo", "--max-batch-size", "4"], "--max-batch-size"),
    (["demo", "--rule", "none"], "--rule"),
    (["demo", "--adaptive-lr", "0"], "--adaptive-lr"),
    (["demo", "--target-tolerance", "-1"], "--target-tolerance"),
    (["demo", "--large-batch-size", "0"], "--large-batch-size"),
    (["demo", "--lr", "0"], "--lr"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_are_rejected_in_one_line_naming_the_flag(argv, flag, capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run([*argv, "--out", str(out), "--quiet"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err, err
    assert not out.exists()  # rejected before any work


@pytest.mark.parametrize("command", ["train", "demo"])
def test_out_naming_an_existing_file_is_rejected(command, capsys, tmp_path):
    existing = tmp_path / "file.txt"
    existing.write_text("keep me")
    code, err = run([command, "--out", str(existing)], capsys)
    assert code == 2 and "--out" in err and existing.read_text() == "keep me"


# Resuming with --steps not past the checkpoint is refused, and a resumed run's summary covers the whole run: checked
# in test_demo_cli.py's resume test, on the same two trainings as the bit-identical resume.


def test_batch_size_flag_is_honoured_by_the_rule(tmp_path):
    out = tmp_path / "out"
    argv = ["train", "--quiet", "--model", "mlp", "--steps", "1", "--batch-size", "4", "--max-batch-size", "8"]
    assert main([*argv, "--out", str(out)]) == 0
    (summary,) = json.loads((out / "summary.json").read_text()).values()
    assert summary["batch_sizes"] == [4] and summary["config"]["batch_size"] == 4


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: 200)" in capsys.readouterr().out


def test_every_optimizer_and_rule_of_the_command_line_builds_and_steps():
    # build_tx is what --optimizer/--rule select; each combination must take one step from the training step's input
    # (the mean gradient plus the statistics it declares, and the second gradient when it declares that need, as for
    # extrap_sgd), finite and of the parameters' shape.
    import jax
    import jax.numpy as jnp

    from adabatch import optimizers as o
    from adabatch import stats as st
    from adabatch.cli._train import OPTIMIZERS, RULES, build_tx
    from adabatch.curvature import Spectrum, declared_curvature

    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    per_example = {"w": jnp.arange(48.0).reshape(8, 3, 2) / 48 - 0.3, "b": jnp.linspace(-1, 1, 16).reshape(8, 2)}
    for optimizer in OPTIMIZERS:
        for rule in RULES:
            tx = build_tx(rule, optimizer, lr=0.1, eta=0.5, max_batch_size=64, init_batch_size=4, num_examples=100)
            state = tx.init(params)
            needs = st.declared_needs(state)
            stats = st.from_per_example(
                per_example,
                sq_sum=needs.sq_sum,
                inner_sq_sum=needs.inner_sq_sum,
                leaf_sq_norm_sum=needs.leaf_sq_norm_sum,
            )
            extra = {}
            if o.needs_extrapolated_grads(state):  # the training step's gradient at the extrapolated point
                extra["extrapolated_grads"] = jax.tree_util.tree_map(lambda g: 0.5 * g, stats.mean)
            if declared_curvature(state) is not None:  # the training step's spectrum (λ ∈ [0.5, 2])
                extra["curvature"] = Spectrum(jnp.array([[0.5, 2.0]]), jnp.array([[0.5, 0.5]]), jnp.asarray(8))
            updates, _ = tx.update(stats.mean, state, params, grad_stats=stats, **extra)
            for u, p in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params), strict=True):
                assert u.shape == p.shape and bool(jnp.all(jnp.isfinite(u))), (optimizer, rule)
    assert "extrap_sgd" in OPTIMIZERS and "slq_learner" in OPTIMIZERS and "optimal_batch" in RULES
    with pytest.raises(ValueError, match="num_examples"):
        build_tx("optimal_batch", "sgd", lr=0.1, eta=0.5, max_batch_size=64)
