"""The flow-matching family (families/flowmatch.py, sd3.py) on a tiny random SD3 pipeline built here: the sampler
against the stock pipeline, the SDE step's log-probability against a direct Gaussian, x0_hat and DAG's backward
kernel against the rectified-flow marginals, every algorithm for one short run, and the LoRA round trip."""

import pytest
import torch

from diffalign.config import load_config
from diffalign.families import StableDiffusion3Family, family_for
from diffalign.pipeline import load_pipeline
from diffalign.sampling import sample_trajectories
from tests.conftest import tiny_run_overrides
from tests.helpers.family_checks import (
    assert_lora_trained,
    assert_resume_continues_exactly,
    assert_stock_pipeline_applies_lora,
    run_feedback_algorithm,
)
from tests.helpers.tiny_flow import build_sd3_pipeline

BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'
PROMPTS = ["two red circles", "a blue square above a green circle"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "pipe"
    build_sd3_pipeline(path)
    return path


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    return load_pipeline(str(sd3_dir))


def test_sd3_loads_as_its_family_and_samples_as_the_stock_pipeline_without_noise(sd3):
    assert isinstance(family_for(sd3), StableDiffusion3Family) and not sd3.transformer.training
    ref = sd3(PROMPTS, num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(7),
              output_type="pt").images
    traj = sample_trajectories(sd3, PROMPTS, num_steps=4, guidance_scale=4.0, eta=0.0,
                               generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(traj.images, ref, rtol=0, atol=1e-6)
    assert set(traj.extra_cond) == {"pooled", "negative_pooled"}
    assert torch.isnan(traj.log_probs).all()  # no noise, no density
    noisy = sample_trajectories(sd3, PROMPTS, num_steps=4, guidance_scale=4.0, eta=0.7,
                                generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(noisy.log_probs).all() and (noisy.images - ref).abs().max() > 1e-3


def test_sde_step_log_prob_is_the_gaussian_of_the_reference_formula(sd3):
    family = family_for(sd3)
    family.set_timesteps(6, "cpu")
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    for k in (0, 2, 5):  # s = 1 (the guarded denominator), a middle step, the last step (s' = 0)
        t = sd3.scheduler.timesteps[k]
        s, s_next = sd3.scheduler.sigmas[k], sd3.scheduler.sigmas[k + 1]
        a = 0.7
        s_safe = sd3.scheduler.sigmas[1] if s >= 1 else s
        std_g = a * (s_safe / (1 - s_safe)).sqrt()
        dt = s_next - s
        mean = x + (v + std_g**2 / (2 * s) * (x + (1 - s) * v)) * dt
        std = std_g * (-dt).sqrt()
        nxt, lp = family.step(v, t, x, eta=a, generator=torch.Generator().manual_seed(k), reduction="sum")
        direct = torch.distributions.Normal(mean, std).log_prob(nxt).sum((1, 2, 3))
        torch.testing.assert_close(lp, direct, rtol=1e-5, atol=1e-3)
        # Scoring a given x_s' (the training path), per-sample timesteps, gives the same.
        _, again = family.step(v, torch.full((3,), float(t)), x, eta=a, prev_sample=nxt, reduction="sum")
        torch.testing.assert_close(again, lp)
    with pytest.raises(ValueError, match="eta must be > 0"):
        family.step(v, sd3.scheduler.timesteps[1], x, eta=0.0, prev_sample=x)


def test_x0_hat_and_backward_kernel_follow_the_rectified_flow_marginals(sd3):
    family = family_for(sd3)
    family.set_timesteps(6, "cpu")
    g = torch.Generator().manual_seed(1)
    x0, e = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    k = 2
    t = sd3.scheduler.timesteps[k]
    s, s_next = sd3.scheduler.sigmas[k], sd3.scheduler.sigmas[k + 1]
    xs = (1 - s) * x0 + s * e
    torch.testing.assert_close(family.x0_hat(e - x0, t, xs), x0, rtol=1e-5, atol=1e-5)  # v = e - x0
    assert torch.isclose(family.next_timestep(t), sd3.scheduler.timesteps[k + 1])
    # Noising x_s' (drawn from its marginal around x0) with the backward kernel must give x_s's marginal:
    # mean (1 - s) x0, std s. Checked by sampling, and the log-density against a direct Gaussian.
    r = (1 - s) / (1 - s_next)
    n = 20000
    x0_1 = x0[:1, :1, :1, :1].expand(n, 1, 1, 1)
    gen = torch.Generator().manual_seed(2)
    x_next = (1 - s_next) * x0_1 + s_next * torch.randn(n, 1, 1, 1, generator=gen)
    x_s = r * x_next + (s**2 - r**2 * s_next**2).sqrt() * torch.randn(n, 1, 1, 1, generator=gen)
    assert abs(x_s.mean() - (1 - s) * x0_1[0]) < 0.02 and abs(x_s.std() - s) < 0.02
    lp = family.backward_log_prob(xs, x0, t, "sum")
    direct = torch.distributions.Normal(r * x0, (s**2 - r**2 * s_next**2).sqrt()).log_prob(xs).sum((1, 2, 3))
    torch.testing.assert_close(lp, direct, rtol=1e-5, atol=1e-2)


def _overrides(sd3_dir, out, *extra):
    return tiny_run_overrides(sd3_dir, out, BRIGHT, "sample.eta=0.7", "train.learning_rate=1e-2", *extra)


@pytest.mark.parametrize("algorithm", ["ddpo", "dag-db", "dag-kl"])
def test_sd3_trains_every_sampled_algorithm(sd3_dir, tmp_path, algorithm):
    from diffalign.trainer import train

    cfg = load_config(overrides=_overrides(sd3_dir, tmp_path / "run", f'train.algorithm="{algorithm}"', "train.epochs=1"))
    result = train(cfg, log=lambda m: None)
    losses = [v for k, v in result.history[-1].items() if k.startswith("train/") and k.endswith("loss")]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert_lora_trained(sd3_dir, cfg, result.lora_dir)
    if algorithm == "ddpo":  # the LoRA round trip through stock StableDiffusion3Pipeline.load_lora_weights
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), text_encoder_3=None, tokenizer_3=None)
        assert_stock_pipeline_applies_lora(pipe, result.lora_dir)


@pytest.mark.slow
def test_sd3_resume_continues_exactly(sd3_dir, tmp_path):
    assert_resume_continues_exactly(lambda out, *extra: _overrides(sd3_dir, out, *extra), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["hero", "d3po", "ddpo-binary"])
def test_sd3_runs_every_feedback_algorithm(sd3_dir, tmp_path, algorithm):
    cfg, result = run_feedback_algorithm(lambda out, *extra: _overrides(sd3_dir, out, *extra), tmp_path / algorithm,
                                         algorithm)
    assert_lora_trained(sd3_dir, cfg, result.lora_dir)


def test_hero_reads_a_middle_transformer_block_by_default(sd3):
    from diffalign.algorithms.hero import UNetFeatures

    feats = UNetFeatures(sd3, "", 50)
    assert feats.block == "transformer_blocks.1"
    cond = family_for(sd3).encode(["two red circles"], 1.0)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = feats(z, cond)
    assert out.shape == (3, sd3.transformer.inner_dim) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
