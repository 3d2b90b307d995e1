import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import ConfigError, load_config
from diffalign.report import write_report
from diffalign.trainer import Trainer, train
from tests.conftest import tiny_run_overrides
from tests.helpers import guard_rewards

BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'
SCRIPTED = 'guards.rewards=[{name="python", args={function="tests.helpers.guard_rewards:scripted"}, min_fraction=0.5}]'


def _cfg(pipe_dir, out, *extra):
    return load_config(overrides=tiny_run_overrides(
        pipe_dir, out, BRIGHT, "train.learning_rate=1e-2", "guards.samples_per_prompt=2", "guards.num_prompts=1",
        "guards.every=1", *extra))


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("setting, expected", [
    ('guards.rewards=[{name="toy"}]', "has no limit: set min_fraction"),
    ('guards.best_by="toy"', "guards.best_by 'toy' is neither 'reward_mean' nor a guard reward"),
    ('guards.rewards=[{name="toy", min_fraction=0.5}, {name="toy", max_drop=0.1}]', "needs its own name"),
    ("guards.diversity_min_fraction=1.5", "guards.diversity_min_fraction"),
])
def test_bad_guard_settings_name_the_field(setting, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=[setting])


def test_unknown_guard_reward_names_the_guard_field(tiny_pipe_dir, tmp_path):
    cfg = _cfg(tiny_pipe_dir, tmp_path / "r", 'guards.rewards=[{name="nope", min_fraction=0.5}]')
    with pytest.raises(ValueError, match=r"guards.rewards\[0\].name 'nope' is unknown"):
        Trainer(cfg, log=lambda m: None)


def test_drift_guard_stops_the_run_and_names_the_numbers(tiny_pipe_dir, tmp_path):
    run = tmp_path / "run"
    messages = []
    cfg = _cfg(tiny_pipe_dir, run, "train.epochs=3", "guards.drift_max=1e-6", 'guards.action="stop"')
    result = train(cfg, log=messages.append)
    lines = _metrics(run)
    assert [m["epoch"] for m in lines] == [1]  # stopped after the first check, not after 3 epochs
    assert lines[0]["guard/tripped"] == 1 and lines[0]["guard/drift"] > 1e-6
    assert "guard 'drift' tripped at epoch 1" in lines[0]["guard/alarms"][0]
    assert result.stopped_by and "drift_max 0.0000" in result.stopped_by
    assert any("stopped by guards after epoch 1" in m for m in messages)
    assert (result.lora_dir / "pytorch_lora_weights.safetensors").is_file()
    report = write_report(run).read_text()
    assert "<h2>Guards</h2>" in report and "guard &#x27;drift&#x27; tripped at epoch 1" in report


def test_warn_only_logs_and_trains_on(tiny_pipe_dir, tmp_path):
    messages = []
    cfg = _cfg(tiny_pipe_dir, tmp_path / "run", "train.epochs=2", "guards.drift_max=1e-6")
    result = train(cfg, log=messages.append)
    assert [m["epoch"] for m in result.history] == [1, 2] and result.stopped_by is None
    assert sum("guard 'drift' tripped" in m for m in messages) == 2


def test_rollback_restores_the_best_passing_check(tiny_pipe_dir, tmp_path):
    # The scripted guard reward: base 1.0, epoch 1 passes (0.9), epoch 2 passes (0.8), epoch 3 trips (0.1).
    guard_rewards.SCRIPT[:] = [1.0, 0.9, 0.8, 0.1]
    guard_rewards.CALLS.clear()
    run = tmp_path / "run"
    cfg = _cfg(tiny_pipe_dir, run, "train.epochs=5", SCRIPTED, 'guards.action="rollback"',
               'guards.best_by="python"', "checkpoint.keep=5", "guards.diversity_min_fraction=0.01")
    trainer = Trainer(cfg, log=lambda m: None)
    result = trainer.fit()
    assert not guard_rewards.SCRIPT and guard_rewards.CALLS == [2, 2, 2, 2]  # base + 3 checks, 2 images each
    lines = _metrics(run)
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert lines[2]["guard/rolled_back_to_epoch"] == 1  # best by the guard reward: 0.9 at epoch 1
    assert "guard 'reward:python' tripped at epoch 3: 0.1000 < limit 0.5000 (base model 1.0000)" in result.stopped_by
    # The published LoRA names its modules as the family's pipeline does ("unet." prefix), checkpoints do not.
    def lora(path):
        return {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    final = lora(result.lora_dir / "pytorch_lora_weights.safetensors")
    epoch1 = lora(run / "checkpoints" / "checkpoint-1" / "lora.safetensors")
    epoch2 = lora(run / "checkpoints" / "checkpoint-2" / "lora.safetensors")
    assert final.keys() == epoch1.keys()
    assert all(torch.equal(final[k], epoch1[k]) for k in final)
    assert not all(torch.equal(final[k], epoch2[k]) for k in final)


def test_rollback_before_any_passing_check_restores_the_initial_lora(tiny_pipe_dir, tmp_path):
    cfg = _cfg(tiny_pipe_dir, tmp_path / "run", "train.epochs=2", "guards.drift_max=1e-6", 'guards.action="rollback"')
    trainer = Trainer(cfg, log=lambda m: None)
    initial = [p.detach().clone() for p in trainer.lora_params]
    result = trainer.fit()
    assert result.history[-1]["guard/rolled_back_to_epoch"] == 0
    assert all(torch.equal(p, q) for p, q in zip(trainer.lora_params, initial))


def test_guards_do_not_change_training_and_cost_nothing_before_their_first_check(tiny_pipe_dir, tmp_path):
    plain = train(_cfg(tiny_pipe_dir, tmp_path / "a", "train.epochs=2", "guards.every=0"), log=lambda m: None)
    guarded = train(_cfg(tiny_pipe_dir, tmp_path / "b", "train.epochs=2"), log=lambda m: None)
    late = Trainer(_cfg(tiny_pipe_dir, tmp_path / "c", "train.epochs=2", "guards.every=5"), log=lambda m: None)
    late.fit()
    assert late.guards.base is None  # never sampled the base model
    assert [h["reward_mean"] for h in plain.history] == [h["reward_mean"] for h in guarded.history]
    a = load_file(str(plain.lora_dir / "pytorch_lora_weights.safetensors"))
    b = load_file(str(guarded.lora_dir / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "guard/diversity" in guarded.history[0] and "guard/diversity" not in plain.history[0]


@pytest.mark.slow
def test_guard_on_toy_success_stops_jpeg_reward_hacking(tmp_path):
    """DDPO on JPEG compressibility at lr 1e-2 breaks the toy model's counting within 2 epochs (32 trajectories):
    bench/reward_hacking.py measured toy success 0.25 -> 0.04 on these fixed seeds while the run only ever saw
    the JPEG score. The held-out guard on toy success must trip at its first check and end the run there."""
    messages = []
    cfg = load_config("configs/ddpo_jpeg.toml", [
        f'output_dir="{tmp_path / "run"}"', 'sample.prompts="hard_counting"', "train.learning_rate=1e-2",
        "train.epochs=6", "sample.num_steps=10", "sample.batch_size=8", "sample.num_batches_per_epoch=2",
        "log.progress=false", 'log.tracker="none"', "checkpoint.every=0",
        "guards.every=2", "guards.num_prompts=3", "guards.samples_per_prompt=8", 'guards.action="stop"',
        'guards.rewards=[{name="toy", args={mode="success"}, min_fraction=0.5}]'])
    result = train(cfg, log=messages.append)
    assert [h["epoch"] for h in result.history] == [1, 2]  # stopped at the first check, 4 epochs early
    check = result.history[-1]
    assert check["guard/toy_base"] >= 0.2 and check["guard/toy"] < 0.5 * check["guard/toy_base"]
    assert result.stopped_by.startswith("guard 'reward:toy' tripped at epoch 2: ")
    assert f"< limit {0.5 * check['guard/toy_base']:.4f} (base model {check['guard/toy_base']:.4f})" in result.stopped_by
    assert any(m.startswith("warning: guard 'reward:toy' tripped") for m in messages)
    card = (result.lora_dir / "README.md").read_text()
    assert "guard 'reward:toy' tripped at epoch 2" in card and "ended early by its guards (stop)" in card
