import json
from pathlib import Path

import numpy as np
import pytest

from diffalign.config import load_config
from diffalign.feedback.loop import run_feedback
from diffalign.feedback.store import FeedbackStore
from tests.conftest import tiny_run_overrides


def _cfg(pipe_dir, out, algorithm, *extra):
    return load_config(overrides=tiny_run_overrides(
        pipe_dir, out, f'feedback.algorithm="{algorithm}"', "feedback.rounds=2", "feedback.images_per_round=4",
        "feedback.prompts=['two red circles']", "feedback.simulated_noise_rate=0.5", "feedback.eval_samples=2",
        "hero.embed_steps=3", *extra))


@pytest.mark.parametrize("algorithm", ["hero", "hero-latent-cnn", "d3po", "ddpo-binary"])
def test_simulated_session_runs_and_counts_clicks(tiny_pipe_dir, tmp_path, algorithm):
    out = tmp_path / algorithm
    extra = ['hero.encoder="latent-cnn"'] if algorithm == "hero-latent-cnn" else []
    cfg = _cfg(tiny_pipe_dir, out, algorithm.removesuffix("-latent-cnn"), *extra)
    result = run_feedback(cfg, evaluator="simulated", log=lambda m: None)
    assert result.labels_used == 8  # 2 rounds x 4 images x 1 evaluator: what a person would have clicked
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2] and all("success" in h for h in history)
    assert (result.lora_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "feedback_report.html").is_file() and (out / "rounds" / "round-002.png").is_file()
    rows = (out / "feedback.jsonl").read_text().splitlines()
    assert rows
    store = FeedbackStore(out / "feedback")
    assert len(store.list_runs()) == 1
    # The toy judge's attributes ride along in the image metadata; the report carries the agreement table.
    run_id = store.list_runs()[0]["id"]
    first = store.labeled_rounds(run_id)[0]
    assert set(first.labels) == {"simulated"} and len(first.attributes) == 4
    assert all(set(a) == {"colour", "shape", "count"} for a in first.attributes.values())
    assert "Evaluator agreement" in (out / "feedback_report.html").read_text()
    # Each round's grid in the report is framed by the labels training used (marks.py), with a colour key.
    from PIL import Image

    from diffalign.feedback.marks import BAD, BEST, GOOD
    assert "framed by the label training used" in (out / "feedback_report.html").read_text()
    for k, info in enumerate(store.labeled_rounds(run_id)):
        fb = store.round_feedback(store.find_round(run_id, k).id)
        grid = np.asarray(Image.open(out / "rounds" / f"round-{k + 1:03d}.png").convert("RGB"))
        step = 2 * store.image_info(fb.image_ids[0])["width"] + 4 * 4 + 6  # scale 2, room for frames, gap
        frames = [tuple(grid[13, 6 + i * step + 13]) for i in range(len(fb.good))]  # just above each image
        assert frames == [BEST if i == fb.best_index else GOOD if g else BAD for i, g in enumerate(fb.good)], info


def test_resumed_session_reuses_rounds_and_labels(tiny_pipe_dir, tmp_path):
    out = tmp_path / "hero"
    run_feedback(_cfg(tiny_pipe_dir, out, "hero", "feedback.rounds=1"), evaluator="simulated", log=lambda m: None)
    resumed = run_feedback(_cfg(tiny_pipe_dir, out, "hero"), evaluator="simulated", resume=True, log=lambda m: None)
    assert resumed.labels_used == 8 and [h["round"] for h in resumed.history] == [1, 2]


def test_bad_round_sizes_are_explained(tiny_pipe_dir, tmp_path):
    with pytest.raises(ValueError, match="d3po.group_size"):
        run_feedback(_cfg(tiny_pipe_dir, tmp_path, "d3po", "d3po.group_size=3"), evaluator="simulated")
    with pytest.raises(ValueError, match="--evaluator"):
        run_feedback(_cfg(tiny_pipe_dir, tmp_path, "hero"), evaluator="robot")


def test_round_size_checks_apply_to_the_methods_they_concern(tiny_pipe_dir, tmp_path):
    from diffalign.feedback.loop import _check

    # D3PO trains pairs: its round need not be a multiple of train.batch_size, with or without hero settings.
    _check(_cfg(tiny_pipe_dir, tmp_path, "d3po", "train.batch_size=3", "d3po.group_size=2",
                "sample.batch_size=3", "hero.unlabeled_per_round=5"))
    with pytest.raises(ValueError, match="hero.unlabeled_per_round"):
        _check(_cfg(tiny_pipe_dir, tmp_path, "hero", "hero.unlabeled_per_round=3"))
    with pytest.raises(ValueError, match="train.batch_size"):
        _check(_cfg(tiny_pipe_dir, tmp_path, "ddpo-binary", "train.batch_size=3", "sample.batch_size=3"))


def test_unlabeled_images_are_trained_on_without_costing_labels(tiny_pipe_dir, tmp_path, monkeypatch):
    from diffalign.trainer import Trainer

    trained = []
    train_on = Trainer.train_on

    def spy(self, traj, prepared, epoch):
        trained.append((len(traj), prepared["advantages"].shape[0]))
        return train_on(self, traj, prepared, epoch)
    monkeypatch.setattr(Trainer, "train_on", spy)
    cfg = _cfg(tiny_pipe_dir, tmp_path / "extra", "hero", "feedback.rounds=1", 'hero.encoder="unet-features"',
               "hero.unlabeled_per_round=6", "feedback.simulated_good_threshold=0.0", "train.seed=1")
    result = run_feedback(cfg, evaluator="simulated", log=lambda m: None)
    assert result.labels_used == 4  # the 6 unlabelled images cost no clicks
    assert 0.0 <= result.history[0]["unlabeled_reward_mean"] <= 1.0
    assert 0 < result.history[0]["good"] < 4  # every image passes, half the labels flipped (seeded): a mixed round
    assert trained == [(10, 10)]  # 4 labelled + 6 unlabelled trajectories, one advantage each
    with pytest.raises(ValueError, match="hero.unlabeled_per_round"):
        run_feedback(_cfg(tiny_pipe_dir, tmp_path / "bad", "hero", "hero.unlabeled_per_round=3"), evaluator="simulated")


def test_stop_at_success_ends_the_session_with_a_saved_lora(tiny_pipe_dir, tmp_path):
    out = tmp_path / "stop"
    # Any measured success is >= 0: the session must end after its first measured round, LoRA saved.
    result = run_feedback(_cfg(tiny_pipe_dir, out, "hero", "feedback.rounds=3", "feedback.stop_at_success=0.0"),
                          evaluator="simulated", log=lambda m: None)
    assert [h["round"] for h in result.history] == [1] and result.labels_used == 4
    assert (result.lora_dir / "pytorch_lora_weights.safetensors").is_file()


def _hero_e2e(tmp_path, prompt: str, rounds: int, eval_every: int, *extra) -> tuple[float, list[float], int]:
    """A simulated HERO session with configs/hero_toy.toml on the shipped toy model, one thread (as the runs the
    tests quote), and the base model's success on the same 32 evaluation images: (base, measured successes, labels)."""
    import torch

    from diffalign.evaluate import generate
    from diffalign.metrics import toy_success
    from diffalign.pipeline import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(Path(__file__).parents[1] / "configs" / "hero_toy.toml", overrides=[
            f'output_dir="{tmp_path / "hero"}"', f"feedback.prompts=['{prompt}']", f"feedback.rounds={rounds}",
            "feedback.images_per_round=16", f"feedback.eval_every={eval_every}", "feedback.eval_samples=32",
            "train.seed=0", 'log.tracker="none"', "log.progress=false", *extra])
        result = run_feedback(cfg, evaluator="simulated", log=lambda m: None)
        base = generate(load_pipeline("toy"), [prompt], 32, cfg.eval.seed, cfg.sample.num_steps,
                        cfg.sample.guidance_scale, cfg.sample.eta)
        base_success = toy_success(base.images, base.prompts)[0]
    finally:
        torch.set_num_threads(threads)
    return base_success, [h["success"] for h in result.history if "success" in h], result.labels_used


# The paper's HERO with the PPO clip this test was measured with; the toy config has moved on since.
REFERENCE_HERO = ("hero.encoder='latent-cnn'", "hero.unlabeled_per_round=0", "ddpo.clip_range=1e-4")


@pytest.mark.slow
def test_hero_raises_success_on_an_easy_prompt_with_the_shipped_toy_model(tmp_path):
    """6 rounds of 16 simulated labels (96) on "three red circles", which the base model gets right 81% of the time.

    Measured on 2026-11-24 (reference HERO, seed 0): success on the 32 fixed evaluation images 0.81 -> 0.94 from
    64 labels on (0.84 / 0.94 / 0.94 / 0.94 at 32 / 64 / 96 / 128). The hard prompts are the benchmark's job
    (bench/feedback_efficiency.py).
    """
    base, success, _ = _hero_e2e(tmp_path, "three red circles", 6, 6, *REFERENCE_HERO)
    # 3 of 32 images more than the base (the base leaves 6 to gain; measured +4).
    assert success[-1] >= base + 3 / 32, (base, success)


@pytest.mark.slow
def test_hero_as_the_toy_config_ships_it_learns_the_hard_prompt_fast(tmp_path):
    """8 rounds of 16 simulated labels (128) on "four green triangles" with configs/hero_toy.toml as shipped: the
    frozen-UNet-feature encoder, 48 unlabelled images per round rewarded by it, DDPO clip 1e-3.

    Measured (bench/RESULTS.md, session 5, seed 0, clean labels): 0.34 -> 0.59 / 0.81 at 64 / 128 labels; with
    clip 1e-4 it was 0.47 / 0.56, and the paper's HERO 0.34 / 0.41. The paper's HERO has no test on this prompt:
    at 192 labels it gave 0.375 / 0.375 / 0.344 for seeds 0 / 1 / 2 (base 0.344; bench/RESULTS.md, 2026-11-30),
    an effect within seed noise.
    """
    base, success, labels = _hero_e2e(tmp_path, "four green triangles", 8, 4)
    assert labels == 128  # the unlabelled images cost no clicks
    # 10 of the 32 fixed evaluation images more than the base after 128 labels (measured: +15; with the
    # earlier clip 1e-4, +7, which this would not accept).
    assert success[-1] >= base + 10 / 32, (base, success)


def test_rerun_in_the_same_directory_is_refused_and_eval_and_report_work(tiny_pipe_dir, tmp_path):
    """Issue 17's re-run scenario: the same output directory, another train.seed, no --resume. And the run's
    resolved config is on disk (without the access token), so `diffalign eval` / `report` can read it."""
    from diffalign.evaluate import evaluate_run
    from diffalign.feedback.store import ConflictError
    from diffalign.report import write_report

    out = tmp_path / "rerun"
    small = ("feedback.rounds=1", "eval.samples_per_prompt=1", "eval.prompts=['two red circles']")
    first = run_feedback(_cfg(tiny_pipe_dir, out, "ddpo-binary", *small, 'feedback.token="s3cret-tok"'),
                         evaluator="simulated", log=lambda m: None)
    with pytest.raises(ConflictError, match=r"config: .*train.seed: 0 -> 1.*--resume.*new output_dir"):
        run_feedback(_cfg(tiny_pipe_dir, out, "ddpo-binary", *small, "train.seed=1"), evaluator="simulated",
                     log=lambda m: None)
    store = FeedbackStore(out / "feedback")
    assert store.label_count(store.list_runs()[0]["id"]) == first.labels_used == 4  # nothing new was labelled
    store.close()
    assert load_config(out / "config.toml").feedback.rounds == 1
    for path in (out / "config.toml", out / "feedback" / "feedback.sqlite", out / "feedback.jsonl"):
        assert b"s3cret-tok" not in path.read_bytes(), path
    # The store was closed cleanly: its main file holds everything, the WAL is empty.
    assert not (out / "feedback" / "feedback.sqlite-wal").exists() or \
        (out / "feedback" / "feedback.sqlite-wal").stat().st_size == 0
    result = evaluate_run(out)
    assert "success" in result["tuned"] and (out / "eval.json").is_file()
    assert write_report(out).is_file()
