"""A damaged or half-written checkpoint never loads: the manifest in COMPLETE is verified before a resume,
which names the damage and falls back to the previous good checkpoint (and still ends bit-identical).

The damage checks run on a checkpoint-shaped directory (fast); the tests that train are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.config import load_config
from diffalign.reliability import CheckpointError, verify_checkpoint, write_manifest
from diffalign.trainer import COMPLETE_MARKER, Trainer, train
from tests.conftest import tiny_run_overrides

BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'


def _overrides(pipe_dir, out, epochs):
    return tiny_run_overrides(pipe_dir, out, BRIGHT, f"train.epochs={epochs}", "train.learning_rate=1e-2",
                              "checkpoint.every=1", "checkpoint.keep=3")


@pytest.fixture(scope="module")
def finished_run(tiny_pipe_dir, tmp_path_factory):
    """A 3-epoch run with checkpoints 1, 2, 3: the reference for every test here."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    train(load_config(overrides=_overrides(tiny_pipe_dir, out, 3)), log=lambda m: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-lora": (lambda c: _truncate(c / "lora.safetensors"), "lora.safetensors is"),
    "flipped-byte-optimizer": (lambda c: _flip_byte(c / "optimizer.bin"), "optimizer.bin does not match its sha256"),
    "missing-rng-state": (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "truncated-state": (lambda c: (c / "trainer_state.json").write_text("{"), "trainer_state.json is"),
    "garbled-marker": (lambda c: (c / COMPLETE_MARKER).write_text("{not json"), "marker is unreadable"),
    "missing-marker": (lambda c: (c / COMPLETE_MARKER).unlink(), "no COMPLETE marker: incomplete"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_names_the_damage(kind, tmp_path):
    ckpt = tmp_path / "checkpoint-2"  # the files a checkpoint holds, with random contents
    ckpt.mkdir()
    for name, size in (("lora.safetensors", 4096), ("optimizer.bin", 8192), ("random_states_0.pkl", 300),
                       ("custom_checkpoint_0.pkl", 200), ("trainer_state.json", 500)):
        (ckpt / name).write_bytes(os.urandom(size))
    write_manifest(ckpt, COMPLETE_MARKER, 2)
    assert verify_checkpoint(ckpt, COMPLETE_MARKER) is None
    damage, message = DAMAGE[kind]
    damage(ckpt)
    problem = verify_checkpoint(ckpt, COMPLETE_MARKER)
    assert problem is not None and message in problem, problem


@pytest.mark.slow
def test_manifest_lists_every_file_and_old_markers_still_load(finished_run, tmp_path):
    ckpt = finished_run / "checkpoints" / "checkpoint-2"
    manifest = json.loads((ckpt / COMPLETE_MARKER).read_text())
    assert manifest["epoch"] == 2
    assert set(manifest["files"]) == {p.name for p in ckpt.iterdir() if p.name != COMPLETE_MARKER}
    old = tmp_path / "checkpoint-2"
    shutil.copytree(ckpt, old)
    (old / COMPLETE_MARKER).write_text("2")  # a marker written before manifests: accepted, nothing to verify
    assert verify_checkpoint(old, COMPLETE_MARKER) is None


@pytest.mark.slow
def test_resume_falls_back_past_damaged_checkpoints_and_ends_identical(finished_run, tiny_pipe_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "lora")
    _truncate(run / "checkpoints" / "checkpoint-3" / "lora.safetensors")  # e.g. a copy cut short
    (run / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER).unlink()  # a marker lost
    messages: list[str] = []
    result = train(load_config(overrides=_overrides(tiny_pipe_dir, run, 3)), resume=True, log=messages.append)
    text = "\n".join(messages)
    assert "ignoring checkpoint-2: no COMPLETE marker" in text
    assert "checkpoint-3 is damaged (lora.safetensors is" in text and "falling back to the previous checkpoint" in text
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-1'} (1 epoch(s) done; continuing with epoch 2" in text
    assert len(result.history) == 3
    ref = load_file(str(finished_run / "lora" / "pytorch_lora_weights.safetensors"))
    got = load_file(str(result.lora_dir / "pytorch_lora_weights.safetensors"))
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)


@pytest.mark.slow
def test_every_checkpoint_damaged_is_a_clear_error_not_a_fresh_start(finished_run, tiny_pipe_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for ckpt in (run / "checkpoints").iterdir():
        _flip_byte(ckpt / "lora.safetensors")
    trainer = Trainer(load_config(overrides=_overrides(tiny_pipe_dir, run, 3)), log=lambda m: None)
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        trainer.load_checkpoint()
    with pytest.raises(CheckpointError, match="checkpoint-1 cannot be loaded: lora.safetensors does not match"):
        trainer.load_checkpoint(run / "checkpoints" / "checkpoint-1")
    sets = [x for s in _overrides(tiny_pipe_dir, run, 3) for x in ("--set", s)]
    result = CliRunner().invoke(app, ["train", *sets, "--resume"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: --resume: every checkpoint in" in result.output and "delete them to start over" in result.output
