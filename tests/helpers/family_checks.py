"""Checks every model family's tests make the same way: a trained LoRA, an exact resume, a feedback run.

``overrides(out, *extra)`` is the test file's own config builder (its tiny pipeline, reward and learning rate)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from diffalign.config import load_config
from diffalign.families import family_for
from diffalign.pipeline import attach_lora, load_pipeline, lora_state_dict


def lora_weights(lora_dir) -> dict[str, torch.Tensor]:
    return load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))


def assert_lora_trained(model_dir, cfg, lora_dir, prefix: str = "transformer.") -> None:
    """The saved LoRA has the keys of a fresh one attached with the run's seed, is finite, and moved."""
    saved = {k.removeprefix(prefix): v for k, v in lora_weights(lora_dir).items()}
    pipe = load_pipeline(str(model_dir))
    torch.manual_seed(cfg.train.seed)
    attach_lora(family_for(pipe).denoiser, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_target_modules)
    initial = lora_state_dict(family_for(pipe).denoiser)
    assert saved.keys() == initial.keys() and saved
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert any(not torch.equal(saved[k], initial[k]) for k in saved), "no LoRA weight changed"


def assert_resume_continues_exactly(overrides, tmp_path, *extra) -> None:
    """Two epochs in one run == one epoch, then a resumed second: bit-identical LoRA and the same reward curve."""
    from diffalign.trainer import train

    full = train(load_config(overrides=overrides(tmp_path / "full", "train.epochs=2", *extra)), log=lambda m: None)
    train(load_config(overrides=overrides(tmp_path / "split", "train.epochs=1", *extra)), log=lambda m: None)
    resumed = train(load_config(overrides=overrides(tmp_path / "split", "train.epochs=2", *extra)), resume=True,
                    log=lambda m: None)
    a, b = lora_weights(full.lora_dir), lora_weights(resumed.lora_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [h["reward_mean"] for h in full.history] == [h["reward_mean"] for h in resumed.history]


def run_feedback_algorithm(overrides, out, algorithm: str):
    """Two simulated rounds of 4 images on one prompt; both rounds recorded. Returns (cfg, result)."""
    from diffalign.feedback.loop import run_feedback

    cfg = load_config(overrides=overrides(
        out, f'feedback.algorithm="{algorithm}"', "feedback.rounds=2", "feedback.images_per_round=4",
        "feedback.prompts=['two red circles']", "feedback.simulated_noise_rate=0.5", "feedback.eval_samples=2",
        "hero.embed_steps=3"))
    result = run_feedback(cfg, evaluator="simulated", log=lambda m: None)
    assert result.labels_used == 8
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2]
    return cfg, result


def assert_stock_pipeline_applies_lora(pipe, lora_dir, **call) -> None:
    """The saved LoRA, loaded by the stock pipeline's own ``load_lora_weights``, changes its images, and
    ``disable_lora`` gives the original images back (the ecosystem round trip)."""
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("two red circles", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **call).images

    before = image()
    pipe.load_lora_weights(str(lora_dir))
    assert (image() - before).abs().max() > 1e-4  # the LoRA is applied
    pipe.disable_lora()
    torch.testing.assert_close(image(), before)
