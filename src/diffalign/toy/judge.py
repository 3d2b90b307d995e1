"""The exact programmatic judge of toy-world scenes: finds the coloured shapes in an image and checks them
against a prompt (``docs/judge.md`` has the measurements behind every threshold).

How it decides:

1. **Pixels.** A pixel is background when its saturation (after a light [1 2 1] smoothing against noise)
   is below 0.30 - or above that for an image whose own background is tinted - or when it is too dark to
   have a hue. Otherwise its class is the nearest of the four colour hues, or ``"other"`` when it is over
   45 degrees from all of them. Hue and saturation ignore brightness, so lighting drift does not matter.
   One numpy pass (a lookup table on RGB) for the whole batch.
2. **Objects.** Foreground pixels form 8-connected components (one ``scipy.ndimage.label`` call for the
   batch); components under :data:`MIN_AREA` pixels are specks and ignored. A component's colour is the
   majority of its *solid* pixels (3x3 neighbourhood all one class): edge pixels blend with the
   background and can take a wrong hue, but only in a one-pixel fringe. A component is split when it
   holds two solid colours (touching objects of different colours); when eroding it (alternately by a
   cross and a square, like an octagonal distance) leaves two cores at some level (same-colour objects
   touching through a neck; each pixel goes to its nearest core); or when it is a filled bar at least 1.5
   times as long as wide (squares touching along a side, cut where the outline steps).
3. **Shapes** from the object's soft coverage (each pixel's saturation between background and object
   level, so a half-covered edge pixel counts half and stray noisy pixels hardly matter): vertical
   skewness of the mass (upright triangle -0.57, circle and square 0) picks out triangles even when blur
   rounds them; then fill = area / (widest row x tallest column) tells squares (1) from circles (pi/4).
4. **Verdict.** ``success`` is exact: count prompts need exactly N objects, all of the asked colour and
   shape; relation prompts need exactly two objects, of the two asked kinds, with
   :func:`~diffalign.toy.scenes.relation_holds` true on their box centres. ``partial`` in [0, 1] is a
   weighted mean of count, colour, shape, relation and extra-object terms, 1 exactly on success.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .scenes import COLORS, IMAGE_SIZE, PromptSpec, parse_prompt, relation_holds

OTHER = "other"  # colour or shape that is none of the toy world's; such an object is always an extra
CLASS_NAMES = ("background", *COLORS, OTHER)  # pixel classes: 0 background, 1-4 colours, 5 other
_N_CLASSES = len(CLASS_NAMES)

# Pixels. Rendered colours have saturation 0.76-0.85 and the background 0.03; an anti-aliased edge pixel
# reaches 0.30 at about 40-50% object coverage, so 0.30 draws the mask where the true edge is. A tinted
# background raises its median saturation; the threshold then sits SAT_BG_MARGIN above it (at most 0.45).
SAT_MIN, SAT_BG_MARGIN, SAT_MAX = 0.30, 0.15, 0.45
VALUE_MIN = 0.15  # darker pixels have no reliable hue
HUE_TOL = 45.0  # degrees; the four hues are 47-95 degrees apart, so a drift of a few degrees is harmless

# Objects. The smallest rendered object (an 11 px triangle) covers ~55 px; specks are a few px.
MIN_AREA = 16
SHALLOW_LEVELS = 2  # erosion levels where noise can still cut a core off (see _deep_cores)
MIN_CORE = 3  # solid px a colour needs inside a component to count as its own object
BAR_ASPECT, BAR_FILL = 1.5, 0.8  # a filled box this elongated is touching squares (one shape: <= 1.2)

# Shapes, from soft coverage (docs/judge.md has the measured ranges these sit between). Fill is
# area / (widest row x tallest column): square 1, circle pi/4, triangle 1/2. Vertical skewness: an upright
# triangle -0.57 (its mass sits low), circle and square 0.
SOFT_FLOOR = 0.03  # saturation above the background's that still counts as none: background noise
TRI_SKEW = 0.25  # perturbed triangles <= -0.37, circles and squares within +-0.13
SQUARE_FILL = 0.87  # circles <= 0.85, squares >= 0.93 under blur + noise (>= 0.86 with a speck attached)
CIRCLE_FILL = 0.65  # circles >= 0.72; below, a symmetric shape with empty corners and sides is no toy shape
MIN_FILL, MAX_ASPECT = 0.35, 1.6  # below / above: a smear that is no toy shape
MAX_SIZE = 48  # px; toy objects are 11-19 px wide, a wider blob is e.g. a coloured background

# Partial score: a weighted mean of the terms, times the extras factor 1 / (1 + EXTRA_COST * extras).
COUNT_WEIGHTS = {"count": 0.45, "colour": 0.275, "shape": 0.275, "relation": 0.0}
RELATION_WEIGHTS = {"count": 0.20, "colour": 0.25, "shape": 0.25, "relation": 0.30}
EXTRA_COST = 0.25  # one extra object costs 20%; eight (a scatter of blobs) cost two thirds
RELATION_SCALE = 3.0  # px; the relation term is ~0.5 three px on the wrong side of relation_holds' boundary

_CHUNK = 256  # images per vectorised pass; bounds memory of the label arrays
_PLANE8 = np.zeros((3, 3, 3), dtype=bool)
_PLANE8[1] = True  # 8-connectivity inside each image, none across the batch axis
_SQUARE3 = np.ones((3, 3), dtype=bool)
_CROSS3 = ndimage.generate_binary_structure(2, 1)
_PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_PLANE_CROSS[1] = _CROSS3


@dataclass
class DetectedObject:
    """One object found in an image: colour, shape, centre (x right, y down, pixels; like
    :class:`SceneObject`'s, the centre of the shape's box, estimated sub-pixel from the soft centroid), box
    ``(x0, y0, x1, y1)`` of its pixel mask in pixel-edge coordinates, area of the mask in pixels, and the
    two shape features ``fill`` and ``skew``."""

    color: str
    shape: str
    cx: float
    cy: float
    box: tuple[float, float, float, float]
    area: int
    fill: float = field(default=0.0, repr=False)
    skew: float = field(default=0.0, repr=False)


@dataclass
class Judgement:
    """``success``: the image shows exactly what the prompt asks. ``partial``: closeness in [0, 1]
    (1 on success). ``details``: the sub-scores ``count``, ``colour``, ``shape``, ``relation``, ``extras``
    in [0, 1] (a term the prompt does not ask about is 1) and ``n_objects``."""

    success: bool
    partial: float
    objects: list[DetectedObject]
    details: dict


# ----------------------------------------------------------------------------------------------------
# Pixels


def _hue_degrees(r, g, b):
    mx = np.maximum(np.maximum(r, g), b)
    c = np.maximum(mx - np.minimum(np.minimum(r, g), b), 1e-6)
    h = np.where(mx == r, np.mod((g - b) / c, 6.0), np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return h * 60.0


@functools.cache
def _colour_lut() -> np.ndarray:
    """Colour class of every RGB colour at 7 bits a channel (2 MB; hue error < 2 degrees where it
    matters, at saturation >= 0.3): nearest colour hue, or ``other`` beyond HUE_TOL."""
    protos = np.array(list(COLORS.values()), dtype=np.float64).T
    proto_hue = _hue_degrees(*protos)
    v = np.arange(128, dtype=np.float32) * 2 + 1  # the centre of each 7-bit bin
    hue = _hue_degrees(v[:, None, None], v[None, :, None], v[None, None, :]).ravel()
    lut = np.zeros(hue.shape, dtype=np.uint8)
    best = np.full(hue.shape, np.inf, dtype=np.float32)
    for k, ph in enumerate(proto_hue):
        dist = np.abs((hue - ph + 180.0) % 360.0 - 180.0)
        closer = dist < best
        lut[closer], best[closer] = k + 1, dist[closer]
    lut[best > HUE_TOL] = _N_CLASSES - 1
    return lut


def _pixel_maps(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 -> pixel classes (N, H, W) uint8, saturation (N, H, W) float32 and each image's
    background saturation (N,)."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    sat = (mx - np.minimum(np.minimum(r, g), b)).astype(np.float32) / np.maximum(mx, 1).astype(np.float32)
    # The median of a quarter of the pixels: objects never cover half the image.
    bg_sat = np.median(sat[:, ::2, ::2].reshape(len(images), -1), axis=1)
    threshold = np.clip(bg_sat + SAT_BG_MARGIN, SAT_MIN, SAT_MAX)[:, None, None]
    index = (r.astype(np.int32) >> 1 << 14) | (g.astype(np.int32) >> 1 << 7) | (b >> 1)
    classes = _colour_lut()[index]
    # Threshold a [1 2 1]-smoothed saturation: pixel noise on a soft edge would otherwise fray the mask.
    # The kernel is symmetric, so straight edges stay where they are.
    smooth = ndimage.correlate1d(sat, [0.25, 0.5, 0.25], axis=1, mode="nearest")
    smooth = ndimage.correlate1d(smooth, [0.25, 0.5, 0.25], axis=2, mode="nearest")
    classes[(smooth < threshold) | (mx < VALUE_MIN * 255)] = 0
    return classes, sat, bg_sat


def classify_pixels(images) -> np.ndarray:
    """Images (as :func:`judge_batch` takes them) -> (N, 64, 64) uint8 pixel classes, indices into
    :data:`CLASS_NAMES` (0 background)."""
    return _pixel_maps(_as_uint8_batch(images))[0]


# ----------------------------------------------------------------------------------------------------
# Objects


def _erosion_levels(mask: np.ndarray):
    """Successive erosions of a 2-D ``mask``, alternating a cross and a 3x3 square (an octagon
    approximates the Euclidean disk better than either alone), until nothing is left."""
    level = mask
    for depth in range(IMAGE_SIZE):
        level = ndimage.binary_erosion(level, structure=_CROSS3 if depth % 2 == 0 else _SQUARE3)
        if not level.any():
            return
        yield level


def _deep_cores(depth: int, level: np.ndarray, deeper: np.ndarray | None, structure: np.ndarray):
    """Cores of erosion level ``depth`` (0: eroded once) that count as objects -> (core labels, bool per
    core label). In the first SHALLOW_LEVELS levels a core must survive one more erosion: a bump on a
    ragged edge is cut off there but erodes away; deeper, a separate core is a real neck."""
    core_labels, m = ndimage.label(level, structure=structure)
    deep = np.zeros(m + 1, dtype=bool)
    if depth >= SHALLOW_LEVELS:
        deep[:] = True
    elif deeper is not None:
        deep[core_labels[deeper]] = True
    deep[0] = False
    return core_labels, deep


def _count_cores(fg: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """For each component, the largest number of counting cores at any erosion level (batch version of
    the loop in :func:`_split_by_erosion`)."""
    most = np.zeros(n + 1, dtype=np.int64)
    level = ndimage.binary_erosion(fg, structure=_PLANE_CROSS)
    for depth in range(IMAGE_SIZE):
        alive = level.any(axis=(1, 2))
        if not alive.any():
            break
        if not alive.all():  # deep levels only concern a few images with big objects
            level, labels = level[alive], labels[alive]
        deeper = ndimage.binary_erosion(level, structure=_PLANE8 if depth % 2 == 0 else _PLANE_CROSS)
        core_labels, deep = _deep_cores(depth, level, deeper, _PLANE8)
        if deep.sum() >= 2:
            owner = np.zeros(len(deep), dtype=np.int64)  # the component each core lies in
            owner[core_labels[level]] = labels[level]
            most = np.maximum(most, np.bincount(owner[deep], minlength=n + 1))
        level = deeper
    return most


def _nearest_parts(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Give every pixel of ``mask`` the label of its nearest seed pixel."""
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    return np.where(mask, seeds[iy, ix], 0)


def _split_by_erosion(mask: np.ndarray) -> np.ndarray | None:
    """Part labels of a blob made of objects joined by necks, or None if it is one object: at the first
    erosion level with two or more deep cores, every pixel goes to its nearest core."""
    levels = list(_erosion_levels(mask))
    for k, level in enumerate(levels):
        core_labels, deep = _deep_cores(k, level, levels[k + 1] if k + 1 < len(levels) else None, _SQUARE3)
        if deep.sum() < 2:
            continue
        remap = np.zeros(len(deep), dtype=np.int32)
        remap[deep] = np.arange(1, deep.sum() + 1)
        parts = _nearest_parts(mask, remap[core_labels])
        if np.bincount(parts.ravel())[1:].min() >= MIN_AREA:
            return parts
    return None


def _is_bar(h: int, w: int, area: int) -> bool:
    return max(h, w) >= BAR_ASPECT * min(h, w) and area >= BAR_FILL * h * w


def _cut_bar(mask: np.ndarray) -> np.ndarray | None:
    """Pieces of a filled bar (touching squares in a row), or None if it is no such bar. Two pieces are
    cut where the bar's top or bottom edge steps (squares of different size or height), else in the
    middle; more pieces are cut evenly."""
    ys, xs = np.nonzero(mask)
    h, w = int(np.ptp(ys)) + 1, int(np.ptp(xs)) + 1
    if not _is_bar(h, w, len(ys)):
        return None
    pieces = int(round(max(h, w) / min(h, w)))
    sub = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    sub = sub if w > h else sub.T  # now the bar runs along x
    length = sub.shape[1]
    cuts = [length * i // pieces for i in range(1, pieces)]
    if pieces == 2:
        top = sub.argmax(0)
        bottom = sub.shape[0] - sub[::-1].argmax(0)
        step = np.abs(np.diff(top)) + np.abs(np.diff(bottom))  # step[c - 1]: between columns c - 1 and c
        lo, hi = length // 4, length - length // 4
        c = lo + int(step[lo - 1:hi - 1].argmax())
        if step[c - 1] >= 2:
            cuts = [c]
    piece_of = np.searchsorted(np.asarray(cuts), np.arange(length), side="right") + 1
    parts = np.zeros(mask.shape, dtype=np.int32)
    parts[ys, xs] = piece_of[(xs - xs.min()) if w > h else (ys - ys.min())]
    return parts


def _split_component(mask: np.ndarray, solid: np.ndarray) -> list[np.ndarray]:
    """The object masks inside one suspicious component: by colour, then by erosion, then bars.
    ``solid``: pixel classes where a pixel's 3x3 neighbourhood is all one class, else 0."""
    counts = np.bincount(solid[mask], minlength=_N_CLASSES)
    major = [c for c in range(1, _N_CLASSES) if counts[c] >= MIN_CORE]
    if len(major) >= 2:
        # Seed with each colour's solid pixels; fringe pixels of blended hue go to the nearest.
        seeds = np.zeros(mask.shape, dtype=np.int32)
        for i, c in enumerate(major):
            seeds[mask & (solid == c)] = i + 1
        colour_parts = _nearest_parts(mask, seeds)
        pieces = [colour_parts == i + 1 for i in range(len(major))]
    else:
        pieces = [mask]
    out = []
    for piece in pieces:
        parts = _split_by_erosion(piece)
        subs = [parts == i for i in range(1, parts.max() + 1)] if parts is not None else [piece]
        for sub in subs:
            bar = _cut_bar(sub)
            out.extend([bar == i for i in range(1, bar.max() + 1)] if bar is not None else [sub])
    return out


def _soft_features(labels, n, fg, eroded, sat, bg_sat):
    """Per component, from its soft coverage: fill (area / (widest row x tallest column)), vertical
    skewness, aspect (widest row / tallest column, >= 1), centroid x and y, and height (tallest column)."""
    # Coverage of a pixel: its saturation between the background's and the object's interior level. It
    # counts a half-covered edge pixel as half, so stray noisy edge pixels barely move the features and
    # blur (which conserves coverage) hardly changes them.
    flat_sat = sat.ravel()
    inner = np.where(eroded, labels, 0).ravel()
    n_inner = np.bincount(inner, minlength=n + 1)
    n_all = np.bincount(labels.ravel(), minlength=n + 1)
    level = np.where(n_inner > 0, np.bincount(inner, flat_sat, n + 1) / np.maximum(n_inner, 1),
                     np.bincount(labels.ravel(), flat_sat, n + 1) / np.maximum(n_all, 1))
    # The mask plus a one-pixel ring, where the partly covered edge pixels are (the rendered gap between
    # objects is 3 px, so a ring pixel is never next to two objects).
    soft = np.where(fg, labels, ndimage.grey_dilation(labels, size=(1, 3, 3))).ravel()
    idx = np.flatnonzero(soft)
    lab = soft[idx]
    height, width = labels.shape[1:]
    bg = bg_sat[idx // (height * width)] + SOFT_FLOOR
    cov = np.clip((flat_sat[idx] - bg) / np.maximum(level[lab] - bg, 1e-3), 0.0, 1.0)
    y, x = (idx // width) % height, idx % width
    mass = np.maximum(np.bincount(lab, cov, n + 1), 1e-6)
    rows = np.bincount(lab * height + y, cov, (n + 1) * height).reshape(n + 1, height).max(1)
    cols = np.bincount(lab * width + x, cov, (n + 1) * width).reshape(n + 1, width).max(1)
    fill = mass / np.maximum(rows * cols, 1e-6)
    mean_x = np.bincount(lab, cov * x, n + 1) / mass
    mean_y = np.bincount(lab, cov * y, n + 1) / mass
    dy = y - mean_y[lab]
    var = np.bincount(lab, cov * dy * dy, n + 1) / mass + 1.0 / 12.0  # + 1/12: pixels are not points
    skew = np.bincount(lab, cov * dy ** 3, n + 1) / mass / var ** 1.5
    aspect = np.maximum(rows, cols) / np.maximum(np.minimum(rows, cols), 1e-6)
    return fill, skew, aspect, mean_x + 0.5, mean_y + 0.5, cols


def _shape_of(fill: float, skew: float, aspect: float, size: int) -> str:
    if aspect > MAX_ASPECT or fill < MIN_FILL or size > MAX_SIZE:
        return OTHER
    if skew <= -TRI_SKEW:  # mass towards the bottom (image y grows downwards): an upright triangle
        return "triangle"
    if skew >= TRI_SKEW:
        return OTHER  # an upside-down triangle, which the toy world never draws
    if fill >= SQUARE_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_FILL else OTHER


def _fill_holes(fg: np.ndarray) -> np.ndarray:
    """Foreground plus the background pockets it encloses. A toy object has no holes; a speck on one
    would otherwise make a hole, and eroding a ring breaks it into several cores."""
    background, m = ndimage.label(~fg, structure=_PLANE_CROSS)
    reaches_border = np.zeros(m + 1, dtype=bool)
    for edge in (background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]):
        reaches_border[edge] = True
    return fg | ~reaches_border[background]


def _relabel(labels, n):
    flat = labels.ravel()
    return flat, np.bincount(flat, minlength=n + 1), ndimage.find_objects(labels, max_label=n)


def _class_counts(flat_labels: np.ndarray, classes: np.ndarray, n: int) -> np.ndarray:
    """(n + 1, 5): pixels of each colour class (1..5) in each component."""
    counts = np.bincount(flat_labels * _N_CLASSES + classes.ravel(), minlength=(n + 1) * _N_CLASSES)
    return counts.reshape(n + 1, _N_CLASSES)[:, 1:]


def _detect_chunk(images: np.ndarray) -> list[list[DetectedObject]]:
    classes, sat, bg_sat = _pixel_maps(images)
    fg = _fill_holes(classes > 0)
    labels, n = ndimage.label(fg, structure=_PLANE8)
    flat, area, slices = _relabel(labels, n)
    eroded = ndimage.binary_erosion(fg, structure=_PLANE8)
    # A colour only counts where it is solid (3 px thick): an edge pixel blends its object's colour with
    # the background or a touching neighbour and can take a wrong hue; such fringes are one pixel thin.
    uniform = ndimage.grey_erosion(classes, size=(1, 3, 3)) == ndimage.grey_dilation(classes, size=(1, 3, 3))
    solid = np.where(uniform, classes, 0)

    # Components that may hold several objects: two solid colours, two cores, or a bar.
    suspicious = (_class_counts(flat, solid, n) >= MIN_CORE).sum(1) >= 2
    suspicious |= _count_cores(fg, labels, n) >= 2
    next_label = n + 1
    for i in np.flatnonzero(area[1:] >= MIN_AREA) + 1:
        sl = slices[i - 1]
        window = labels[sl][0]
        if not suspicious[i] and not _is_bar(window.shape[0], window.shape[1], int(area[i])):
            continue
        parts = _split_component(window == i, solid[sl][0])
        if len(parts) < 2:
            continue
        for part in parts:  # replace the component by its parts, under new label numbers
            window[part] = next_label
            next_label += 1
    if next_label > n + 1:
        n = next_label - 1
        flat, area, slices = _relabel(labels, n)

    # Majority vote of the solid pixels; of all pixels for a thin object without any.
    votes = _class_counts(flat, solid, n) * (IMAGE_SIZE * IMAGE_SIZE + 1) + _class_counts(flat, classes, n)
    colour = votes.argmax(1) + 1
    fill, skew, aspect, mean_x, mean_y, height = _soft_features(labels, n, fg, eroded, sat, bg_sat)
    found: list[list[DetectedObject]] = [[] for _ in range(len(images))]
    for i, sl in enumerate(slices, start=1):
        if sl is None or area[i] < MIN_AREA:
            continue
        im, ys, xs = sl
        shape = _shape_of(fill[i], skew[i], aspect[i], max(ys.stop - ys.start, xs.stop - xs.start))
        # The centre of the object's box, from its soft centroid: sub-pixel, unmoved by blur or an attached
        # speck (which would stretch the mask's box). A triangle's centroid is 1/6 of its height below.
        cy = mean_y[i] - (height[i] / 6.0 if shape == "triangle" else 0.0)
        found[im.start].append(DetectedObject(
            CLASS_NAMES[colour[i]], shape, float(mean_x[i]), float(cy),
            (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)), int(area[i]),
            float(fill[i]), float(skew[i]),
        ))
    for objs in found:
        objs.sort(key=lambda o: (o.cx, o.cy))  # reading order, so results do not depend on label order
    return found


def _as_uint8_batch(images) -> np.ndarray:
    """uint8 / [0, 1] float arrays (N, H, W, 3) or (H, W, 3), (N, 3, H, W) tensors, or lists of PIL images
    or arrays -> (N, 64, 64, 3) uint8. Other sizes are resized to 64x64."""
    if hasattr(images, "detach"):  # a torch tensor; not imported here, the judge needs no torch
        images = images.detach().float().cpu().numpy()
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)
    if isinstance(images, (list, tuple)):
        if not images:
            return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        return np.concatenate([_as_uint8_batch(im) for im in images])
    if hasattr(images, "convert"):  # one PIL image
        images = np.asarray(images.convert("RGB"))
    arr = np.asarray(images)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        arr = arr[..., None]  # grey
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"judge: expected images (N, H, W, 3) or (H, W, 3), got shape {arr.shape}")
    arr = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        # Floats are [0, 1]; a float array reaching past 2 can only be 0-255 values in a float dtype.
        scale = 1.0 if arr.size and arr.max() > 2.0 else 255.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    if arr.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        from PIL import Image

        size = (IMAGE_SIZE, IMAGE_SIZE)
        arr = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BOX)) for im in arr])
    return np.ascontiguousarray(arr)


def detect_objects(image) -> list[DetectedObject]:
    """The objects in one image (64, 64, 3), uint8 or float in [0, 1], sorted left to right."""
    return _detect_chunk(_as_uint8_batch(image))[0]


def detect_batch(images) -> list[list[DetectedObject]]:
    batch = _as_uint8_batch(images)
    found: list[list[DetectedObject]] = []
    for start in range(0, len(batch), _CHUNK):
        found.extend(_detect_chunk(batch[start:start + _CHUNK]))
    return found


# ----------------------------------------------------------------------------------------------------
# Verdict


@functools.lru_cache(maxsize=4096)
def _spec(prompt: str) -> PromptSpec:
    return parse_prompt(prompt)


def _relation_term(relation: str, first: DetectedObject, second: DetectedObject) -> float:
    if relation_holds(relation, first, second):
        return 1.0
    dx, dy = second.cx - first.cx, second.cy - first.cy
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    across = dy if relation in ("left of", "right of") else dx
    margin = min(along - 3.0, along - abs(across), 0.0)  # 3.0: relation_holds' min_offset
    # Twice a sigmoid: 1 at the boundary, falling smoothly with the distance to it.
    return min(2.0 / (1.0 + math.exp(-margin / RELATION_SCALE)), 0.999)


def _score(terms: dict, weights: dict) -> float:
    return float(sum(w * terms[k] for k, w in weights.items()) * terms["extras"])


def _extras(n_extra: int) -> float:
    return 1.0 / (1.0 + EXTRA_COST * n_extra)


def _judge_count(spec: PromptSpec, objs: list[DetectedObject]) -> Judgement:
    n = len(objs)
    n_other = sum(o.shape == OTHER for o in objs)  # shapeless blobs: extras, whatever their colour
    n_colour = sum(o.color == spec.color and o.shape != OTHER for o in objs)
    terms = {
        "count": 1.0 / (1.0 + abs(n_colour - spec.count)),  # toy objects of the asked colour, any shape
        "colour": sum(o.color == spec.color for o in objs) / n if n else 0.0,
        "shape": sum(o.shape == spec.shape for o in objs) / n if n else 0.0,
        "relation": 1.0,
        "extras": _extras(max(n - n_other - spec.count, 0) + n_other),
    }
    success = n == spec.count and all(o.color == spec.color and o.shape == spec.shape for o in objs)
    partial = 1.0 if success else min(_score(terms, COUNT_WEIGHTS), 0.999)
    return Judgement(success, partial, objs, {**terms, "n_objects": n, "n_matching_colour": n_colour})


def _judge_relation(spec: PromptSpec, objs: list[DetectedObject]) -> Judgement:
    n = len(objs)
    n_other = sum(o.shape == OTHER for o in objs)
    a, b = spec.first, spec.second
    # The count term only misses objects here: the extras factor already charges for more than two.
    base = {"count": 1.0 / (1.0 + max(2 - (n - n_other), 0)), "extras": _extras(max(n - n_other - 2, 0) + n_other)}
    best = {**base, "colour": 0.0, "shape": 0.0, "relation": 0.0}
    if n == 1:  # half of what is asked, in whichever role the object fits better
        o = objs[0]
        for want in (a, b):
            cand = {**base, "colour": (o.color == want.color) / 2, "shape": (o.shape == want.shape) / 2,
                    "relation": 0.0}
            if _score(cand, RELATION_WEIGHTS) > _score(best, RELATION_WEIGHTS):
                best = cand
    success = False
    for i, p in enumerate(objs):  # the ordered pair of objects that fits the prompt best
        for j, q in enumerate(objs):
            if i == j:
                continue
            colour_ok = (p.color == a.color, q.color == b.color)
            shape_ok = (p.shape == a.shape, q.shape == b.shape)
            cand = {**base, "colour": sum(colour_ok) / 2, "shape": sum(shape_ok) / 2,
                    "relation": _relation_term(spec.relation, p, q)}
            if _score(cand, RELATION_WEIGHTS) > _score(best, RELATION_WEIGHTS):
                best = cand
            success |= n == 2 and all(colour_ok) and all(shape_ok) and cand["relation"] == 1.0
    partial = 1.0 if success else min(_score(best, RELATION_WEIGHTS), 0.999)
    return Judgement(success, partial, objs, {**best, "n_objects": n})


def judge_objects(objects: list[DetectedObject], prompt: str | PromptSpec) -> Judgement:
    """Judge already-detected objects against a prompt."""
    spec = _spec(prompt) if isinstance(prompt, str) else prompt
    return _judge_count(spec, objects) if spec.family == "count" else _judge_relation(spec, objects)


def judge(image, prompt: str) -> Judgement:
    """Judge one image (64, 64, 3), uint8 or float in [0, 1], against a toy-world prompt."""
    return judge_objects(detect_objects(image), prompt)


def judge_batch(images, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, list[Judgement]]:
    """Judge N images against N prompts -> (success bool (N,), partial float32 (N,), judgements).

    ``images``: uint8 array (N, 64, 64, 3), float array in [0, 1], (N, 3, H, W) tensor, or a list of PIL
    images. Raises ``ValueError`` for a prompt outside the toy grammar or a count mismatch."""
    batch = _as_uint8_batch(images)
    if len(batch) != len(prompts):
        raise ValueError(f"judge_batch: {len(batch)} images but {len(prompts)} prompts")
    specs = [_spec(p) for p in prompts]  # a bad prompt fails before any work
    judgements = [judge_objects(objs, s) for objs, s in zip(detect_batch(batch), specs, strict=True)]
    success = np.array([j.success for j in judgements], dtype=bool)
    partial = np.array([j.partial for j in judgements], dtype=np.float32)
    return success, partial, judgements
