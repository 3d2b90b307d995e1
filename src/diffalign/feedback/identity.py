"""Who is submitting: the evaluator a request is attributed to, for the labeling app's POST routes.

Two modes (see docs/feedback.md, "Evaluators and the threat model"):

* **Invited** (the store holds an invitation, ``diffalign feedback invite``): every submission must carry a
  personal token (header ``X-Diffalign-Evaluator-Token``, which the page takes from the personal link) and is
  attributed to that token's evaluator. A typed name that differs from the token's is refused (403) rather
  than silently replaced, so a script that tries to label as someone else learns it did not.
* **Open** (no invitation): the typed name is the evaluator, as a single person on loopback uses it.
"""

from __future__ import annotations

from fastapi import Request

from diffalign.feedback.base import FeedbackError

EVALUATOR_HEADER = "x-diffalign-evaluator-token"


class NotSignedInError(FeedbackError):
    """An invited session and a request without a personal token."""

    status_code = 401


class WrongEvaluatorError(FeedbackError):
    """An unknown or replaced personal token, or a name that is not the token's."""

    status_code = 403


def personal_token(request: Request) -> str | None:
    return request.headers.get(EVALUATOR_HEADER) or None


def signed_in(store, request: Request) -> str | None:
    """The invited evaluator whose valid token the request carries, or None."""
    return store.evaluator_for_token(personal_token(request))


def resolve_evaluator(store, request: Request, typed: str | None) -> str:
    """The evaluator a submission counts for; FeedbackError (401/403) when it may not be made."""
    if not store.has_invites():
        return typed if typed is not None else ""  # open mode: the store checks the typed name
    token = personal_token(request)
    if token is None:
        raise NotSignedInError(
            "evaluator: this session labels by invitation: open the personal link the session owner sent you "
            "(diffalign feedback invite prints one per evaluator); a typed name alone is not accepted")
    name = store.evaluator_for_token(token)
    if name is None:
        raise WrongEvaluatorError("evaluator: this personal link is unknown or was replaced by a newer one; ask "
                                  "the session owner for your current link")
    if typed and typed.strip() and typed.strip().casefold() != name.casefold():
        raise WrongEvaluatorError(f"evaluator: your personal link signs you in as {name!r}; you cannot submit as "
                                  f"{typed.strip()!r}")
    return name
