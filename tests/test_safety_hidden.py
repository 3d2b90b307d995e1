"""The safety filter between generation and people: flagged images never reach the labeling page or a report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from diffalign.config import load_config
from diffalign.feedback.loop import run_feedback
from diffalign.feedback.server import create_app
from diffalign.feedback.store import FeedbackError, FeedbackStore
from diffalign.safety import hide
from tests.conftest import tiny_run_overrides

EVERY_OTHER = ['safety.filter="python"', 'safety.args={function="tests.helpers.user_rewards:every_other"}']


def test_a_flagged_round_image_is_not_served_and_counts_as_bad(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    with FeedbackStore(tmp_path / "s") as store:
        run = store.create_run("r")
        info = store.create_round(run, 0, "two red circles", images,
                                  image_metadata=[{"flagged": "toy_red_objects: score 1.00 >= 0.5"}, {}, {}])
        hidden, shown = info.image_ids[0], info.image_ids[1]
        c = TestClient(create_app(store), raise_server_exceptions=False)
        data = c.get(f"/api/rounds/{info.id}").json()
        assert data["flagged"] == 1
        first = data["images"][0]
        assert first["url"] is None and first["flagged"] and "toy_red_objects" in first["flag_reason"]
        assert c.get(f"/api/images/{hidden}.png").status_code == 403
        assert c.get(f"/api/images/{shown}.png").status_code == 200
        # The evaluator labels what they saw; the hidden image is bad without being sent, and cannot be good.
        ok = c.post(f"/api/rounds/{info.id}/submissions", json={
            "evaluator": "ivy", "labels": {str(shown): "good", str(info.image_ids[2]): "bad"}, "best_image_id": shown})
        assert ok.status_code == 200, ok.text
        assert store.round_feedback(info.id).good == [False, True, False]
        with pytest.raises(FeedbackError, match=f"labels: image {hidden} was hidden by the safety filter"):
            store.submit(info.id, "jay", {hidden: "good", shown: "bad", info.image_ids[2]: "bad"}, hidden)


def test_flagged_images_never_reach_the_labeling_page_in_a_session(tiny_pipe_dir, tmp_path):
    out = tmp_path / "fb"
    cfg = load_config(overrides=tiny_run_overrides(
        tiny_pipe_dir, out, 'feedback.algorithm="ddpo-binary"', "feedback.rounds=2", "feedback.images_per_round=4",
        "feedback.prompts=['two red circles']", "feedback.eval_every=0", *EVERY_OTHER))
    run_feedback(cfg, evaluator="simulated", log=lambda m: None)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["safety_flagged"] for h in history] == [2, 2]  # counted per round
    with FeedbackStore(out / "feedback") as store:
        run_id = store.list_runs()[0]["id"]
        rounds = store.run_summary(run_id)["rounds"]
        assert [r["flagged"] for r in rounds] == [2, 2]
        c = TestClient(create_app(store), raise_server_exceptions=False)
        for r in rounds:
            page = c.get(f"/api/rounds/{r['id']}").json()
            flagged = [im for im in page["images"] if im["flagged"]]
            assert [im["position"] for im in flagged] == [0, 2]
            for im in flagged:
                assert im["url"] is None and c.get(f"/api/images/{im['id']}.png").status_code == 403
                assert "every_other" in im["flag_reason"] or "python" in im["flag_reason"]
            labels = store.submissions(r["id"])[0]["labels"]  # the simulated evaluator: bad, unseen
            assert [labels[im["id"]] for im in flagged] == ["bad", "bad"]
            # The round's grid on disk (what the feedback report embeds) has the flagged images hidden.
            grid = np.asarray(Image.open(out / "rounds" / f"round-{r['iteration'] + 1:03d}.png").convert("RGB"))
            original = store.load_image(flagged[0]["id"])
            h, w = original.shape[:2]
            # Image 0 of the grid as marks.marked_grid lays it out once training read the round: a gap of 6, a
            # label frame of 2 x 4 around it, the image scaled 2x.
            tile = grid[14:14 + 2 * h:2, 14:14 + 2 * w:2]
            np.testing.assert_array_equal(tile, hide(original))
    assert "hidden by the safety filter" in (out / "feedback_report.html").read_text()


def test_the_run_report_hides_flagged_before_after_images(tmp_path):
    from diffalign.config import dump_config
    from diffalign.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    dump_config(load_config(overrides=[f'output_dir="{run}"', *EVERY_OTHER]), run / "config.toml")
    rng = np.random.default_rng(1)
    base, tuned = (rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    np.savez_compressed(run / "eval_images.npz", base=base, tuned=tuned, prompts=np.array(["two red circles"] * 4))
    text = write_report(run).read_text()
    assert "2 base and 2 tuned image(s) above are hidden" in text


def _flagged_per_epoch(tmp_path, penalty: float) -> list[int]:
    from diffalign.trainer import train

    cfg = load_config(overrides=[
        f'output_dir="{tmp_path / f"pen{penalty}"}"', "train.epochs=8", "train.learning_rate=1e-3",
        'sample.prompts=["two red circles"]', "sample.batch_size=16", "sample.num_batches_per_epoch=2",
        "train.batch_size=8", "train.timestep_fraction=0.5", 'reward.terms=[{name="toy"}]',
        'safety.filter="python"', 'safety.args={function="tests.helpers.user_rewards:red_area"}',
        "safety.threshold=0.105", f"safety.penalty={penalty}", 'log.tracker="none"', "log.progress=false",
        "guards.every=0", "checkpoint.every=0"])
    return [round(32 * h["reward/safety_flagged_rate"]) for h in train(cfg, log=lambda m: None).history]


@pytest.mark.slow
def test_the_penalty_lowers_the_flagged_rate_against_the_same_run_without_it(tmp_path):
    """A filter with a gradation (the share of red pixels, flagged at 0.105, about the base model's median on
    'two red circles') and the toy reward. Both runs sample every epoch from the same seeds, so they differ only
    by what the penalty taught. Measured (2 shared cores, 6-15 min per run): flagged images per epoch of 32
    were 11,10,11,8,11,5,8,5 (69) with penalty 1.0 and 11,10,15,10,12,5,10,9 (82) without; on 32 fixed eval
    seeds 12 vs 14 of 32 (base 14). A short run moves few images, so the effect is small but paired."""
    with_penalty, without = _flagged_per_epoch(tmp_path, 1.0), _flagged_per_epoch(tmp_path, 0.0)
    assert with_penalty[0] == without[0]  # epoch 1 samples the untouched model: the pairing holds
    assert sum(with_penalty) <= sum(without) - 6, (with_penalty, without)
    assert all(p <= q for p, q in zip(with_penalty, without, strict=True)), (with_penalty, without)
