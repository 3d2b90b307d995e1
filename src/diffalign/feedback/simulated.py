"""A simulated evaluator: labels a round with the toy judge, through the same store API as a person's clicks.

With a ``bias`` it labels like a person with a known lean, so the agreement statistics
(:mod:`diffalign.feedback.agreement`) can be tested on evaluators whose bias is known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffalign.feedback.store import FeedbackStore


def bias_names() -> list[str]:
    """Every valid ``bias``: ``random``, and ``<colour or shape>_is_bad`` / ``_is_good`` for the toy world's."""
    from diffalign.toy.scenes import COLORS, SHAPES

    return ["random"] + [f"{kind}_is_{verdict}" for kind in (*COLORS, *SHAPES) for verdict in ("bad", "good")]


@dataclass
class SimulatedEvaluator:
    """Labels rounds of toy-world images the way a careful (or, with ``noise_rate``, careless) person would.

    For each image of a round it loads the PNG from the store and judges it against the round's prompt with
    :func:`diffalign.toy.judge.judge_batch`: good means the judge's success (or, when ``good_threshold`` is
    set, a partial score >= ``good_threshold``). With probability ``noise_rate`` a label is flipped. The best
    pick is the good image - or the previous round's best, when the round shows one and it still judges
    good - with the highest partial score. Then it calls :meth:`FeedbackStore.submit`, so the labels counted
    are exactly the clicks a person would have made.

    ``bias`` overrides the judge: ``"random"`` labels every image good or bad by a fair coin (someone
    clicking without looking); ``"blue_is_bad"`` labels every image in which the judge finds a blue object
    bad (and ``"blue_is_good"`` good), likewise for the other colours and the shapes (``"circle_is_bad"``);
    :func:`bias_names` lists them. Noise flips labels after the bias.

    The noise is seeded per ``(seed, round_id)``: labeling the same round again gives the same labels, so a
    restarted loop re-submits identically and the store keeps one submission.
    """

    name: str = "sim-0"
    good_threshold: float | None = None
    noise_rate: float = 0.0
    seed: int = 0
    bias: str | None = None
    last_result: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.noise_rate) <= 1.0:
            raise ValueError(f"noise_rate: must be in [0, 1], got {self.noise_rate}")
        if self.bias is not None and self.bias not in bias_names():
            raise ValueError(f"bias: unknown bias {self.bias!r}; use None or one of {', '.join(bias_names())}")

    def _biased(self, judged_good: np.ndarray, judgements: list, rng: np.random.Generator) -> np.ndarray:
        """The labels this evaluator's bias gives, where the bias decides (else the judge's)."""
        if self.bias is None:
            return judged_good
        if self.bias == "random":
            return rng.random(len(judged_good)) < 0.5
        kind, verdict = self.bias.rsplit("_is_", 1)
        hit = np.array([any(kind in (o.color, o.shape) for o in j.objects) for j in judgements], dtype=bool)
        return np.where(hit, verdict == "good", judged_good)

    def _good(self, success: np.ndarray, partial: np.ndarray) -> np.ndarray:
        if self.good_threshold is None:
            return np.asarray(success, dtype=bool)
        return np.asarray(partial, dtype=np.float64) >= float(self.good_threshold)

    def label_round(self, store: FeedbackStore, round_id: int) -> int:
        """Judge, label and submit one round; returns the number of labels given (one per image)."""
        from diffalign.toy.judge import judge_batch  # lazy: the judge pulls in the toy world only when used

        info = store.get_round(round_id)
        ids = list(info.image_ids)
        candidates = ids + ([info.previous_best_image_id] if info.previous_best_image_id is not None else [])
        images = np.stack([store.load_image(i) for i in candidates]).astype(np.uint8)
        success, partial, judgements = judge_batch(images, [info.prompt] * len(candidates))
        success = np.asarray(success, dtype=bool)
        partial = np.asarray(partial, dtype=np.float64)
        rng = np.random.default_rng([int(self.seed), int(round_id)])
        flips = rng.random(len(ids)) < float(self.noise_rate)
        # The bias draws from its own stream, so adding one leaves the noise of the other images unchanged.
        judged_good = self._biased(self._good(success, partial), judgements,
                                   np.random.default_rng([int(self.seed), int(round_id), 1]))
        # Images the safety filter hid were never shown: the store labels them bad, and so does a person.
        hidden = np.array([bool(store.image_info(i)["metadata"].get("flagged")) for i in candidates])
        judged_good = judged_good & ~hidden
        good = (judged_good[: len(ids)] ^ flips) & ~hidden[: len(ids)]
        labels = {i: ("good" if g else "bad") for i, g in zip(ids, good, strict=True)}

        best_id: int | None = None
        best_score = -np.inf
        for k, image_id in enumerate(ids):
            if good[k] and partial[k] > best_score:
                best_id, best_score = image_id, partial[k]
        if info.previous_best_image_id is not None and judged_good[-1] and partial[-1] > best_score:
            best_id = info.previous_best_image_id
        # A person who sees good images picks one of them (the store requires it); the previous best only
        # wins when it is strictly better than every good new image.
        submission_id = store.submit(round_id, self.name, labels, best_id)
        self.last_result = {
            "round_id": round_id, "submission_id": submission_id, "labels": labels, "best_image_id": best_id,
            "judged_good": judged_good[: len(ids)].tolist(), "flipped": flips.tolist(),
            "partial": partial[: len(ids)].tolist(),
        }
        return len(labels)
