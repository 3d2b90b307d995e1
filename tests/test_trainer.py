import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import load_config
from diffalign.rewards import RewardError
from diffalign.trainer import Trainer, epoch_generator, train
from tests.conftest import tiny_run_overrides
from tests.helpers.family_checks import assert_stock_pipeline_applies_lora

BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'


def _cfg(pipe_dir, out, *extra):
    return load_config(overrides=tiny_run_overrides(pipe_dir, out, BRIGHT, *extra))


def _lora(run_dir):
    return load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))


def test_training_changes_only_the_lora_and_logs(tiny_pipe_dir, tmp_path):
    cfg = _cfg(tiny_pipe_dir, tmp_path / "run", "train.epochs=2", "train.learning_rate=1e-2",
               'log.tracker="tensorboard"')
    trainer = Trainer(cfg, log=lambda m: None)
    frozen = {n: p.detach().clone() for n, p in trainer.pipe.unet.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in trainer.pipe.unet.named_parameters() if "lora_" in n}
    result = trainer.fit()
    for n, p in trainer.pipe.unet.named_parameters():
        if "lora_" in n:
            continue
        assert torch.equal(p, frozen[n]), f"frozen weight {n} changed"
    changed = [n for n, p in trainer.pipe.unet.named_parameters() if "lora_" in n and not torch.equal(p, lora_before[n])]
    assert changed, "no LoRA weight changed"
    assert not any(p.requires_grad for p in trainer.pipe.vae.parameters())
    assert not any(p.requires_grad for p in trainer.pipe.text_encoder.parameters())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["trajectories"] == 8
    assert all(k in lines[0] for k in ("reward_mean", "train/approx_kl", "train/clipfrac"))
    assert (result.lora_dir / "diffalign_config.toml").is_file()
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 2000  # scalars and the image grid


def test_resume_continues_exactly(tiny_pipe_dir, tmp_path):
    full = train(_cfg(tiny_pipe_dir, tmp_path / "full", "train.epochs=3", "train.learning_rate=1e-2"), log=lambda m: None)
    # The same run, stopped after 2 epochs and resumed to 3.
    train(_cfg(tiny_pipe_dir, tmp_path / "split", "train.epochs=2", "train.learning_rate=1e-2"), log=lambda m: None)
    resumed = train(_cfg(tiny_pipe_dir, tmp_path / "split", "train.epochs=3", "train.learning_rate=1e-2"),
                    resume=True, log=lambda m: None)
    a, b = _lora(tmp_path / "full"), _lora(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [h["reward_mean"] for h in full.history] == [h["reward_mean"] for h in resumed.history]


def test_lora_loads_in_stock_diffusers(tiny_pipe_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train(_cfg(tiny_pipe_dir, tmp_path / "run", "train.epochs=1", "train.learning_rate=5e-2"),
                   log=lambda m: None)
    assert_stock_pipeline_applies_lora(StableDiffusionPipeline.from_pretrained(str(tiny_pipe_dir), safety_checker=None),
                                       result.lora_dir)


def test_failing_reward_stops_with_a_clear_message_and_trains_nothing(tiny_pipe_dir, tmp_path):
    bad = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:returns_nan"}}]'
    cfg = load_config(overrides=tiny_run_overrides(tiny_pipe_dir, tmp_path / "run", bad, "train.epochs=2"))
    trainer = Trainer(cfg, log=lambda m: None)
    lora_before = {n: p.detach().clone() for n, p in trainer.pipe.unet.named_parameters() if "lora_" in n}
    with pytest.raises(RewardError, match=r"reward 'python' on batch 1 of epoch 1 returned non-finite"):
        trainer.fit()
    for n, p in trainer.pipe.unet.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, lora_before[n])


def test_skip_policy_drops_bad_batches_then_gives_up(tiny_pipe_dir, tmp_path):
    bad = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:raises"}}]'
    messages = []
    cfg = load_config(overrides=tiny_run_overrides(tiny_pipe_dir, tmp_path / "run", bad, "train.epochs=3",
                                                   'reward.on_error="skip_batch"', "reward.max_skipped_batches=1"))
    with pytest.raises(RewardError, match=r"2 reward batches skipped \(reward.max_skipped_batches = 1\)"):
        train(cfg, log=messages.append)
    assert any("skipping this batch" in m for m in messages)


def test_incomplete_checkpoint_is_never_loaded(tiny_pipe_dir, tmp_path):
    cfg = _cfg(tiny_pipe_dir, tmp_path / "run", "train.epochs=1")
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.fit()
    ckpts = trainer.checkpoints()
    assert [p.name for p in ckpts] == ["checkpoint-1"]
    # A half-written checkpoint (crash before the rename) is invisible; one without its marker is refused.
    (tmp_path / "run" / "checkpoints" / ".tmp-checkpoint-2").mkdir()
    broken = tmp_path / "run" / "checkpoints" / "checkpoint-5"
    broken.mkdir()
    assert [p.name for p in trainer.checkpoints()] == ["checkpoint-1"]
    with pytest.raises(RuntimeError, match="incomplete"):
        trainer.load_checkpoint(broken)


def test_process_generators_differ_and_repeat():
    a = torch.randn(4, generator=epoch_generator(0, 0, 3, 0))
    b = torch.randn(4, generator=epoch_generator(0, 1, 3, 0))
    c = torch.randn(4, generator=epoch_generator(0, 0, 3, 0))
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_trajectory_generators_are_global_and_distinct():
    from diffalign.trainer import trajectory_generator

    draws = [torch.randn(3, generator=trajectory_generator(0, 1, g)) for g in range(6)]
    assert all(not torch.equal(draws[i], draws[j]) for i in range(6) for j in range(i + 1, 6))
    assert torch.equal(draws[4], torch.randn(3, generator=trajectory_generator(0, 1, 4)))


def test_non_finite_loss_stops_before_touching_the_weights(tiny_pipe_dir, tmp_path):
    cfg = _cfg(tiny_pipe_dir, tmp_path / "run", "train.epochs=1")
    trainer = Trainer(cfg, log=lambda m: None)
    real_loss = trainer.algorithm.loss

    def nan_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return loss * float("nan"), stats

    trainer.algorithm.loss = nan_loss
    before = {n: p.detach().clone() for n, p in trainer.pipe.unet.named_parameters() if "lora_" in n}
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.fit()
    assert all(torch.equal(p, before[n]) for n, p in trainer.pipe.unet.named_parameters() if "lora_" in n)


def test_fused_timesteps_give_the_same_training_in_fewer_unet_calls(tiny_pipe_dir, tmp_path):
    runs, training_calls = {}, {}
    for per_call in (1, 3):  # the tiny run trains all 3 steps of each trajectory
        cfg = _cfg(tiny_pipe_dir, tmp_path / str(per_call), "train.epochs=2", "train.learning_rate=1e-2",
                   f"train.timesteps_per_call={per_call}")
        trainer = Trainer(cfg, log=lambda m: None)
        training_calls[per_call] = rows = []

        def count_training_rows(module, args, output, rows=rows):
            if torch.is_grad_enabled():  # sampling runs without gradients
                rows.append(args[0].shape[0])

        trainer.pipe.unet.register_forward_hook(count_training_rows)
        runs[per_call] = trainer.fit().history
    # 2 epochs x 2 minibatches of 2 trajectories x 3 steps; CFG doubles the rows of a call.
    assert training_calls[1] == [2 * 2] * 12 and training_calls[3] == [2 * 2 * 3] * 4
    for a, b in zip(runs[1], runs[3]):
        assert a["optimizer_steps"] == b["optimizer_steps"]
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-5)
        # Means over the same transitions (the policy loss is ~1e-6 here: ratios ~1, advantages centred).
        assert a["train/ratio"] == pytest.approx(b["train/ratio"], abs=1e-4)
        assert a["train/approx_kl"] == pytest.approx(b["train/approx_kl"], rel=1e-2, abs=1e-9)
        assert a["train/policy_loss"] == pytest.approx(b["train/policy_loss"], abs=1e-6)
        # The accumulated gradient itself (Adam would hide a wrong loss scale; the norm does not).
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-3)
    a, b = _lora(tmp_path / "1"), _lora(tmp_path / "3")
    # Rounding differs between one call and three; Adam's sign(g) step turns a flipped near-zero gradient
    # into a 2 x lr difference for that weight, so bound the share of such weights and the RMS.
    delta = torch.cat([(a[k] - b[k]).flatten() for k in a])
    assert (delta.abs() > 1e-3).float().mean() <= 0.01 and delta.pow(2).mean().sqrt() <= 1e-3


def test_fused_timesteps_are_checked_against_the_trained_steps_and_the_algorithm(tiny_pipe_dir, tmp_path):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.timesteps_per_call \(2\) must divide the 3 trained steps.*\[1, 3\]"):
        _cfg(tiny_pipe_dir, tmp_path / "a", "train.timesteps_per_call=2")
    with pytest.raises(ConfigError, match="implemented for ddpo only"):
        _cfg(tiny_pipe_dir, tmp_path / "b", "train.timesteps_per_call=3", 'train.algorithm="dag-db"')
