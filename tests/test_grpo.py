"""GRPO (algorithms/grpo.py), the Flow-GRPO recipe: group-relative advantages, the closed-form per-step KL to the
frozen model, the step window, and short runs on the toy SD pipeline and a tiny SD3."""

import numpy as np
import pytest
import torch

from diffalign.algorithms.grpo import GRPO, group_advantages
from diffalign.config import load_config
from tests.conftest import tiny_run_overrides

BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'
GROUPS = ("sample.same_prompt_per_batch=true", 'train.algorithm="grpo"')


def test_group_advantages_compare_images_of_one_prompt_only():
    prompts = ["a", "a", "a", "b", "b", "b"]
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    adv = group_advantages(prompts, rewards)
    assert np.allclose(adv[:3], (rewards[:3] - 2.0) / (np.std([1.0, 2.0, 3.0]) + 1e-4))
    assert np.allclose(adv[3:], (rewards[3:] - 11.0) / (np.std([10.0, 10.0, 13.0]) + 1e-4))
    assert np.allclose([adv[:3].sum(), adv[3:].sum()], 0.0)  # group mean removed: b's high rewards are no advantage
    glob = group_advantages(prompts, rewards, global_std=True)
    assert np.allclose(glob[:3], (rewards[:3] - 2.0) / (rewards.std() + 1e-4))


def test_grpo_needs_groups_and_a_window_that_fits(tiny_pipe_dir, tmp_path):
    with pytest.raises(ValueError, match="same_prompt_per_batch"):
        load_config(overrides=tiny_run_overrides(tiny_pipe_dir, tmp_path, 'train.algorithm="grpo"'))
    with pytest.raises(ValueError, match="grpo.window_start"):
        load_config(overrides=tiny_run_overrides(tiny_pipe_dir, tmp_path, *GROUPS, "grpo.window_start=2",
                                                 "train.timestep_fraction=1.0"))


def test_window_trains_a_contiguous_block_of_steps(tiny_pipe_dir, tmp_path):
    cfg = load_config(overrides=tiny_run_overrides(tiny_pipe_dir, tmp_path, *GROUPS, "sample.num_steps=10",
                                                   "train.timestep_fraction=0.3", "grpo.window_start=2"))
    algo = GRPO(cfg)
    calls = algo.schedule(4, 10, 3, 2, torch.Generator().manual_seed(0))
    steps = torch.cat([k for _, k in calls])
    assert sorted(set(steps.tolist())) == [2, 3, 4] and len(steps) == 4 * 3
    rows = torch.cat([r for r, _ in calls])
    assert sorted(rows.tolist()) == sorted([0, 1, 2, 3] * 3)  # every trajectory on every step of the window


def test_kl_term_is_zero_at_the_frozen_model_and_pulls_back_towards_it(tiny_pipe_dir):
    from diffalign.algorithms.base import Policy
    from diffalign.pipeline import attach_lora, load_pipeline
    from diffalign.sampling import sample_trajectories
    from tests.test_dag import _transitions

    pipe = load_pipeline(str(tiny_pipe_dir))
    cfg = load_config(overrides=[*GROUPS, "grpo.kl_weight=1.0"])
    algo = GRPO(cfg)
    traj = sample_trajectories(pipe, ["two red circles"] * 3, num_steps=3, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # the LoRA's initial A and the perturbation below: independent of the tests run before
    lora = attach_lora(pipe.unet, 4, 4.0)
    policy = Policy(pipe.unet, pipe.scheduler, 3.0, 1.0, "mean", lambda: torch.autocast("cpu", enabled=False))
    prepared = {"advantages": torch.zeros(3)}  # the policy term is then zero: only the KL acts
    tr = _transitions(traj, 1)
    _, stats = algo.loss(tr, policy, prepared, epoch=0)
    assert stats["kl"] == 0.0  # a fresh LoRA is the identity: the step's Gaussian is the frozen model's
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(lora, lr=0.05)  # small steps: each one must lower the KL (first order)
    kls = []
    for _ in range(6):
        loss, stats = algo.loss(tr, policy, prepared, epoch=0)
        kls.append(stats["kl"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The KL's gradient moves the LoRA back towards the frozen model, step after step.
    assert kls[0] > 0 and all(b < a for a, b in zip(kls, kls[1:])), kls


def test_grpo_runs_on_a_flow_matching_model(tmp_path):
    from diffalign.trainer import train
    from tests.helpers.tiny_flow import build_sd3_pipeline

    build_sd3_pipeline(tmp_path / "sd3")
    cfg = load_config(overrides=tiny_run_overrides(tmp_path / "sd3", tmp_path / "run", BRIGHT, *GROUPS,
                                                   "sample.eta=0.7", "train.epochs=1", "train.learning_rate=1e-2",
                                                   "grpo.kl_weight=0.04", "grpo.window_start=0",
                                                   "train.timestep_fraction=0.67"))
    result = train(cfg, log=lambda m: None)
    metrics = result.history[-1]
    assert np.isfinite(metrics["train/policy_loss"]) and metrics["train/kl"] >= 0
