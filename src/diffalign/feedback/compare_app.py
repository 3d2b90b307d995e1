"""The blind A/B page of the labeling app: routes added to :func:`~diffalign.feedback.server.create_app`.

What an evaluator's browser can learn is only what :func:`~diffalign.feedback.comparisons.blind_pair` gives:
the prompt and two image URLs by *side* (``/api/pairs/<id>/left.png``), never a model name, a content hash
or which side is A. Picks come back as ``left``/``right``/``none`` and the store turns them into A or B.
Images the safety filter flagged are not served at all (403 with the reason); the page shows the reason.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from diffalign.feedback.base import FeedbackError
from diffalign.feedback.comparisons import flag_reason, side_model
from diffalign.feedback.identity import resolve_evaluator, signed_in


class ChoiceIn(BaseModel):
    """One evaluator's pick of a pair."""

    model_config = ConfigDict(extra="forbid")

    evaluator: str | None = Field(default=None, max_length=200,
                                  description="The evaluator's name (1-64 printable characters); with invitations, "
                                  "optional (the personal token says who picks).")
    choice: str = Field(description="'left', 'right' or 'none' (no preference).", max_length=10)


class ChoiceOut(BaseModel):
    choice_id: int
    pair_id: int
    decided: int
    total: int


class HiddenImageError(FeedbackError):
    """An image the safety filter flagged: never sent to an evaluator."""

    status_code = 403


def add_compare_routes(app: FastAPI, store, page) -> None:
    """Register the A/B page and its API on ``app`` (``page(name)`` serves a static HTML file)."""

    @app.get("/compare/{comparison_id}", include_in_schema=False)
    def compare_page(comparison_id: int):
        store.get_comparison(comparison_id)  # 404 for an unknown comparison
        return page("compare.html")

    @app.get("/api/comparisons", tags=["comparisons"])
    def list_comparisons() -> list[dict]:
        """Every A/B comparison (name and size only: the models stay hidden)."""
        return store.list_comparisons()

    @app.get("/api/comparisons/{comparison_id}/next", tags=["comparisons"])
    def next_pair(comparison_id: int, request: Request, evaluator: str | None = None) -> dict:
        """The next pair ``evaluator`` (or the personal token's) has not picked, blind (sides only), and the progress."""
        return store.next_pair(comparison_id, signed_in(store, request) if store.has_invites() else evaluator)

    @app.post("/api/pairs/{pair_id}/choices", tags=["comparisons"], response_model=ChoiceOut)
    def choose(pair_id: int, body: ChoiceIn, request: Request) -> ChoiceOut:
        """Pick the better side of a pair, or 'none'; the same pick again is a no-op, a change is appended."""
        evaluator = resolve_evaluator(store, request, body.evaluator)
        choice_id = store.choose(pair_id, evaluator, body.choice)
        info = store.pair_info(pair_id)
        progress = store.next_pair(info["comparison_id"], evaluator)
        return ChoiceOut(choice_id=choice_id, pair_id=pair_id, decided=progress["decided"], total=progress["total"])

    @app.get("/api/pairs/{pair_id}/{side}.png", tags=["comparisons"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    def pair_image(pair_id: int, side: str, request: Request):
        """The image shown on ``side`` ('left' or 'right') of a pair."""
        if side not in ("left", "right"):
            raise FeedbackError(f"side: expected 'left' or 'right', got {side!r}")
        info = store.pair_info(pair_id)
        reason = flag_reason(info["metadata"], side_model(side, info["a_on_left"]))
        if reason:
            raise HiddenImageError(f"image hidden by the safety filter ({reason})")
        return FileResponse(store.pair_image_path(pair_id, side), media_type="image/png",
                            headers={"Cache-Control": "private, no-store"})
