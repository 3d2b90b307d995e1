"""A round's grid marked with its labels, for the feedback report: what was judged good, bad and best.

Each image gets a frame in the colour of the label training used (the round's aggregate, as closed): green
good, red bad, and a thicker gold frame with a gold corner for the best. The colours are the labeling app's
(style.css), so the report reads like the page. :func:`legend_html` explains them in the report.
"""

from __future__ import annotations

import numpy as np

GOOD = (31, 157, 85)
BAD = (214, 69, 65)
BEST = (224, 168, 0)


def marked_grid(images: np.ndarray, good: list[bool], best_index: int | None, columns: int = 8,
                scale: int = 2, frame: int = 4, gap: int = 6) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> one grid (uint8) with a label frame around each, upscaled by ``scale``.

    ``good[i]`` is image i's label; ``best_index`` the best image (None: no best in this batch, e.g. the
    previous round's best won). The best's frame is twice as thick, in gold, with a gold corner triangle.
    """
    images = np.asarray(images)
    n, h, w, _ = images.shape
    if len(good) != n:
        raise ValueError(f"good: {len(good)} labels for {n} images")
    if best_index is not None and not 0 <= best_index < n:
        raise ValueError(f"best_index: {best_index} is not an image of the grid (0..{n - 1})")
    hs, ws = h * scale, w * scale
    cell_h, cell_w = hs + 4 * frame, ws + 4 * frame  # room for the best's double frame
    rows = (n + columns - 1) // columns
    cols = min(columns, n)
    grid = np.full((rows * (cell_h + gap) + gap, cols * (cell_w + gap) + gap, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = gap + r * (cell_h + gap), gap + c * (cell_w + gap)
        best = i == best_index
        width = 2 * frame if best else frame
        colour = BEST if best else (GOOD if good[i] else BAD)
        y0, x0 = top + 2 * frame - width, left + 2 * frame - width  # frames of either width share the centre
        grid[y0: y0 + hs + 2 * width, x0: x0 + ws + 2 * width] = colour
        big = image.repeat(scale, 0).repeat(scale, 1)
        grid[top + 2 * frame: top + 2 * frame + hs, left + 2 * frame: left + 2 * frame + ws] = big
        if best:  # a corner a colour-blind reader can see too
            size = max(6, hs // 6)
            for k in range(size):
                grid[top + 2 * frame + k, left + 2 * frame: left + 2 * frame + size - k] = BEST
    return grid


def legend_html() -> str:
    """The colour key of the marked grids, for the feedback report."""
    def swatch(rgb, text):
        return (f"<span style='display:inline-block;width:14px;height:14px;vertical-align:middle;margin:0 4px 0 12px;"
                f"border:3px solid rgb{rgb}'></span>{text}")
    return ("<p class='legend'>Each round's images, framed by the label training used (the round's aggregate "
            "over its evaluators):" + swatch(GOOD, "good") + swatch(BAD, "bad") +
            swatch(BEST, "best (thick gold frame and corner)") +
            ". A round without a gold frame had no best in its batch (none good, or the previous best won).</p>")
