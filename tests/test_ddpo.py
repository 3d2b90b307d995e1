import numpy as np
import torch

from diffalign.algorithms.ddpo import DDPO, PerPromptStatTracker, batch_normalize, ppo_clipped_loss
from diffalign.config import DDPOConfig


def test_loss_sign_pushes_likelihood_toward_positive_advantage():
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2)
    new = torch.zeros(2, requires_grad=True)
    loss, _ = ppo_clipped_loss(adv, new, old, clip_range=0.2)
    loss.backward()
    # Gradient descent raises log p where A > 0 and lowers it where A < 0.
    assert new.grad[0] < 0 and new.grad[1] > 0


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = torch.zeros(4)
    # ratios: 1.5 (A>0: clipped), 0.5 (A<0: clipped), 0.5 (A>0: not clipped, pessimistic), 1.5 (A<0: not clipped)
    new = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.5])).requires_grad_(True)
    loss, stats = ppo_clipped_loss(adv, new, old, clip_range=0.1)
    loss.backward()
    assert new.grad[0] == 0 and new.grad[1] == 0
    assert new.grad[2] != 0 and new.grad[3] != 0
    assert stats["clipfrac"] == 1.0
    manual = torch.maximum(-adv * torch.exp(new.detach()), -adv * torch.clamp(torch.exp(new.detach()), 0.9, 1.1)).mean()
    torch.testing.assert_close(loss.detach(), manual)


def test_approx_kl_is_half_mean_squared_log_ratio():
    old = torch.zeros(3)
    new = torch.tensor([0.1, -0.2, 0.0])
    _, stats = ppo_clipped_loss(torch.ones(3), new, old, 1e-4)
    assert abs(stats["approx_kl"] - 0.5 * (0.01 + 0.04) / 3) < 1e-7


def test_per_prompt_normalisation_uses_each_prompts_statistics():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=2)
    prompts = ["a", "a", "a", "b", "b", "b"]
    rewards = np.array([1.0, 2.0, 3.0, 100.0, 200.0, 300.0])
    adv = tracker.normalize(prompts, rewards)
    np.testing.assert_allclose(adv[:3], adv[3:], rtol=1e-5)  # same shape within each prompt
    np.testing.assert_allclose(adv[:3].mean(), 0.0, atol=1e-9)


def test_few_samples_fall_back_to_batch_statistics():
    tracker = PerPromptStatTracker(buffer_size=32, min_count=4)
    prompts = ["a", "a", "b", "b"]
    rewards = np.array([0.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(tracker.normalize(prompts, rewards), batch_normalize(rewards))


def test_buffer_is_rolling_and_checkpointable():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.normalize(["a"] * 5, np.arange(5.0))
    assert list(tracker.buffers["a"]) == [2.0, 3.0, 4.0]
    other = PerPromptStatTracker(buffer_size=3, min_count=1)
    other.load_state_dict(tracker.state_dict())
    np.testing.assert_allclose(other.normalize(["a"], np.array([9.0])), tracker.normalize(["a"], np.array([9.0])))


def test_advantages_are_clipped():
    algo = DDPO(DDPOConfig(per_prompt_stat_tracking=False, adv_clip_max=1.0))
    adv = algo.advantages(["p"] * 5, np.array([0, 0, 0, 0, 100.0]))
    assert adv.max() == 1.0 and adv.min() >= -1.0
