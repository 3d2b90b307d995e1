"""The FLUX.1 family (families/flux.py on flowmatch.py) on tiny random FluxPipelines built here (FLUX.1-dev-like
with the guidance embedding, -schnell-like without): the sampler against the stock pipeline (packed latents,
embedded guidance, the pipeline's sigma grid), one transformer row per sample (no CFG batch), the SDE step's
log-probability against a direct Gaussian, every algorithm for one short run, resume, and the LoRA round trip."""

import numpy as np
import pytest
import torch

from diffalign.config import load_config
from diffalign.families import Conditioning, FluxFamily, family_for
from diffalign.pipeline import load_pipeline
from diffalign.sampling import sample_trajectories
from tests.conftest import tiny_run_overrides
from tests.helpers.family_checks import (
    assert_lora_trained,
    assert_resume_continues_exactly,
    assert_stock_pipeline_applies_lora,
    run_feedback_algorithm,
)
from tests.helpers.tiny_flow import T5_TOKENS, build_flux_pipeline

BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'
PROMPTS = ["two red circles", "a blue square above a green circle"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux") / "pipe"
    build_flux_pipeline(path)
    return path


@pytest.fixture(scope="module")
def flux(flux_dir):
    return load_pipeline(str(flux_dir))


def _stock(pipe, guidance_scale, steps=4, seed=7):
    # 16 px and 16 T5 tokens: what the family reads from the VAE config and the T5 tokenizer (FLUX.1: 1024, 512,
    # the pipeline's defaults).
    return pipe(PROMPTS, height=16, width=16, max_sequence_length=T5_TOKENS, num_inference_steps=steps,
                guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed), output_type="pt").images


def _rows_per_call(pipe):
    rows = []
    handle = pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: rows.append(
        kwargs["hidden_states"].shape[0]), with_kwargs=True)
    return rows, handle


def test_flux_dev_samples_as_the_stock_pipeline_without_noise_one_row_per_sample(flux):
    family = family_for(flux)
    assert isinstance(family, FluxFamily) and not flux.transformer.training
    assert family.latent_shape(2) == (2, 4, 16, 16)  # unpacked: C = in_channels / 4, 16 px VAE with factor 1
    ref = _stock(flux, 3.5)
    rows, handle = _rows_per_call(flux)
    try:
        traj = sample_trajectories(flux, PROMPTS, num_steps=4, guidance_scale=3.5, eta=0.0,
                                   generator=torch.Generator().manual_seed(7))
    finally:
        handle.remove()
    torch.testing.assert_close(traj.images, ref, rtol=0, atol=1e-6)
    assert rows == [2] * 4  # no CFG batch: one transformer row per sample and step
    assert traj.negative_embeds is None and set(traj.extra_cond) == {"pooled", "guidance"}
    assert torch.equal(traj.extra_cond["guidance"], torch.full((2,), 3.5))
    assert traj.prompt_embeds.shape == (2, T5_TOKENS, flux.transformer.config.joint_attention_dim)
    assert torch.equal(traj.guided_eps, traj.cond_eps)  # the one prediction is both
    assert traj.latents.shape == (2, 5, 4, 16, 16)  # trajectories stay unpacked
    assert torch.isnan(traj.log_probs).all()
    # The embedded guidance is an input: another scale, other images (and the stock pipeline agrees).
    other = sample_trajectories(flux, PROMPTS, num_steps=4, guidance_scale=1.0, eta=0.0,
                                generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(other.images, _stock(flux, 1.0), rtol=0, atol=1e-6)
    assert (other.images - ref).abs().max() > 1e-3
    noisy = sample_trajectories(flux, PROMPTS, num_steps=4, guidance_scale=3.5, eta=0.7,
                                generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(noisy.log_probs).all() and (noisy.images - ref).abs().max() > 1e-3


def test_flux_grid_is_the_pipelines_linspace_shifted_by_the_token_count(flux):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    family = family_for(flux)
    family.set_timesteps(6, "cpu")
    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)  # 16x16 latents -> 8x8 = 64 packed tokens
    base = np.linspace(1.0, 1 / 6, 6)
    shifted = np.exp(mu) / (np.exp(mu) + (1 / base - 1))  # the scheduler's exponential time shift
    np.testing.assert_allclose(flux.scheduler.sigmas[:-1].numpy(), shifted, rtol=1e-5)
    assert flux.scheduler.sigmas[-1] == 0
    # Not the scheduler's own grid (linspace(1, 1/1000)): the last sigma is FLUX's 1/N, shifted.
    flux.scheduler.set_timesteps(6, mu=mu)
    assert not torch.allclose(flux.scheduler.sigmas[-2], torch.tensor(float(shifted[-1])))


def test_the_conditional_prediction_is_the_prediction_with_the_sampled_guidance(flux):
    family = family_for(flux)
    family.set_timesteps(4, "cpu")
    cond = family.encode(PROMPTS, 3.5)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = flux.scheduler.timesteps[1]
    guided, conditional = family.guided_and_conditional(flux.transformer, x, t, cond, 3.5)
    assert guided is conditional
    # DAG's "current" x0_hat and HERO call conditional(), which passes scale 1: the stored 3.5 still applies.
    torch.testing.assert_close(family.conditional(flux.transformer, x, t, cond), guided)
    at_one = family.guided_and_conditional(flux.transformer, x, t, family.encode(PROMPTS, 1.0), 1.0)[0]
    assert (at_one - guided).abs().max() > 1e-4
    # Per-sample timesteps (training re-evaluates shuffled steps) give each row its own prediction.
    per_row = family.guided_and_conditional(flux.transformer, x, torch.full((2,), float(t)), cond, 3.5)[0]
    torch.testing.assert_close(per_row, guided)
    with pytest.raises(ValueError, match="carries none"):
        family.guided_and_conditional(flux.transformer, x, t, Conditioning(cond.prompt_embeds, None,
                                                                            {"pooled": cond.extra["pooled"]}), 3.5)


def test_flux_schnell_has_no_guidance_input_and_matches_its_stock_pipeline(tmp_path):
    build_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    pipe = load_pipeline(str(tmp_path / "schnell"))
    family = family_for(pipe)
    assert "guidance" not in family.encode(PROMPTS, 3.5).extra
    traj = sample_trajectories(pipe, PROMPTS, num_steps=3, guidance_scale=3.5, eta=0.0,
                               generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(traj.images, _stock(pipe, 0.0, steps=3), rtol=0, atol=1e-6)


def test_sde_step_log_prob_is_the_gaussian_of_the_reference_formula(flux):
    family = family_for(flux)
    family.set_timesteps(5, "cpu")
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    sigmas, a = flux.scheduler.sigmas, 0.7
    for k in (0, 2, 4):  # s = 1 (the guarded denominator), a middle step, the last step (s' = 0)
        s, s_next = sigmas[k], sigmas[k + 1]
        s_safe = sigmas[1] if s >= 1 else s
        g_s = a * (s_safe / (1 - s_safe)).sqrt()
        dt = s_next - s
        mean = x + (v + g_s**2 / (2 * s) * (x + (1 - s) * v)) * dt
        nxt, lp = family.step(v, flux.scheduler.timesteps[k], x, eta=a, generator=torch.Generator().manual_seed(k),
                              reduction="sum")
        direct = torch.distributions.Normal(mean, g_s * (-dt).sqrt()).log_prob(nxt).sum((1, 2, 3))
        torch.testing.assert_close(lp, direct, rtol=1e-5, atol=1e-3)


def _overrides(flux_dir, out, *extra):
    return tiny_run_overrides(flux_dir, out, BRIGHT, "sample.eta=0.7", "sample.guidance_scale=3.5",
                              "train.learning_rate=1e-2", *extra)


# DAG-KL's extra cost is the flow network, not the family (its SD3 run is in the fast suite): slow here.
@pytest.mark.parametrize("algorithm", ["ddpo", "dag-db", pytest.param("dag-kl", marks=pytest.mark.slow), "grpo"])
def test_flux_trains_every_sampled_algorithm(flux_dir, tmp_path, algorithm):
    from diffalign.trainer import train

    extra = ["sample.same_prompt_per_batch=true", "grpo.kl_weight=0.04"] if algorithm == "grpo" else []
    cfg = load_config(overrides=_overrides(flux_dir, tmp_path / "run", f'train.algorithm="{algorithm}"',
                                           "train.epochs=1", *extra))
    result = train(cfg, log=lambda m: None)
    metrics = result.history[-1]
    losses = [v for k, v in metrics.items() if k.startswith("train/") and k.endswith("loss")]
    assert losses and all(np.isfinite(v) for v in losses)
    if algorithm == "grpo":
        assert metrics["train/kl"] >= 0
    assert_lora_trained(flux_dir, cfg, result.lora_dir)
    if algorithm == "ddpo":  # the LoRA round trip through stock FluxPipeline.load_lora_weights
        from diffusers import FluxPipeline

        assert_stock_pipeline_applies_lora(FluxPipeline.from_pretrained(str(flux_dir)), result.lora_dir, height=16,
                                           width=16, max_sequence_length=T5_TOKENS)


@pytest.mark.slow
def test_flux_resume_continues_exactly(flux_dir, tmp_path):
    assert_resume_continues_exactly(lambda out, *extra: _overrides(flux_dir, out, *extra), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["hero", "d3po", "ddpo-binary"])
def test_flux_runs_every_feedback_algorithm(flux_dir, tmp_path, algorithm):
    cfg, result = run_feedback_algorithm(lambda out, *extra: _overrides(flux_dir, out, *extra), tmp_path / algorithm,
                                         algorithm)
    assert_lora_trained(flux_dir, cfg, result.lora_dir)


def test_hero_reads_the_block_at_half_the_transformers_depth(flux):
    from diffalign.algorithms.hero import UNetFeatures

    feats = UNetFeatures(flux, "", 50)
    assert feats.block == "single_transformer_blocks.0"  # 1 double + 2 single blocks: depth 1 of 3
    cond = family_for(flux).encode(["two red circles"], 3.5)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = feats(z, cond)
    assert out.shape == (3, flux.transformer.inner_dim) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    # It is that block's image tokens: a hook on the block sees 64 of them per image (8x8 packed patches).
    seen = []
    handle = flux.transformer.get_submodule(feats.block).register_forward_hook(
        lambda m, a, o: seen.append(o[1].shape))
    try:
        feats(z[:1], cond)
    finally:
        handle.remove()
    assert seen == [torch.Size([1, 64, flux.transformer.inner_dim])]
