"""Checkpoint and resume: bit-identical parameters after an interruption, clear errors that overwrite nothing."""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import optax
import pytest

from adabatch import rules
from adabatch.optimizers import adagrad_norm
from adabatch.training import Checkpointer, CheckpointError, fit, init_train_state, make_train_step
from tests.test_train import linear_loss, regression_data, zeros_params

STEPS = 12


def make_run():
    tx = optax.chain(rules.norm_test(0.25, max_batch_size=256), adagrad_norm(0.5))
    return make_train_step(linear_loss, tx, micro_batch_size=4), init_train_state(zeros_params(), tx, seed=5)


DATA = regression_data(n=300, noise=3.0)


def tree_bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def directory_digest(path):
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            digest.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    step, state = make_run()
    return fit(
        step,
        state,
        DATA,
        num_steps=STEPS,
        init_batch_size=4,
        seed=1,
        checkpoint_dir=str(tmp_path_factory.mktemp("full")),
        checkpoint_every=3,
    )


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("stop_at", [2, 7])
def test_resumed_run_is_bit_identical(tmp_path, uninterrupted, stop_at):
    sizes = [h["batch_size"] for h in uninterrupted.history]
    assert len(set(sizes)) > 3  # the batch grows during the run, so the decision must survive the resume

    def ctrl_c(state, metrics):
        if metrics["step"] == stop_at:
            raise Interrupt

    step, state = make_run()
    with pytest.raises(Interrupt):  # Ctrl-C in the middle of the run
        fit(
            step,
            state,
            DATA,
            num_steps=STEPS,
            init_batch_size=4,
            seed=1,
            checkpoint_dir=str(tmp_path),
            checkpoint_every=3,
            callback=ctrl_c,
        )
    latest = Checkpointer(tmp_path).latest_step()
    assert latest == (stop_at // 3) * 3 or (latest is None and stop_at < 3)
    step, state = make_run()  # a fresh process: new step function, new initial state
    if latest is None:
        with pytest.raises(CheckpointError, match="no checkpoint"):
            fit(
                step,
                state,
                DATA,
                num_steps=STEPS,
                init_batch_size=4,
                seed=1,
                checkpoint_dir=str(tmp_path),
                checkpoint_every=3,
                resume=True,
            )
        return
    resumed = fit(
        step,
        state,
        DATA,
        num_steps=STEPS,
        init_batch_size=4,
        seed=1,
        checkpoint_dir=str(tmp_path),
        checkpoint_every=3,
        resume=True,
    )
    assert resumed.history[0]["step"] == latest + 1
    assert [h["batch_size"] for h in resumed.history] == sizes[latest:]
    assert tree_bytes(resumed.state) == tree_bytes(uninterrupted.state)  # params, opt_state, counters, key


def test_resume_with_another_seed_or_optimizer_is_refused_naming_what_differs(tmp_path):
    step, state = make_run()
    fit(step, state, DATA, num_steps=3, init_batch_size=4, seed=1, checkpoint_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="seed: 1 in the checkpoint, 2 now"):
        fit(step, state, DATA, num_steps=6, init_batch_size=4, seed=2, checkpoint_dir=str(tmp_path), resume=True)
    # Another optimizer: its state has another tree; the message says so in one line instead of a tree dump.
    tx = optax.chain(rules.norm_test(0.25, max_batch_size=256), optax.adam(0.1))
    other_step, other = make_train_step(linear_loss, tx, micro_batch_size=4), init_train_state(zeros_params(), tx)
    with pytest.raises(CheckpointError) as info:
        fit(other_step, other, DATA, num_steps=6, init_batch_size=4, seed=1, checkpoint_dir=str(tmp_path), resume=True)
    message = str(info.value)
    assert "optimizer state" in message and "ScaleByAdagradNormState" in message and "ScaleByAdamState" in message
    assert "corrupt" not in message and len(message) < 400


def test_missing_checkpoint_is_a_clear_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    step, state = make_run()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        Checkpointer(missing).restore(state)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        fit(step, state, DATA, num_steps=2, init_batch_size=4, checkpoint_dir=str(missing), resume=True)
    assert not missing.exists()


def test_existing_checkpoints_are_not_overwritten_without_resume(tmp_path):
    _, state = make_run()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, state, metadata={"seed": 0})
    before = directory_digest(tmp_path)
    step, state = make_run()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        fit(step, state, DATA, num_steps=2, init_batch_size=4, checkpoint_dir=str(tmp_path))
    assert directory_digest(tmp_path) == before


def test_corrupt_checkpoint_is_a_clear_error_and_overwrites_nothing(tmp_path):
    _, state = make_run()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, metadata={"seed": 0})
    damaged = 0
    for root, _, files in os.walk(tmp_path / "3" / "state"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
                f.seek(0)
                f.write(b"\x00garbage")
            damaged += 1
    assert damaged
    before = directory_digest(tmp_path)
    with pytest.raises(CheckpointError, match="could not be read|does not match"):
        Checkpointer(tmp_path).restore(state)
    assert directory_digest(tmp_path) == before


def test_a_partial_write_is_ignored(tmp_path):
    """An interrupted save leaves an orbax temporary directory; the last complete checkpoint is used."""
    _, state = make_run()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, metadata={"seed": 0})
    partial = tmp_path / "6.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "junk").write_bytes(b"half a checkpoint")
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 3
    restored, meta = ckpt.restore(state)
    ckpt.close()
    assert meta == {"seed": 0} and tree_bytes(restored) == tree_bytes(state)


def test_restore_into_a_different_structure_is_refused(tmp_path):
    _, state = make_run()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        other = state._replace(params={"b": state.params["b"], "w": np.zeros(4, np.float32)})
        with pytest.raises(CheckpointError):
            ckpt.restore(other)
