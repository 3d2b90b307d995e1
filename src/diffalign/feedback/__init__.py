"""Human feedback for HERO / D3PO style fine-tuning: a durable store, a browser labeling app, a simulated evaluator.

* :class:`FeedbackStore` (``store.py``) - runs, rounds, images, labels and best picks on SQLite.
* ``server.py`` - the labeling app (FastAPI): :func:`diffalign.feedback.server.create_app` and ``serve``.
* :class:`SimulatedEvaluator` (``simulated.py``) - labels rounds with the toy judge through the same API.
"""

from diffalign.feedback.simulated import SimulatedEvaluator
from diffalign.feedback.store import (
    SCHEMA_VERSION,
    ConflictError,
    FeedbackError,
    FeedbackStore,
    NotFoundError,
    RoundFeedback,
    RoundInfo,
    SchemaVersionError,
)

__all__ = [
    "SCHEMA_VERSION",
    "ConflictError",
    "FeedbackError",
    "FeedbackStore",
    "NotFoundError",
    "RoundFeedback",
    "RoundInfo",
    "SchemaVersionError",
    "SimulatedEvaluator",
]
