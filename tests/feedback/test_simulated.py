"""The simulated evaluator labels through the store API exactly as the toy judge says (plus seeded noise)."""

from __future__ import annotations

import numpy as np
import pytest

from diffalign.feedback.simulated import SimulatedEvaluator

PROMPT = "a red circle left of a blue square"


def _judge(store, info):
    from diffalign.toy.judge import judge_batch

    ids = list(info.image_ids)
    if info.previous_best_image_id is not None:
        ids.append(info.previous_best_image_id)
    success, partial, _ = judge_batch(np.stack([store.load_image(i) for i in ids]), [info.prompt] * len(ids))
    return np.asarray(success, bool), np.asarray(partial, float)


def _rounds(store, images, n_rounds, n_images, seed=0):
    run = store.create_run(f"sim-{seed}")
    out = []
    for k in range(n_rounds):
        imgs, _ = images.mixed(PROMPT, n_images, seed=seed * 100 + k)
        out.append(store.create_round(run, k, PROMPT, imgs))
    return run, out


def test_noise_free_labels_match_the_judge_exactly(store, images):
    run, rounds = _rounds(store, images, 3, 8)
    sim = SimulatedEvaluator()
    total = 0
    for info in rounds:
        total += sim.label_round(store, info.id)
        success, partial = _judge(store, info)
        fb = store.close_round(info.id)  # what the trainer reads
        assert fb.good == success.tolist()
        assert fb.per_evaluator["sim-0"]["labels"] == {
            i: ("good" if s else "bad") for i, s in zip(info.image_ids, success, strict=True)}
        if success.any():
            expected = info.image_ids[int(np.argmax(np.where(success, partial, -np.inf)))]
            assert fb.best_image_id == expected and fb.best_index == info.image_ids.index(expected)
        else:
            assert fb.best_image_id is None
    assert total == 3 * 8 == store.label_count(run)  # exactly the clicks a person would have made
    # The judge finds both kinds in a mixed batch, so the check above is not vacuous.
    all_good = [g for info in rounds for g in store.round_feedback(info.id).good]
    assert 0 < sum(all_good) < len(all_good)
    # Labeling again (a restarted loop) re-submits identically: no new submission, no new labels.
    assert sim.label_round(store, rounds[0].id) == 8
    assert len(store.submissions(rounds[0].id)) == 1 and store.label_count(run) == 24


def test_threshold_uses_the_partial_score(store, images):
    _, (info,) = _rounds(store, images, 1, 8, seed=1)
    sim = SimulatedEvaluator(name="lenient", good_threshold=0.0)
    sim.label_round(store, info.id)
    assert store.round_feedback(info.id).good == [True] * 8  # every partial score is >= 0
    strict = SimulatedEvaluator(name="strict", good_threshold=1.01)
    strict.label_round(store, info.id)
    assert set(store.round_feedback(info.id).per_evaluator["strict"]["labels"].values()) == {"bad"}


def test_noise_flips_about_half_seeded(store, images):
    _, rounds = _rounds(store, images, 4, 25, seed=2)
    clean = SimulatedEvaluator(name="clean")
    noisy = SimulatedEvaluator(name="noisy", noise_rate=0.5, seed=7)
    flips = total = 0
    for info in rounds:
        clean.label_round(store, info.id)
        noisy.label_round(store, info.id)
        per = store.round_feedback(info.id).per_evaluator
        for i in info.image_ids:
            flips += per["clean"]["labels"][i] != per["noisy"]["labels"][i]
            total += 1
        assert noisy.last_result["flipped"] == [per["clean"]["labels"][i] != per["noisy"]["labels"][i]
                                                for i in info.image_ids]
    assert total == 100 and 35 <= flips <= 65
    # Seeded: the same evaluator seed gives the same flips; another seed gives others.
    again = SimulatedEvaluator(name="noisy-again", noise_rate=0.5, seed=7)
    other = SimulatedEvaluator(name="noisy-other", noise_rate=0.5, seed=8)
    again.label_round(store, rounds[0].id)
    other.label_round(store, rounds[0].id)
    per = store.round_feedback(rounds[0].id).per_evaluator
    assert per["noisy-again"]["labels"] == per["noisy"]["labels"]
    assert per["noisy-other"]["labels"] != per["noisy"]["labels"]


def test_previous_best_wins_only_when_better(store, images):
    from diffalign.toy.scenes import render_scene

    run = store.create_run("prev")
    r0 = store.create_round(run, 0, PROMPT, [render_scene(PROMPT, 1).image])
    bad = [render_scene("two yellow triangles", k).image for k in range(3)]
    r1 = store.create_round(run, 1, PROMPT, bad, previous_best_image_id=r0.image_ids[0])
    success, _ = _judge(store, r1)
    assert not success[:3].any() and success[3], "the fixture needs bad new images and a good previous best"
    SimulatedEvaluator().label_round(store, r1.id)
    fb = store.round_feedback(r1.id)
    assert fb.good == [False] * 3 and fb.best_image_id == r0.image_ids[0] and fb.best_index is None


def test_noise_rate_is_checked():
    with pytest.raises(ValueError, match="noise_rate"):
        SimulatedEvaluator(noise_rate=1.5)
