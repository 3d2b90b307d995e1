"""Why did HERO reward this image? The labelled images nearest to it in HERO's feedback-aligned embedding.

Part of :class:`~diffalign.feedback.store.FeedbackStore`. HERO (Hiranaka et al. 2025, ``algorithms/hero.py``)
rewards an image by its cosine similarity, in a learned embedding E, to the images evaluators preferred. Its
encoder changes every round, so "near" only means something in one round's embedding: after round r's update
the loop embeds every image labelled so far (rounds 1..r) with that encoder and stores the vectors under
round r, together with the reward E gave round r's own images (``image_embeddings``, append-only). The
explanation of an image of round r is then: the k labelled images (other than itself) closest to it in round
r's embedding, with their aggregated label, each evaluator's label, their round, and the similarity.

Only closed rounds are explained: an open round's labels are still being given, and showing an evaluator
what others said (or what HERO would reward) would sway them.
"""

from __future__ import annotations

import json

import numpy as np

from diffalign.feedback.base import ConflictError, FeedbackError, NotFoundError, _check_int
from diffalign.feedback.submissions import Submissions


class Embeddings(Submissions):
    """Storing HERO's per-round embeddings and reading the nearest labelled images back."""

    def store_embeddings(self, round_id: int, image_ids: list[int], vectors: np.ndarray,
                         rewards: dict[int, float] | None = None) -> int:
        """Record round ``round_id``'s encoder's embedding of ``image_ids`` (``vectors`` (N, d)); ``rewards``
        maps the round's own image ids to the reward HERO gave them. Idempotent (a resumed loop re-records)."""
        round_id = _check_int(round_id, "round_id")
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or len(vectors) != len(image_ids):
            raise FeedbackError(f"vectors: expected ({len(image_ids)}, d), got shape {vectors.shape}")
        rewards = rewards or {}
        rows = [(round_id, int(i), json.dumps([round(float(x), 6) for x in v]),
                 None if int(i) not in rewards else float(rewards[int(i)])) for i, v in zip(image_ids, vectors, strict=True)]
        with self._write() as c:
            self._round_info(c, round_id)
            c.executemany("INSERT OR IGNORE INTO image_embeddings (round_id, image_id, vector, reward) "
                          "VALUES (?, ?, ?, ?)", rows)
        return len(rows)

    def explain(self, image_id: int, k: int = 5) -> dict:
        """The ``k`` labelled images nearest to ``image_id`` in its round's HERO embedding (see the module doc)."""
        image_id = _check_int(image_id, "image_id")
        k = _check_int(k, "k")
        if not 1 <= k <= 50:
            raise FeedbackError(f"k: between 1 and 50 neighbours, got {k}")
        info = self.image_info(image_id)
        round_id = info["round_id"]
        with self._read() as c:
            rinfo = self._round_info(c, round_id)
            closed = c.execute("SELECT 1 FROM round_closures WHERE round_id = ?", (round_id,)).fetchone()
            rows = c.execute("SELECT e.image_id, e.vector, e.reward, i.round_id, r.iteration FROM image_embeddings e "
                             "JOIN images i ON i.id = e.image_id JOIN rounds r ON r.id = i.round_id "
                             "WHERE e.round_id = ?", (round_id,)).fetchall()
        if closed is None:
            raise ConflictError(f"image_id: image {image_id} is in round {round_id}, which is still open; its "
                                f"explanation is shown once training has read the round")
        by_id = {int(r["image_id"]): r for r in rows}
        if image_id not in by_id:
            raise NotFoundError(f"image_id: round {round_id} has no HERO embedding (a run of another algorithm, or "
                                f"one recorded before explanations existed)")
        ids = [i for i in by_id if i != image_id]
        vec = {i: np.asarray(json.loads(by_id[i]["vector"])) for i in by_id}
        me = vec[image_id] / max(np.linalg.norm(vec[image_id]), 1e-12)
        sims = {i: float(vec[i] @ me / max(np.linalg.norm(vec[i]), 1e-12)) for i in ids}
        nearest = sorted(ids, key=lambda i: -sims[i])[:k]
        labels = self._labels_by_image({int(by_id[i]["round_id"]) for i in nearest})
        neighbours = []
        for i in nearest:
            per = labels.get(i, {})
            good = sum(v == "good" for v in per.values())
            meta = self.image_info(i)["metadata"]
            neighbours.append({
                "image_id": i, "round_id": int(by_id[i]["round_id"]), "iteration": int(by_id[i]["iteration"]),
                "similarity": sims[i], "label": ("good" if good * 2 > len(per) else "bad") if per else None,
                "labels": per, "flagged": bool(meta.get("flagged")), "flag_reason": meta.get("flagged") or None,
                "url": None if meta.get("flagged") else f"/api/images/{i}.png"})
        reward = by_id[image_id]["reward"]
        return {"image_id": image_id, "round_id": round_id, "iteration": rinfo.iteration, "prompt": rinfo.prompt,
                "reward": None if reward is None else float(reward), "similarity": "cosine in round "
                f"{rinfo.iteration}'s HERO embedding", "neighbours": neighbours}

    def _labels_by_image(self, round_ids: set[int]) -> dict[int, dict[str, str]]:
        """image id -> {evaluator: label} over the evaluators whose labels training used (closed rounds) or
        their latest submissions."""
        out: dict[int, dict[str, str]] = {}
        for rid in round_ids:
            for evaluator, sub in self.round_feedback(rid).per_evaluator.items():
                for image_id, label in sub["labels"].items():
                    out.setdefault(int(image_id), {})[evaluator] = label
        return out

    def best_and_worst(self, round_id: int) -> tuple[int | None, int | None]:
        """The round's images with the highest and the lowest HERO reward (None without rewards)."""
        round_id = _check_int(round_id, "round_id")
        rows = self._conn().execute("SELECT e.image_id, e.reward FROM image_embeddings e JOIN images i ON "
                                    "i.id = e.image_id WHERE e.round_id = ? AND i.round_id = ? AND e.reward IS NOT "
                                    "NULL ORDER BY e.reward DESC, e.image_id", (round_id, round_id)).fetchall()
        if not rows:
            return None, None
        return int(rows[0]["image_id"]), int(rows[-1]["image_id"])


def explanations_html(store, run_id: int, k: int = 3) -> str:
    """The feedback report's section: for each closed round's best- and worst-rewarded image, its ``k`` nearest
    labelled images in that round's HERO embedding, with labels and evaluators ("" for runs without HERO)."""
    import html

    from diffalign.report import _png
    from diffalign.safety import hide

    def thumb(image_id: int) -> str:
        meta = store.image_info(image_id)["metadata"]
        image = store.load_image(image_id)
        image = hide(image) if meta.get("flagged") else image
        return f"<img alt='image {image_id}' src='data:image/png;base64,{_png(image.repeat(2, 0).repeat(2, 1))}'>"

    rows = []
    for r in store.run_summary(run_id)["rounds"]:
        if r["state"] != "closed":
            continue
        for which, image_id in zip(("highest", "lowest"), store.best_and_worst(r["id"]), strict=True):
            if image_id is None:
                continue
            ex = store.explain(image_id, k)
            cells = "".join(
                f"<td>{thumb(n['image_id'])}<br>{n['label'] or '–'} · sim {n['similarity']:.2f} · round "
                f"{n['iteration'] + 1}<br><small>{html.escape(', '.join(f'{e}: {v}' for e, v in n['labels'].items()))}"
                f"</small></td>" for n in ex["neighbours"])
            rows.append(f"<tr><td>round {r['iteration'] + 1}<br>{which} reward<br>{ex['reward']:.3f}</td>"
                        f"<td>{thumb(image_id)}</td>{cells}</tr>")
    if not rows:
        return ""
    return ("<h2>Why did HERO reward these images?</h2><p>For each round, the images HERO rewarded most and least, "
            f"and the {k} labelled images nearest to each in that round's feedback-aligned embedding (cosine "
            "similarity), with the aggregated label and each evaluator's.</p><table><tr><th>round</th><th>image</th>"
            f"<th colspan='{k}'>nearest labelled images</th></tr>{''.join(rows)}</table>")
