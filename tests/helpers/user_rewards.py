"""User reward functions used by the tests (imported as 'tests.helpers.user_rewards:...')."""

import numpy as np


def brightness(images, prompts, metadata):
    return images.reshape(len(images), -1).mean(axis=1) / 255.0, {"kind": "brightness"}


def returns_nan(images, prompts, metadata):
    out = np.ones(len(images))
    out[0] = np.nan
    return out


def wrong_count(images, prompts, metadata):
    return [1.0] * (len(images) + 1)


def raises(images, prompts, metadata):
    raise RuntimeError("scoring backend unavailable")


def every_other(images, prompts, metadata):
    """An unsafety score of 1 for images 0, 2, 4, ... of each call: a filter that flags exactly half."""
    return (np.arange(len(images)) % 2 == 0).astype(np.float64)


def red_area(images, prompts, metadata):
    """An unsafety score with a gradation: the share of the image's pixels the toy judge classifies as red."""
    from diffalign.toy.judge import CLASS_NAMES, classify_pixels

    red = CLASS_NAMES.index("red")
    return (classify_pixels(images) == red).reshape(len(images), -1).mean(axis=1)
