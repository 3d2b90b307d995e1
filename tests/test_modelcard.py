import json
import re

import numpy as np
import tomllib
from huggingface_hub import ModelCard

from diffalign.config import dump_config, load_config
from diffalign.feedback.store import FeedbackStore
from diffalign.modelcard import redact, write_model_card

SECRET = "Bearer s3cr3t-value"
HTTP = ('reward.terms=[{name="http", args={url="https://user:pw@scores.example/score?key=abc", '
        'headers={Authorization="Bearer s3cr3t-value"}}}, {name="jpeg_compressibility", weight=0.5}]')


def _run(tmp_path, *overrides, history=(), evaluation=None):
    run = tmp_path / "myrun"
    (run / "lora").mkdir(parents=True)
    cfg = load_config(overrides=[f'output_dir="{run}"', 'model.id="org/base-model"', 'model.revision="abc123"',
                                 *overrides])
    dump_config(cfg, run / "config.toml")
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    if evaluation:
        (run / "eval.json").write_text(json.dumps(evaluation))
    return run, cfg


def _card(run):
    text = (run / "lora" / "README.md").read_text()
    return text, ModelCard.load(run / "lora" / "README.md")


def test_card_metadata_sections_and_no_secrets(tmp_path):
    history = [
        {"epoch": 1, "trajectories": 16, "optimizer_steps": 2, "reward_mean": -2.1},
        {"epoch": 2, "trajectories": 32, "optimizer_steps": 4, "reward_mean": -1.9, "guard/tripped": 1,
         "guard/diversity": 3.0, "guard/diversity_base": 7.0, "guard/drift": 0.2,
         "guard/alarms": ["guard 'diversity' tripped at epoch 2: 3.0000 < limit 3.5000 (base model 7.0000)"]},
    ]
    evaluation = {"base": {"reward_mean": -2.2, "success": 0.5, "diversity": 7.0},
                  "tuned": {"reward_mean": -1.8, "success": 0.25, "diversity": 3.1},
                  "drift": 0.21, "num_images": 64, "prompts": "hard_counting"}
    run, cfg = _run(tmp_path, HTTP, "guards.every=2", 'guards.action="stop"', 'feedback.token="tok-123"',
                    history=history, evaluation=evaluation)
    write_model_card(run)
    text, card = _card(run)
    assert card.data.base_model == "org/base-model" and card.data.library_name == "diffusers"
    assert card.data.license == "other" and card.data.base_model_relation == "adapter"
    assert {"lora", "ddpo", "jpeg_compressibility", "text-to-image"} <= set(card.data.tags)
    assert "s3cr3t" not in text and "tok-123" not in text and "user:pw" not in text and "key=abc" not in text
    assert "revision abc123" in text and "**ddpo**" in text
    assert "| jpeg_compressibility | 0.5 |" in text
    assert "guard 'diversity' tripped at epoch 2: 3.0000 < limit 3.5000" in text
    assert "ended early by its guards (stop)" in text
    assert "| success | 0.5000 | 0.2500 |" in text and "| drift from base (RMS pixel) |  | 0.2100 |" in text
    assert "diffalign train --config config.toml" in text
    # The embedded configuration is the run's, minus the secrets, and loads as a config again.
    toml_text = re.search(r"```toml\n(.*?)\n```", text, re.S).group(1)
    data = tomllib.loads(toml_text)
    assert data["reward"]["terms"][0]["args"]["headers"] == "<redacted>"
    again = load_config(overrides=[])
    again = again.model_validate(data)
    assert again.train == cfg.train and again.guards == cfg.guards and again.model == cfg.model


def test_card_of_a_local_model_has_no_base_model_and_says_eval_is_pending(tmp_path):
    run, _ = _run(tmp_path, f'model.id="{tmp_path}"')
    write_model_card(run)
    text, card = _card(run)
    assert card.data.base_model is None and card.data.library_name == "diffusers"
    assert "Not run yet: `diffalign eval <run>`" in text


def test_feedback_card_lists_labels_and_evaluators(tmp_path):
    history = [{"round": r + 1, "prompt": "three red circles", "good": 2, "labels_used": 4 * (r + 1),
                "trajectories": 4 * (r + 1)} for r in range(2)]
    run, _ = _run(tmp_path, 'feedback.algorithm="hero"', "feedback.rounds=2", "feedback.images_per_round=4",
                  history=history)
    store = FeedbackStore(run / "feedback")
    run_id = store.create_run("myrun", {})
    rng = np.random.default_rng(0)
    for r, who in enumerate(["alice", "bob"]):
        info = store.create_round(run_id, r, "three red circles", list(rng.integers(0, 255, (4, 8, 8, 3), np.uint8)))
        store.submit(info.id, who, {i: "bad" for i in info.image_ids}, None)
    store.close()
    write_model_card(run)
    text, card = _card(run)
    assert "human-feedback" in card.data.tags and "hero" in card.data.tags
    assert "labels used: 8" in text and "Evaluators (labels given): alice (4), bob (4)." in text
    assert "diffalign feedback --config config.toml" in text


def test_redact_keeps_ordinary_values():
    data = {"url": "http://localhost:8000/score", "headers": {}, "weight": 1.0, "api_key": "k", "nested": [{"token": "t"}]}
    assert redact(data) == {"url": "http://localhost:8000/score", "headers": {}, "weight": 1.0, "api_key": "<redacted>",
                            "nested": [{"token": "<redacted>"}]}
