import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffalign.sampling import (
    ddim_step_with_logprob,
    gaussian_log_prob,
    predict_x0_eps,
    sample_trajectories,
)
from diffalign.toy.model import SCHEDULER_CONFIG


def _scheduler(prediction_type="epsilon", steps=10):
    s = DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type}, set_alpha_to_one=False)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_matches_direct_gaussian(reduction):
    torch.manual_seed(0)
    sched = _scheduler()
    x = torch.randn(3, 4, 8, 8)
    eps = torch.randn_like(x)
    t = sched.timesteps[4]
    prev, lp = ddim_step_with_logprob(sched, eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(1),
                                      reduction=reduction)
    # Direct computation from DDIM eq. 12/16 with torch.distributions.
    a_t = sched.alphas_cumprod[t]
    a_p = sched.alphas_cumprod[t - 100]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    std = ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    mean = a_p.sqrt() * x0 + (1 - a_p - std**2).sqrt() * eps
    elem = torch.distributions.Normal(mean, std).log_prob(prev)
    expected = elem.mean(dim=(1, 2, 3)) if reduction == "mean" else elem.sum(dim=(1, 2, 3))
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-4)


def test_mean_is_sum_over_elements():
    x, mu, std = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor(0.3)
    torch.testing.assert_close(gaussian_log_prob(x, mu, std, "mean") * 64, gaussian_log_prob(x, mu, std, "sum"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_step_equals_diffusers_ddim(prediction_type):
    torch.manual_seed(0)
    sched = _scheduler(prediction_type)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (sched.timesteps[0], sched.timesteps[5], sched.timesteps[-1]):
        ref = sched.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
        ours, _ = ddim_step_with_logprob(sched, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_per_sample_timesteps_equal_scalar_steps():
    torch.manual_seed(0)
    sched = _scheduler()
    x, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    ts = sched.timesteps[[0, 4, 9]]
    nxt = torch.randn_like(x)
    _, lp_batch = ddim_step_with_logprob(sched, eps, ts, x, prev_sample=nxt)
    for i in range(3):
        _, lp_i = ddim_step_with_logprob(sched, eps[i:i + 1], ts[i], x[i:i + 1], prev_sample=nxt[i:i + 1])
        torch.testing.assert_close(lp_batch[i:i + 1], lp_i)


def test_eta_zero_is_rejected():
    sched = _scheduler()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(sched, x, sched.timesteps[0], x, eta=0.0)


def test_x0_eps_consistent_across_prediction_types():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sched = _scheduler()
    t = sched.timesteps[3]
    a = sched.alphas_cumprod[t]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    for kind, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        got_x0, got_eps = predict_x0_eps(_scheduler(kind), out, t, xt)
        torch.testing.assert_close(got_x0, x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_eps, eps, rtol=1e-4, atol=1e-4)


def test_sampler_equals_stock_pipeline(tiny_pipe):
    prompts = ["two red circles", "a blue square above a green circle"]
    ref = tiny_pipe(prompts, num_inference_steps=5, guidance_scale=4.0, eta=1.0,
                    generator=torch.Generator().manual_seed(7), output_type="pt").images
    traj = sample_trajectories(tiny_pipe, prompts, num_steps=5, guidance_scale=4.0, eta=1.0,
                               generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(traj.images, ref, rtol=0, atol=1e-6)
    assert traj.latents.shape == (2, 6, 4, 16, 16)
    assert traj.log_probs.shape == (2, 5) and torch.isfinite(traj.log_probs).all()
    assert traj.guided_eps.shape == (2, 5, 4, 16, 16)
    torch.testing.assert_close(traj.latents[:, 0], traj.initial_noise)


def test_supplied_initial_noise_is_used(tiny_pipe):
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a = sample_trajectories(tiny_pipe, ["one red circle"] * 2, num_steps=3, initial_noise=noise,
                            generator=torch.Generator().manual_seed(1))
    b = sample_trajectories(tiny_pipe, ["one red circle"] * 2, num_steps=3, initial_noise=noise,
                            generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.latents, b.latents)
    torch.testing.assert_close(a.initial_noise, noise)
    with pytest.raises(ValueError, match="initial_noise has shape"):
        sample_trajectories(tiny_pipe, ["one red circle"], num_steps=3, initial_noise=noise)


def test_stored_log_probs_are_reproduced_when_rescored(tiny_pipe):
    """Re-scoring a stored step under the same model gives the sampling-time log-prob (ratio 1)."""
    from diffalign.sampling import guided_noise_prediction

    traj = sample_trajectories(tiny_pipe, ["three blue squares"] * 3, num_steps=4, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0))
    k = 2
    with torch.no_grad():
        eps = guided_noise_prediction(tiny_pipe.unet, traj.latents[:, k], traj.timesteps[k], traj.prompt_embeds,
                                      traj.negative_embeds, 3.0)
        _, lp = ddim_step_with_logprob(tiny_pipe.scheduler, eps, traj.timesteps[k], traj.latents[:, k],
                                       prev_sample=traj.latents[:, k + 1])
    torch.testing.assert_close(lp, traj.log_probs[:, k], rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(lp.sum()))


def test_bf16_weights_give_finite_trajectories(tiny_pipe_dir):
    """The DDIM step's arithmetic runs in fp32: with bf16 schedule values the last step was 0/0 (NaN images)."""
    from diffalign.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_pipe_dir), dtype=torch.bfloat16)
    traj = sample_trajectories(pipe, ["one red circle", "two blue squares"], num_steps=4, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(traj.images).all() and torch.isfinite(traj.log_probs).all()
    assert traj.latents.dtype == torch.bfloat16  # the trajectory keeps the model's precision
