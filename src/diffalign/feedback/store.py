"""A durable store of human feedback on generated images, on SQLite (standard library ``sqlite3``).

Layout of a store directory::

    feedback.sqlite      runs, rounds, images, evaluators, invites, submissions, labels, run metrics (WAL mode)
    images/ab/abcd....png  the PNG files, content-addressed by their sha256

The training loop creates a *round* (a batch of images for one prompt) with :meth:`FeedbackStore.create_round`,
waits for it with :meth:`FeedbackStore.wait_for_round` and reads the aggregated labels. Evaluators (people
through the labeling app, or :class:`~diffalign.feedback.simulated.SimulatedEvaluator`) go through
:meth:`FeedbackStore.submit`. Every submission is one transaction; nothing is ever overwritten: a changed
submission by the same evaluator is appended and supersedes the older one, which stays as an audit trail.

The store is safe to use from several threads (one SQLite connection per thread) and several processes
(WAL mode, ``busy_timeout``, write transactions taken with ``BEGIN IMMEDIATE``).
"""

from diffalign.feedback.aggregation import Aggregation
from diffalign.feedback.base import (
    BUSY_TIMEOUT_MS,
    DB_NAME,
    IMAGE_DIR,
    LABELS,
    MAX_EVALUATOR_LENGTH,
    MAX_PROMPT_LENGTH,
    ConflictError,
    FeedbackError,
    NotFoundError,
    RoundClosedError,
    RoundFeedback,
    RoundInfo,
    SchemaVersionError,
    check_evaluator,
)
from diffalign.feedback.comparisons import Comparisons
from diffalign.feedback.embeddings import Embeddings
from diffalign.feedback.invites import Invites
from diffalign.feedback.rounds import RunsAndRounds, config_diff
from diffalign.feedback.schema import SCHEMA_VERSION
from diffalign.feedback.submissions import Submissions


class FeedbackStore(Invites, Embeddings, Comparisons, Aggregation, Submissions, RunsAndRounds):
    """Runs, rounds, images, labels and best picks in ``directory/feedback.sqlite`` and ``directory/images/``.

    One class for its users; its parts live by idea in ``base.py`` (connections, schema), ``rounds.py``
    (runs, rounds, images), ``submissions.py`` (labels in), ``aggregation.py`` (labels out) and
    ``comparisons.py`` (blind A/B pairs and picks), ``embeddings.py`` (HERO's embedding, for explanations),
    ``invites.py`` (evaluator identities: personal tokens, stored hashed).
    """


__all__ = [
    "BUSY_TIMEOUT_MS", "DB_NAME", "IMAGE_DIR", "LABELS", "MAX_EVALUATOR_LENGTH", "MAX_PROMPT_LENGTH", "SCHEMA_VERSION",
    "ConflictError", "FeedbackError", "FeedbackStore", "NotFoundError", "RoundClosedError", "RoundFeedback",
    "RoundInfo", "SchemaVersionError", "check_evaluator", "config_diff",
]
