"""Model families (families/): the SDXL family end to end, SD 2.x v-prediction, and the refusal of a pipeline
class no family drives. Tiny random pipelines built here (tests/helpers/tiny_families.py)."""

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import load_config
from diffalign.families import StableDiffusionXLFamily, family_for
from diffalign.pipeline import ModelLoadError, attach_lora, load_pipeline, lora_state_dict
from diffalign.sampling import sample_trajectories
from tests.conftest import tiny_run_overrides
from tests.helpers.family_checks import assert_stock_pipeline_applies_lora
from tests.helpers.tiny_flow import build_sd3_pipeline

BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'


def _initial_lora(pipe_dir, cfg):
    """The LoRA the trainer starts from (it seeds with train.seed right before attaching)."""
    pipe = load_pipeline(str(pipe_dir))
    torch.manual_seed(cfg.train.seed)
    attach_lora(family_for(pipe).denoiser, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_target_modules)
    return lora_state_dict(family_for(pipe).denoiser)


def _assert_lora_trained(pipe_dir, cfg, lora_dir):
    saved = {k.removeprefix("unet."): v for k, v in load_file(str(lora_dir / "pytorch_lora_weights.safetensors")).items()}
    initial = _initial_lora(pipe_dir, cfg)
    assert saved.keys() == initial.keys() and saved
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert any(not torch.equal(saved[k], initial[k]) for k in saved), "no LoRA weight changed"


def test_unsupported_pipeline_class_is_refused_naming_it(tmp_path):
    # A healthy directory of a class no family drives: the SD3 pipeline's files under another class name, as a
    # PixArt-Sigma directory would name itself.
    build_sd3_pipeline(tmp_path / "pixart")
    index = json.loads((tmp_path / "pixart" / "model_index.json").read_text())
    (tmp_path / "pixart" / "model_index.json").write_text(json.dumps(index | {"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(tmp_path / "pixart"))
    msg = str(err.value)
    assert "PixArtSigmaPipeline" in msg and "StableDiffusionXLPipeline" in msg and "FluxPipeline" in msg
    assert "damaged" not in msg


def test_sdxl_loads_as_its_family(sdxl_dir):
    pipe = load_pipeline(str(sdxl_dir))
    family = family_for(pipe)
    assert isinstance(family, StableDiffusionXLFamily)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert not any(p.requires_grad for m in family.frozen_modules() + [family.denoiser] for p in m.parameters())
    # SDXL checkpoints ship an EulerDiscreteScheduler, whose config has no clip_sample: the DDIM made from it
    # must not inherit DDIM's default clip_sample=True (it would clip the latent x0 to [-1, 1]).
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1)
    family.prepare("sdxl")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is False


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_sdxl_sampler_equals_stock_pipeline(sdxl_dir, eta):
    pipe = load_pipeline(str(sdxl_dir))
    prompts = ["two red circles", "a blue square above a green circle"]
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=4.0, eta=eta,
               generator=torch.Generator().manual_seed(7), output_type="pt").images
    traj = sample_trajectories(pipe, prompts, num_steps=4, guidance_scale=4.0, eta=eta,
                               generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(traj.images, ref, rtol=0, atol=1e-5)
    assert set(traj.extra_cond) == {"text_embeds", "negative_text_embeds", "time_ids"}
    assert traj.extra_cond["time_ids"].shape == (2, 6)
    # Re-scoring a stored step through the Policy (the training path, with the extra conditioning in the
    # Transition) reproduces the sampling-time log-prob.
    from diffalign.algorithms.base import Policy
    from diffalign.trainer import _transition

    policy = Policy(pipe.unet, pipe.scheduler, 4.0, eta, "mean", contextlib.nullcontext,
                    family=family_for(pipe))
    rows, k = torch.tensor([0, 1]), torch.tensor([2, 2])
    with torch.no_grad():
        lp, _ = policy.log_prob(_transition(traj, rows, k, "cpu"))
    torch.testing.assert_close(lp, traj.log_probs[:, 2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["dag-db", "dag-kl"])
def test_sdxl_trains_every_sampled_algorithm(sdxl_dir, tmp_path, algorithm):
    """One epoch each; their resume is checked in the slow parametrisations below (ddpo's in the fast suite)."""
    from diffalign.trainer import train

    cfg = load_config(overrides=tiny_run_overrides(sdxl_dir, tmp_path / "run", BRIGHT, f'train.algorithm="{algorithm}"',
                                                   "train.epochs=1", "train.learning_rate=1e-2"))
    result = train(cfg, log=lambda m: None)
    losses = [v for k, v in result.history[-1].items() if k.startswith("train/") and k.endswith("loss")]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    _assert_lora_trained(sdxl_dir, cfg, result.lora_dir)


@pytest.mark.parametrize("algorithm", ["ddpo", pytest.param("dag-db", marks=pytest.mark.slow),
                                       pytest.param("dag-kl", marks=pytest.mark.slow)])
def test_sdxl_trains_and_resumes_every_sampled_algorithm(sdxl_dir, tmp_path, algorithm):
    from diffalign.trainer import train

    def cfg(out, epochs):
        return load_config(overrides=tiny_run_overrides(sdxl_dir, out, BRIGHT, f'train.algorithm="{algorithm}"',
                                                        f"train.epochs={epochs}", "train.learning_rate=1e-2"))

    first = train(cfg(tmp_path / "split", 1), log=lambda m: None)
    losses = [v for k, v in first.history[-1].items() if k.startswith("train/") and k.endswith("loss")]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    _assert_lora_trained(sdxl_dir, cfg(tmp_path / "split", 1), first.lora_dir)
    # Stopped after epoch 1 and resumed to 2 = the uninterrupted 2-epoch run (LoRA, optimizer, flow network,
    # sampling generators and the SDXL conditioning all come back from the checkpoint).
    resumed = train(cfg(tmp_path / "split", 2), resume=True, log=lambda m: None)
    full = train(cfg(tmp_path / "full", 2), log=lambda m: None)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert [h["reward_mean"] for h in resumed.history] == [h["reward_mean"] for h in full.history]
    a = load_file(str(full.lora_dir / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed.lora_dir / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if algorithm == "ddpo":  # the LoRA round trip through the family's stock pipeline
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), add_watermarker=False)
        assert_stock_pipeline_applies_lora(pipe, full.lora_dir)


@pytest.mark.parametrize("algorithm", ["hero", "d3po", "ddpo-binary"])
def test_sdxl_runs_and_resumes_every_feedback_algorithm(sdxl_dir, tmp_path, algorithm):
    from diffalign.feedback.loop import run_feedback

    out = tmp_path / algorithm

    def cfg(rounds):
        return load_config(overrides=tiny_run_overrides(
            sdxl_dir, out, f'feedback.algorithm="{algorithm}"', f"feedback.rounds={rounds}",
            "feedback.images_per_round=4", "feedback.prompts=['two red circles']", "feedback.simulated_noise_rate=0.5",
            "feedback.eval_samples=2", "hero.embed_steps=3", "train.learning_rate=1e-2"))

    first = run_feedback(cfg(1), evaluator="simulated", log=lambda m: None)
    assert first.labels_used == 4
    result = run_feedback(cfg(2), evaluator="simulated", resume=True, log=lambda m: None)
    assert result.labels_used == 8  # round 1's labels reused, round 2's new
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2]
    _assert_lora_trained(sdxl_dir, cfg(2), result.lora_dir)


def test_v_prediction_sampler_x0_hat_and_backward_kernel(vpred_dir, tiny_pipe):
    pipe = load_pipeline(str(vpred_dir))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    prompts = ["two red circles", "three blue squares"]
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=4.0, eta=1.0,
               generator=torch.Generator().manual_seed(3), output_type="pt").images
    traj = sample_trajectories(pipe, prompts, num_steps=4, guidance_scale=4.0, eta=1.0,
                               generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(traj.images, ref, rtol=0, atol=1e-6)
    # DAG's x0_hat from a v-prediction: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, v = sqrt(abar) eps - sqrt(1 - abar) x0.
    from diffalign.algorithms.dag import DAG

    cfg = load_config(overrides=['train.algorithm="dag-kl"'])
    family = DAG(cfg, pipe, "kl").family
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = pipe.scheduler.timesteps[1]
    a = pipe.scheduler.alphas_cumprod[t]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(family.x0_hat(v, t, xt), x0, rtol=1e-4, atol=1e-4)
    tiny_pipe.scheduler.set_timesteps(4)
    eps_family = family_for(tiny_pipe)  # same schedule, epsilon prediction
    assert eps_family.x0_hat(v, t, xt).sub(x0).abs().max() > 0.1  # the prediction type matters for x0_hat ...
    # ... and not for the backward kernel, the strided chain's forward noising N(sqrt(a) x_t', (1 - a) I),
    # a = abar_t / abar_t': a property of the noise schedule only.
    x_next = traj.latents[:, 2]
    t_prev = t - pipe.scheduler.config.num_train_timesteps // pipe.scheduler.num_inference_steps
    ratio = a / pipe.scheduler.alphas_cumprod[t_prev]
    direct = torch.distributions.Normal(ratio.sqrt() * x_next, (1 - ratio).sqrt()).log_prob(traj.latents[:, 1]).sum((1, 2, 3))
    torch.testing.assert_close(family.backward_log_prob(traj.latents[:, 1], x_next, t, "sum"), direct,
                               rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("algorithm", ["ddpo", "dag-db", "dag-kl"])
def test_v_prediction_trains(vpred_dir, tmp_path, algorithm):
    from diffalign.trainer import train

    cfg = load_config(overrides=tiny_run_overrides(vpred_dir, tmp_path / "run", BRIGHT, f'train.algorithm="{algorithm}"',
                                                   "train.epochs=1", "train.learning_rate=1e-2"))
    result = train(cfg, log=lambda m: None)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result.history[-1].items() if k.endswith("loss"))
    _assert_lora_trained(vpred_dir, cfg, result.lora_dir)
