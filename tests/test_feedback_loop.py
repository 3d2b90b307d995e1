import json

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


@pytest.mark.parametrize("algorithm", ["hero", "d3po", "ddpo-binary"])
def test_simulated_session_runs_and_counts_clicks(tiny_pipe_dir, tmp_path, algorithm):
    out = tmp_path / algorithm
    result = run_feedback(_cfg(tiny_pipe_dir, out, algorithm), evaluator="simulated", log=lambda m: None)
    assert result.labels_used == 8  # 2 rounds x 4 images x 1 evaluator: what a person would have clicked
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2] and all("success" in h for h in history)
    assert (result.lora_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "feedback_report.html").is_file() and (out / "rounds" / "round-002.png").is_file()
    rows = (out / "feedback.jsonl").read_text().splitlines()
    assert rows
    store = FeedbackStore(out / "feedback")
    assert len(store.list_runs()) == 1


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
