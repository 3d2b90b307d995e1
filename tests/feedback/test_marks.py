"""The feedback report's round grids carry the labels: good/bad frames and the best marked (marks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from diffalign.feedback.marks import BAD, BEST, GOOD, legend_html, marked_grid


def test_frames_follow_the_labels_and_the_best_is_gold():
    images = np.full((3, 8, 8, 3), 128, dtype=np.uint8)
    grid = marked_grid(images, [True, False, True], best_index=2, columns=3, scale=2, frame=2, gap=3)
    cell = 16 + 8  # scaled image + room for the double frame
    assert grid.shape == (3 + cell + 3, 3 + 3 * (cell + 3), 3)

    def pixel(col, dy, dx):  # relative to the image's top-left corner inside cell ``col``
        return tuple(grid[3 + 4 + dy, 3 + col * (cell + 3) + 4 + dx])

    assert pixel(0, -1, 5) == GOOD and pixel(0, -2, 5) == GOOD and pixel(0, -3, 5) == (255, 255, 255)
    assert pixel(1, 5, -1) == BAD
    assert pixel(2, -4, 5) == BEST and pixel(2, 16 + 3, 5) == BEST  # a double frame, all round
    assert pixel(2, 0, 0) == BEST and pixel(2, 15, 15) == (128, 128, 128)  # the corner; the image itself
    assert pixel(0, 0, 0) == (128, 128, 128)  # no corner on a plain good image
    assert "good" in legend_html() and "best" in legend_html()


def test_bad_arguments_are_refused():
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="good: 1 labels for 2 images"):
        marked_grid(images, [True], None)
    with pytest.raises(ValueError, match="best_index: 5"):
        marked_grid(images, [True, True], 5)
