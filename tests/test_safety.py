import json

import numpy as np
import pytest

from diffalign.config import load_config
from diffalign.rewards import build_reward
from diffalign.safety import ToyRedObjects, with_safety
from diffalign.toy.scenes import render_scene
from diffalign.trainer import Trainer, train
from tests.conftest import tiny_run_overrides

BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'


def test_toy_filter_flags_images_with_red_objects():
    prompts = ["two red circles", "three blue squares", "a red triangle left of a green circle",
               "one yellow circle"]
    images = np.stack([render_scene(p, seed).image for seed, p in enumerate(prompts)])
    assert ToyRedObjects()(images, prompts, [{}] * 4).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_flagged_images_are_counted_and_penalised():
    cfg = load_config(overrides=['safety.filter="toy_red_objects"', "safety.penalty=2.0"])
    plain = build_reward(cfg.reward.terms)  # the toy judge's partial score
    filtered = with_safety(plain, cfg.safety)
    prompts = ["two red circles", "three blue squares", "two red squares", "one yellow circle"]
    images = np.stack([render_scene(p, 3).image for p in prompts])
    base, _ = plain(images, prompts, [{}] * 4)
    total, info = filtered(images, prompts, [{}] * 4, batch=0)
    np.testing.assert_allclose(total, base - 2.0 * np.array([1, 0, 1, 0]))
    assert info["safety_flagged_rate"] == 0.5 and "toy" in info


def test_without_a_filter_the_reward_is_unchanged():
    cfg = load_config()
    reward = build_reward(cfg.reward.terms)
    assert with_safety(reward, cfg.safety) is reward


def test_unknown_filter_names_the_field(tiny_pipe_dir, tmp_path):
    cfg = load_config(overrides=tiny_run_overrides(tiny_pipe_dir, tmp_path / "r", 'safety.filter="nsfw9000"'))
    with pytest.raises(ValueError, match=r"safety.filter 'nsfw9000' is unknown; choose one of .*toy_red_objects"):
        Trainer(cfg, log=lambda m: None)


def test_flagged_rate_is_logged_per_epoch(tiny_pipe_dir, tmp_path):
    # A filter that flags every image: the rate is 1 in every epoch's metrics.
    cfg = load_config(overrides=tiny_run_overrides(
        tiny_pipe_dir, tmp_path / "run", BRIGHT, "train.epochs=2", "guards.every=0",
        'safety.filter="python"', 'safety.args={function="tests.helpers.user_rewards:brightness"}',
        "safety.threshold=0.0", "safety.penalty=0.5"))
    result = train(cfg, log=lambda m: None)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/safety_flagged_rate"] for m in lines] == [1.0, 1.0]
    # Every image penalised by 0.5: the mean reward is brightness - 0.5 (brightness is in [0, 1]).
    assert all(-0.5 <= h["reward_mean"] <= 0.5 for h in result.history)
