"""Model families through the user's entry points: the CLI (train, resume, eval, report, sample) on SDXL,
every algorithm on the SD 2.x v-prediction pipeline, and SDXL on two accelerate processes. The library-level
SDXL checks (sampler = stock pipeline, every algorithm trains and resumes, the LoRA round trip) are in
tests/test_families.py."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.config import load_config
from tests.conftest import tiny_run_overrides
from tests.test_families import _assert_lora_trained
from tests.test_multiprocess import _launch, _metrics, _sync_checks

BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'
runner = CliRunner()


def _sets(*items):
    return [x for item in items for x in ("--set", item)]


def test_sdxl_cli_train_resume_eval_report_sample(sdxl_dir, tmp_path):
    run = tmp_path / "run"

    def overrides(epochs):
        return tiny_run_overrides(sdxl_dir, run, BRIGHT, f"train.epochs={epochs}", "train.learning_rate=5e-2",
                                  "eval.prompts=['two red circles']", "eval.samples_per_prompt=2")

    result = runner.invoke(app, ["train", *_sets(*overrides(1))])
    assert result.exit_code == 0, result.output
    epoch1 = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    result = runner.invoke(app, ["train", "--resume", *_sets(*overrides(2))])
    assert result.exit_code == 0, result.output
    assert [m["epoch"] for m in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    epoch2 = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(epoch1[k], epoch2[k]) for k in epoch1), "the resumed epoch trained nothing"
    # eval loads the run's LoRA with the stock StableDiffusionXLPipeline.load_lora_weights and compares
    # base and tuned images from the same noise: a trained LoRA moves them.
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["num_images"] == 2 and evaluation["drift"] > 0
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    html = (run / "report.html").read_text()
    assert "Before vs after" in html and "data:image/png;base64," in html
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", "--run", str(run), "-p", "two red circles", "--n", "2", "--steps", "3",
                                 "--out", str(grid)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(grid).size[0] >= 2 * 64  # two 64 px SDXL images side by side


def test_sdxl_by_hub_id_from_the_offline_cache(sdxl_dir, tmp_path, monkeypatch):
    """model.id as a hub id takes the real hub path (model_index.json first, then from_pretrained(id)); the
    hub cache is filled here with the tiny pipeline, in the layout huggingface_hub writes, and read offline."""
    import shutil

    import huggingface_hub.constants

    from diffalign.families import StableDiffusionXLFamily, family_for
    from diffalign.pipeline import load_pipeline
    from diffalign.sampling import sample_trajectories

    repo = tmp_path / "hub" / "models--diffalign-tests--tiny-sdxl"
    revision = "0" * 40
    shutil.copytree(sdxl_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipe = load_pipeline("diffalign-tests/tiny-sdxl")
    assert isinstance(family_for(pipe), StableDiffusionXLFamily) and type(pipe.scheduler).__name__ == "DDIMScheduler"

    def images(p):
        return sample_trajectories(p, ["two red circles"], 2, 4.0, 1.0, generator=torch.Generator().manual_seed(0)).images

    torch.testing.assert_close(images(pipe), images(load_pipeline(str(sdxl_dir))), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dag-db"])
def test_v_prediction_trains_and_resumes(vpred_dir, tmp_path, algorithm):
    """One epoch of each sampled algorithm on v-prediction is in tests/test_families.py; here a resume (DAG:
    the flow network's state too) equals the uninterrupted run."""
    from diffalign.trainer import train

    def cfg(out, epochs):
        return load_config(overrides=tiny_run_overrides(vpred_dir, out, BRIGHT, f'train.algorithm="{algorithm}"',
                                                        f"train.epochs={epochs}", "train.learning_rate=1e-2"))

    train(cfg(tmp_path / "split", 1), log=lambda m: None)
    resumed = train(cfg(tmp_path / "split", 2), resume=True, log=lambda m: None)
    full = train(cfg(tmp_path / "full", 2), log=lambda m: None)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in resumed.history[-1].items() if k.endswith("loss"))
    a = load_file(str(full.lora_dir / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed.lora_dir / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algorithm", ["d3po", pytest.param("hero", marks=pytest.mark.slow),
                                       pytest.param("ddpo-binary", marks=pytest.mark.slow)])
def test_v_prediction_runs_feedback_algorithms(vpred_dir, tmp_path, algorithm):
    from diffalign.feedback.loop import run_feedback
    from diffalign.pipeline import load_pipeline

    out = tmp_path / algorithm
    cfg = load_config(overrides=tiny_run_overrides(
        vpred_dir, out, f'feedback.algorithm="{algorithm}"', "feedback.rounds=1", "feedback.images_per_round=4",
        "feedback.prompts=['two red circles']", "feedback.eval_samples=2",
        # A random model's images are never a toy success, and a round of one label trains nothing (no good
        # image for HERO, no pair for D3PO, no reward spread for DDPO-binary): every image good by the judge's
        # partial score, then this seed's noise flips 3 of the 4 (measured), a mixed round.
        "feedback.simulated_good_threshold=0.0", "feedback.simulated_noise_rate=0.9", "hero.embed_steps=3", "train.learning_rate=1e-2"))
    result = run_feedback(cfg, evaluator="simulated", log=lambda m: None)
    assert result.labels_used == 4 and result.history[-1]["good"] == 1
    assert torch.isfinite(torch.tensor(result.history[-1]["train/grad_norm"]))
    _assert_lora_trained(vpred_dir, cfg, result.lora_dir)
    # The stock pipeline (v-prediction scheduler) applies the saved LoRA and its images change.
    pipe = load_pipeline(str(vpred_dir))

    def image():
        return pipe("two red circles", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    before = image()
    pipe.load_lora_weights(str(result.lora_dir))
    assert (image() - before).abs().max() > 1e-4


@pytest.mark.slow
def test_sdxl_on_two_processes_stays_in_sync(sdxl_dir, tmp_path):
    """DAG-KL (the flow network beside the LoRA) and HERO (its encoder, and the SDXL conditioning gathered
    across processes into one round) on 2 processes: every optimizer step leaves both with identical weights."""
    run = tmp_path / "dag-kl"
    _launch(2, ["train"], tiny_run_overrides(sdxl_dir, run, BRIGHT, 'train.algorithm="dag-kl"', "train.epochs=1",
                                             "train.learning_rate=1e-2"))
    history, checks = _metrics(run), _sync_checks(run)
    assert history[-1]["trajectories"] == 8 and len(checks) == history[-1]["optimizer_steps"] == 2
    assert all(c["processes"] == 2 for c in checks) and (run / "flow.safetensors").is_file()
    run = tmp_path / "hero"
    proc = _launch(2, ["feedback", "--evaluator", "simulated"], tiny_run_overrides(
        sdxl_dir, run, 'feedback.algorithm="hero"', "feedback.rounds=1", "feedback.images_per_round=8",
        "feedback.prompts=['two red circles']", "feedback.simulated_noise_rate=0.5", "feedback.eval_samples=2",
        "hero.embed_steps=3", "train.learning_rate=1e-2"))
    assert "8 labels used" in proc.stdout  # one round holds both processes' images
    checks = _sync_checks(run)
    assert any(c["where"].startswith("HERO encoder") for c in checks) and all(c["processes"] == 2 for c in checks)
