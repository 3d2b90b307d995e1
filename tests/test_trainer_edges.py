"""Runs that must not end "successfully" untrained, skipped batches on record, messages on their own lines."""

import io
import json
import sys

import pytest
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.config import load_config
from diffalign.rewards import RewardError, WeightedReward
from diffalign.trainer import Trainer
from tests.conftest import tiny_run_overrides

RAISES = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:raises"}}]'


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_that_trained_on_nothing_fails_and_writes_no_lora(tiny_pipe_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train"]
    for s in tiny_run_overrides(tiny_pipe_dir, run, RAISES, "train.epochs=2", "checkpoint.every=1",
                                "reward.on_error=skip_batch", "reward.max_skipped_batches=5"):
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "error: nothing was trained: every reward batch of the 2 epoch(s) was skipped (2 batches" in result.output
    assert "LoRA written" not in result.output
    assert not (run / "lora").exists() and not list(run.glob("checkpoints/checkpoint-*"))
    lines = _metrics(run)
    assert [(m["epoch"], m["skipped_batches"], m["trained"]) for m in lines] == [(1, 1, False), (2, 1, False)]


class _FailsFirstBatchOfEachEpoch:
    """Raises on the first of every two calls (sample.num_batches_per_epoch = 2, one process)."""

    name = "flaky"

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.calls % 2 == 1:
            raise RuntimeError("scorer hiccup")
        return images.reshape(len(images), -1).mean(axis=1) / 255.0


def test_skipped_batches_per_epoch_and_warnings_above_the_progress_bar(tiny_pipe_dir, tmp_path, monkeypatch):
    terminal = io.StringIO()  # stdout and stderr on one terminal, as a user sees them
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    cfg = load_config(overrides=tiny_run_overrides(
        tiny_pipe_dir, tmp_path / "run", "train.epochs=2", "sample.num_batches_per_epoch=2", "log.progress=true",
        "reward.on_error=skip_batch", "reward.max_skipped_batches=5"))
    result = Trainer(cfg, reward=WeightedReward([("flaky", 1.0, _FailsFirstBatchOfEachEpoch())]), log=print).fit()
    assert (result.lora_dir / "pytorch_lora_weights.safetensors").is_file()
    lines = _metrics(tmp_path / "run")
    assert [(m["epoch"], m["skipped_batches"], m["trajectories"]) for m in lines] == [(1, 1, 4), (2, 1, 8)]
    text = terminal.getvalue()
    warnings = [line for line in text.split("\n") if "warning" in line]
    assert len(warnings) == 2, text
    for epoch, line in enumerate(warnings, 1):
        start = line.index("warning: reward 'flaky' raised on batch 1 of epoch " + str(epoch))
        assert start == 0 or line[start - 1] == "\r", repr(line)  # never after the bar's text


def test_an_error_after_the_progress_bar_starts_on_a_new_line(tiny_pipe_dir, tmp_path, monkeypatch):
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    cfg = load_config(overrides=tiny_run_overrides(tiny_pipe_dir, tmp_path / "run", RAISES, "train.epochs=2",
                                                   "log.progress=true"))
    with pytest.raises(RewardError, match="on batch 1 of epoch 1"):
        Trainer(cfg, log=print).fit()
    assert "epochs:" in terminal.getvalue() and terminal.getvalue().endswith("\n")
