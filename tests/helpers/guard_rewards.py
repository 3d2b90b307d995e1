"""Guard rewards for tests/test_guards.py: a scripted score, so a test decides which check trips."""

import numpy as np

SCRIPT: list[float] = []  # one value per call (the base model's check first), consumed in order
CALLS: list[int] = []  # image counts of the calls made


def scripted(images, prompts, metadata):
    CALLS.append(len(images))
    return np.full(len(images), SCRIPT.pop(0))
