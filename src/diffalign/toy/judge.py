"""The exact programmatic judge of toy-world scenes: finds the coloured shapes in an image and checks them
against a prompt.

How it decides (details and the reasons for every threshold in ``docs/judge.md``):

1. **Pixels.** Each pixel gets a class from HSV: background when its saturation is low (below 0.30, or
   higher for an image whose own background is tinted) or when it is too dark to have a hue; otherwise
   the nearest of the four colour hues (red, yellow, green, blue), or ``"other"`` when it is more than
   45 degrees from all of them. Hue and saturation do not change with brightness, so this survives
   lighting drift. Done for the whole batch at once in numpy.
2. **Objects.** Foreground pixels are grouped into 8-connected components (one ``scipy.ndimage.label``
   call for the whole batch); components under :data:`MIN_AREA` pixels are specks and ignored. A
   component takes the majority colour of its pixels, which absorbs mis-hued edge pixels. A component
   holding two sizeable colours is split by colour; one whose erosion (by 1-3 pixels) leaves two or more
   cores is two touching objects joined by a neck and is split by giving every pixel to its nearest core;
   a rectangular bar about twice as long as wide is two touching squares and is cut in equal pieces.
3. **Shapes** from two numbers per object: the fill ratio of its bounding box (square ~1, circle ~0.785,
   triangle ~0.5) and how far its centroid sits below its box centre (upright triangle ~1/6 of the
   height, circle and square 0), which keeps triangles apart from circles even when blur rounds them.
4. **Verdict.** ``success`` is exact: count prompts need exactly N objects, all of the asked colour and
   shape; relation prompts need exactly two objects, of the two asked kinds, with
   :func:`~diffalign.toy.scenes.relation_holds` true on their box centres. ``partial`` in [0, 1] is a
   weighted mean of count, colour, shape, relation and extra-object terms; it is 1 exactly on success.
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
HUE_TOL = 45.0  # degrees; the four hues are 47-94 degrees apart, so a drift of a few degrees is harmless

# Objects. The smallest rendered object (an 11 px triangle) covers ~55 px; specks are a few px.
MIN_AREA = 16
MIN_CORE = 3  # px an eroded core needs to count as a separate object
MAX_ERODE = 3  # erosion depths tried; 3 still leaves a core in an 11 px triangle
BAR_ASPECT, BAR_FILL = 1.7, 0.85  # a filled rectangle this elongated is touching squares

# Shapes (docs/judge.md has the measured ranges these sit between).
TRI_OFFSET = 0.07  # centroid below the box centre, in box heights: triangles 0.10-0.17, others |x| < 0.03
TRI_MAX_FILL = 0.80
SQUARE_FILL = 0.88  # between circle (<= 0.83) and square (>= 0.92)
CIRCLE_FILL = 0.62
MIN_FILL, MAX_ASPECT = 0.35, 1.6  # below / above: a smear that is no toy shape

# Partial score.
RELATION_SCALE = 3.0  # px; the relation term halves ~3 px on the wrong side of relation_holds' boundary
COUNT_WEIGHTS = {"count": 0.40, "colour": 0.25, "shape": 0.25, "relation": 0.0, "extras": 0.10}
RELATION_WEIGHTS = {"count": 0.20, "colour": 0.25, "shape": 0.20, "relation": 0.25, "extras": 0.10}

import os
SMOOTH = bool(int(os.environ.get('SMOOTH', '1')))
OPEN = tuple(int(v) for v in os.environ.get('OPEN', '').split(',') if v)
_CHUNK = 256  # images per vectorised pass; bounds memory of the label arrays
_PLANE8 = np.zeros((3, 3, 3), dtype=bool)
_PLANE8[1] = True  # 8-connectivity inside each image, none across the batch axis


@dataclass
class DetectedObject:
    """One object found in an image: colour, shape, box centre (x right, y down, pixels), box
    ``(x0, y0, x1, y1)`` in pixel-edge coordinates (like :attr:`SceneObject.box`) and area in pixels."""

    color: str
    shape: str
    cx: float
    cy: float
    box: tuple[float, float, float, float]
    area: int
    fill: float = field(default=0.0, repr=False)
    offset: float = field(default=0.0, repr=False)


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


def _hue_degrees(r, g, b, mx, chroma):
    c = np.maximum(chroma, 1e-6)
    h = np.where(mx == r, np.mod((g - b) / c, 6.0), np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return h * 60.0


@functools.cache
def _hue_lut() -> np.ndarray:
    """Pixel class for each whole degree of hue: nearest colour hue, or ``other`` beyond HUE_TOL."""
    protos = np.array(list(COLORS.values()), dtype=np.float64) / 255.0
    r, g, b = protos.T
    mx, mn = protos.max(1), protos.min(1)
    proto_hue = _hue_degrees(r, g, b, mx, mx - mn)
    degrees = np.arange(360) + 0.5
    dist = np.abs((degrees[:, None] - proto_hue[None, :] + 180.0) % 360.0 - 180.0)
    lut = (dist.argmin(1) + 1).astype(np.uint8)
    lut[dist.min(1) > HUE_TOL] = _N_CLASSES - 1
    return lut


def classify_pixels(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) float32 in [0, 1] -> (N, H, W) uint8 pixel classes (indices into :data:`CLASS_NAMES`)."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    mx, mn = images.max(-1), images.min(-1)
    chroma = mx - mn
    sat = chroma / np.maximum(mx, 1e-6)
    bg_sat = np.median(sat.reshape(len(images), -1), axis=1)
    threshold = np.clip(bg_sat + SAT_BG_MARGIN, SAT_MIN, SAT_MAX)[:, None, None]
    hue = _hue_degrees(r, g, b, mx, chroma)
    classes = _hue_lut()[np.clip(hue, 0, 359.99).astype(np.int16)]
    if SMOOTH:
        sat = ndimage.correlate1d(sat, [0.25, 0.5, 0.25], axis=1, mode="nearest")
        sat = ndimage.correlate1d(sat, [0.25, 0.5, 0.25], axis=2, mode="nearest")
    fg = (sat >= threshold) & (mx >= VALUE_MIN)
    if OPEN:
        fg = ndimage.binary_opening(fg, structure=np.ones((1,) + OPEN, bool))
    classes[~fg] = 0
    return classes


# ----------------------------------------------------------------------------------------------------
# Objects


def _count_cores(fg: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """For each component, the largest number of cores (>= MIN_CORE px) any erosion depth leaves."""
    most = np.zeros(n + 1, dtype=np.int64)
    core = fg
    for _ in range(MAX_ERODE):
        core = ndimage.binary_erosion(core, structure=_PLANE8)
        core_labels, m = ndimage.label(core, structure=_PLANE8)
        if m == 0:
            break
        sizes = np.bincount(core_labels.ravel(), minlength=m + 1)
        # Which component each core lies in: erosion only shrinks, so any of its pixels tells.
        owner = np.zeros(m + 1, dtype=np.int64)
        owner[core_labels.ravel()] = labels.ravel()
        big = np.flatnonzero(sizes >= MIN_CORE)
        big = big[big > 0]
        most = np.maximum(most, np.bincount(owner[big], minlength=n + 1))
    return most


def _nearest_parts(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Give every pixel of ``mask`` the label of its nearest seed pixel."""
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    return np.where(mask, seeds[iy, ix], 0)


def _split_by_erosion(mask: np.ndarray) -> np.ndarray | None:
    """Part labels of a blob made of objects joined by necks, or None if it is one object."""
    core = mask
    for _ in range(MAX_ERODE):
        core = ndimage.binary_erosion(core, structure=np.ones((3, 3), bool))
        core_labels, m = ndimage.label(core, structure=np.ones((3, 3), bool))
        if m == 0:
            return None
        sizes = np.bincount(core_labels.ravel())
        keep = np.flatnonzero(sizes >= MIN_CORE)
        keep = keep[keep > 0]
        if len(keep) < 2:
            continue
        remap = np.zeros(m + 1, dtype=np.int32)
        remap[keep] = np.arange(1, len(keep) + 1)
        parts = _nearest_parts(mask, remap[core_labels])
        if np.bincount(parts.ravel())[1:].min() >= MIN_AREA:
            return parts
    return None


def _cut_bar(mask: np.ndarray) -> np.ndarray | None:
    """Equal pieces of a filled bar (touching squares in a row), or None if it is no such bar."""
    ys, xs = np.nonzero(mask)
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    if max(h, w) < BAR_ASPECT * min(h, w) or len(ys) < BAR_FILL * h * w:
        return None
    pieces = int(round(max(h, w) / min(h, w)))
    along, start, length = (xs, xs.min(), w) if w > h else (ys, ys.min(), h)
    parts = np.zeros(mask.shape, dtype=np.int32)
    parts[ys, xs] = 1 + np.minimum((along - start) * pieces // length, pieces - 1)
    return parts


def _split_component(mask: np.ndarray, classes: np.ndarray) -> list[np.ndarray]:
    """The object masks inside one suspicious component (see the module docstring for the rules)."""
    counts = np.bincount(classes[mask], minlength=_N_CLASSES)
    major = [c for c in range(1, _N_CLASSES) if counts[c] >= MIN_AREA]
    if len(major) >= 2:
        # Seed with each sizeable colour's own pixels; fringe pixels of blended hue go to the nearest.
        seeds = np.zeros(mask.shape, dtype=np.int32)
        for i, c in enumerate(major):
            seeds[mask & (classes == c)] = i + 1
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


def _shape_of(fill: float, offset: float, aspect: float) -> str:
    if aspect > MAX_ASPECT or fill < MIN_FILL:
        return OTHER
    if offset >= TRI_OFFSET:
        return "triangle" if fill <= TRI_MAX_FILL else OTHER
    if offset <= -TRI_OFFSET:
        return OTHER  # bottom-light: an upside-down triangle, which the toy world never draws
    if fill >= SQUARE_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_FILL else "triangle"  # a blur-rounded triangle loses its offset first


def _shape_fits(labels, n, area):
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    lab = flat[idx]
    h, w = labels.shape[1:]
    y = (idx // w) % h + 0.5
    x = idx % w + 0.5
    a = np.maximum(area, 1).astype(np.float64)
    mx = np.bincount(lab, x, n + 1) / a
    my = np.bincount(lab, y, n + 1) / a
    dx, dy = x - mx[lab], y - my[lab]
    vx = np.bincount(lab, dx * dx, n + 1) / a + 1 / 12
    vy = np.bincount(lab, dy * dy, n + 1) / a + 1 / 12
    skew = np.bincount(lab, dy ** 3, n + 1) / a / vy ** 1.5
    hw, hh = np.sqrt(3 * vx), np.sqrt(3 * vy)
    ins_rect = (np.abs(dx) <= hw[lab]) & (np.abs(dy) <= hh[lab])
    ea, eb = 2 * np.sqrt(vx), 2 * np.sqrt(vy)
    ins_ell = (dx / ea[lab]) ** 2 + (dy / eb[lab]) ** 2 <= 1
    tb, th = np.sqrt(24 * vx), np.sqrt(18 * vy)
    t = (dy + 2 * th[lab] / 3) / th[lab]
    ins_tri = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * tb[lab] / 2)
    areas = np.stack([4 * hw * hh, np.pi * ea * eb, tb * th / 2], 1)
    inter = np.stack([np.bincount(lab, m.astype(np.float64), n + 1) for m in (ins_rect, ins_ell, ins_tri)], 1)
    iou = inter / (a[:, None] + areas - inter)
    return iou, skew


def _detect_chunk(images: np.ndarray) -> list[list[DetectedObject]]:
    classes = classify_pixels(images)
    fg = classes > 0
    labels, n = ndimage.label(fg, structure=_PLANE8)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)
    per_class = np.bincount(flat * _N_CLASSES + classes.ravel(), minlength=(n + 1) * _N_CLASSES)
    per_class = per_class.reshape(n + 1, _N_CLASSES)
    slices = ndimage.find_objects(labels)

    suspicious = np.zeros(n + 1, dtype=bool)
    suspicious[1:] = (per_class[1:, 1:] >= MIN_AREA).sum(1) >= 2
    suspicious |= _count_cores(fg, labels, n) >= 2
    for i, sl in enumerate(slices, start=1):
        if area[i] >= MIN_AREA and not suspicious[i]:
            h, w = sl[1].stop - sl[1].start, sl[2].stop - sl[2].start
            suspicious[i] = max(h, w) >= BAR_ASPECT * min(h, w) and area[i] >= BAR_FILL * h * w
    # Replace each suspicious component by its parts, under new label numbers.
    next_label = n + 1
    for i in np.flatnonzero(suspicious & (area >= MIN_AREA)):
        sl = slices[i - 1]
        mask = labels[sl] == i
        parts = _split_component(mask[0], classes[sl][0])
        if len(parts) < 2:
            continue
        window = labels[sl][0]
        for part in parts:
            window[part] = next_label
            next_label += 1
    if next_label > n + 1:
        n = next_label - 1
        flat = labels.ravel()
        area = np.bincount(flat, minlength=n + 1)
        per_class = np.bincount(flat * _N_CLASSES + classes.ravel(), minlength=(n + 1) * _N_CLASSES)
        per_class = per_class.reshape(n + 1, _N_CLASSES)
        slices = ndimage.find_objects(labels)

    ys = np.broadcast_to(np.arange(images.shape[1], dtype=np.float64)[None, :, None], labels.shape).ravel()
    centroid_y = np.bincount(flat, weights=ys, minlength=n + 1) / np.maximum(area, 1) + 0.5
    ious, skew = _shape_fits(labels, n, area)
    colour = per_class[:, 1:].argmax(1) + 1
    found: list[list[DetectedObject]] = [[] for _ in range(len(images))]
    for i, sl in enumerate(slices, start=1):
        if sl is None or area[i] < MIN_AREA:
            continue
        (im, ysl, xsl) = sl
        y0, y1, x0, x1 = ysl.start, ysl.stop, xsl.start, xsl.stop
        h, w = y1 - y0, x1 - x0
        fill = float(area[i] / (h * w))
        offset = float((centroid_y[i] - (y0 + y1) / 2) / h)
        shape = _shape_of(fill, offset, max(h, w) / min(h, w))
        found[im.start].append(DetectedObject(
            CLASS_NAMES[colour[i]], shape, (x0 + x1) / 2, (y0 + y1) / 2,
            (float(x0), float(y0), float(x1), float(y1)), int(area[i]), fill, offset,
        ))
        found[im.start][-1].ious = ious[i]
        found[im.start][-1].skew = skew[i]
    for objs in found:
        objs.sort(key=lambda o: (o.cx, o.cy))  # reading order, so results do not depend on label order
    return found


def _as_float_batch(images) -> np.ndarray:
    """uint8 / [0, 1] float arrays (N, H, W, 3) or (H, W, 3), (N, 3, H, W) tensors, or lists of PIL images
    or arrays -> (N, 64, 64, 3) float32 in [0, 1]. Other sizes are resized to 64x64."""
    if hasattr(images, "detach"):  # a torch tensor; not imported here, the judge needs no torch
        images = images.detach().float().cpu().numpy()
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)
    if isinstance(images, (list, tuple)):
        images = [_as_float_batch(im)[0] for im in images]
        return np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    if hasattr(images, "convert"):  # one PIL image
        images = np.asarray(images.convert("RGB"))
    arr = np.asarray(images)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        arr = arr[..., None]  # grey
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"judge: expected images (N, H, W, 3) or (H, W, 3), got shape {arr.shape}")
    arr = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr, 3, axis=-1)
    out = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else np.clip(arr.astype(np.float32), 0, 1)
    if out.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        from PIL import Image

        out = np.stack([
            np.asarray(Image.fromarray(np.rint(im * 255).astype(np.uint8)).resize(
                (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0))
            for im in out
        ]).astype(np.float32) / 255.0
    return out


def detect_objects(image) -> list[DetectedObject]:
    """The objects in one image (64, 64, 3), uint8 or float in [0, 1], sorted left to right."""
    return _detect_chunk(_as_float_batch(image))[0]


def detect_batch(images) -> list[list[DetectedObject]]:
    batch = _as_float_batch(images)
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
    return float(sum(weights[k] * terms[k] for k in weights))


def _judge_count(spec: PromptSpec, objs: list[DetectedObject]) -> Judgement:
    n = len(objs)
    n_colour = sum(o.color == spec.color for o in objs)
    terms = {
        "count": 1.0 / (1.0 + abs(n_colour - spec.count)),
        "colour": n_colour / n if n else 0.0,
        "shape": sum(o.shape == spec.shape for o in objs) / n if n else 0.0,
        "relation": 1.0,
        "extras": 1.0 / (1.0 + n - n_colour),
    }
    success = n == spec.count and all(o.color == spec.color and o.shape == spec.shape for o in objs)
    partial = 1.0 if success else min(_score(terms, COUNT_WEIGHTS), 0.999)
    return Judgement(success, partial, objs, {**terms, "n_objects": n, "n_matching_colour": n_colour})


def _judge_relation(spec: PromptSpec, objs: list[DetectedObject]) -> Judgement:
    n = len(objs)
    a, b = spec.first, spec.second
    base = {"count": min(n, 2) / 2, "extras": 1.0 / (1.0 + max(n - 2, 0))}
    best = {**base, "colour": 0.0, "shape": 0.0, "relation": 0.0}
    if n == 1:  # half of the asked objects, in whichever role fits it better
        o = objs[0]
        for want in (a, b):
            cand = {**base, "colour": (o.color == want.color) / 2, "shape": (o.shape == want.shape) / 2,
                    "relation": 0.0}
            if _score(cand, RELATION_WEIGHTS) > _score(best, RELATION_WEIGHTS):
                best = cand
    success = False
    for i, p in enumerate(objs):
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
    found = detect_batch(images)
    if len(found) != len(prompts):
        raise ValueError(f"judge_batch: {len(found)} images but {len(prompts)} prompts")
    judgements = [judge_objects(objs, p) for objs, p in zip(found, prompts)]
    success = np.array([j.success for j in judgements], dtype=bool)
    partial = np.array([j.partial for j in judgements], dtype=np.float32)
    return success, partial, judgements
