"""The toy world: procedurally drawn 64x64 scenes of coloured shapes, with captions and structured specs.

Two prompt families:

* **count** - 1-4 objects of one shape and one colour: ``"three blue squares"``, ``"one red circle"``.
* **relation** - exactly two different objects in a spatial relation:
  ``"a red circle left of a blue square"`` (left of, right of, above, below).

A prompt parses into a :class:`PromptSpec`; :func:`render_scene` draws a random scene that satisfies a spec
(seeded, deterministic), returning the image and the list of drawn :class:`SceneObject`.

Drawing is done on a 4x supersampled canvas and box-filtered down, so edges are anti-aliased like real
images. Objects never overlap and keep a small gap, so every rendered scene is unambiguous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64
SUPERSAMPLE = 4
BACKGROUND = (242, 242, 236)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (40, 165, 65),
    "blue": (45, 85, 215),
    "yellow": (235, 195, 35),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("one", "two", "three", "four")
# The relation that states the same fact with the two objects swapped.
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str

    def phrase(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for. ``family`` is ``"count"`` or ``"relation"``."""

    family: str
    count: int = 0
    color: str = ""
    shape: str = ""
    first: ObjectSpec | None = None
    relation: str = ""
    second: ObjectSpec | None = None

    def canonical(self) -> tuple:
        """A key equal for prompts that ask for the same thing ("A left of B" == "B right of A")."""
        if self.family == "count":
            return ("count", self.count, self.color, self.shape)
        if self.relation in ("right of", "below"):
            return ("relation", self.second, INVERSE_RELATION[self.relation], self.first)
        return ("relation", self.first, self.relation, self.second)


@dataclass
class SceneObject:
    """One drawn object: its kind, centre (x right, y down, pixels) and size (bounding-box side)."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass
class Scene:
    prompt: str
    spec: PromptSpec
    objects: list[SceneObject] = field(default_factory=list)
    image: np.ndarray | None = None  # (64, 64, 3) uint8


def count_prompt(count: int, color: str, shape: str) -> str:
    noun = shape if count == 1 else shape + "s"
    return f"{NUMBER_WORDS[count - 1]} {color} {noun}"


def relation_prompt(first: ObjectSpec, relation: str, second: ObjectSpec) -> str:
    return f"a {first.phrase()} {relation} a {second.phrase()}"


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_COUNT_RE = re.compile(rf"^({'|'.join(NUMBER_WORDS)}) ({_COLOR}) ({_SHAPE})s?$")
_REL_RE = re.compile(rf"^an? ({_COLOR}) ({_SHAPE}) ({'|'.join(RELATIONS)}) an? ({_COLOR}) ({_SHAPE})$")


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a toy-world prompt. Raises ``ValueError`` naming the accepted grammar if it does not fit."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    m = _COUNT_RE.match(text)
    if m:
        count = NUMBER_WORDS.index(m.group(1)) + 1
        plural = text.endswith("s")
        if (count == 1) == plural:
            raise ValueError(f"prompt {prompt!r}: number and noun disagree (say 'one red circle', 'two red circles')")
        return PromptSpec("count", count=count, color=m.group(2), shape=m.group(3))
    m = _REL_RE.match(text)
    if m:
        first, second = ObjectSpec(m.group(1), m.group(2)), ObjectSpec(m.group(4), m.group(5))
        if first == second:
            raise ValueError(f"prompt {prompt!r}: a relation needs two different objects")
        return PromptSpec("relation", first=first, relation=m.group(3), second=second)
    raise ValueError(
        f"prompt {prompt!r} is not a toy-world prompt: use '<one..four> <colour> <shape>(s)' or "
        f"'a <colour> <shape> <left of|right of|above|below> a <colour> <shape>', "
        f"colours {list(COLORS)}, shapes {list(SHAPES)}"
    )


def all_count_prompts() -> list[str]:
    return [count_prompt(n, c, s) for n in range(1, 5) for c in COLORS for s in SHAPES]


def all_relation_prompts() -> list[str]:
    objs = [ObjectSpec(c, s) for c in COLORS for s in SHAPES]
    return [relation_prompt(a, r, b) for a in objs for b in objs if a != b for r in RELATIONS]


# ----------------------------------------------------------------------------------------------------
# Drawing


def _shape_mask(shape: str, cx: float, cy: float, size: float, grid_x: np.ndarray, grid_y: np.ndarray) -> np.ndarray:
    """Boolean mask of one shape on the supersampled grid (coordinates in output pixels)."""
    h = size / 2
    if shape == "circle":
        return (grid_x - cx) ** 2 + (grid_y - cy) ** 2 <= h * h
    if shape == "square":
        return (np.abs(grid_x - cx) <= h) & (np.abs(grid_y - cy) <= h)
    if shape == "triangle":
        # Upright isosceles triangle filling its bounding box: apex at top centre, base at the bottom.
        top, bottom = cy - h, cy + h
        frac = (grid_y - top) / size  # 0 at the apex, 1 at the base
        return (grid_y >= top) & (grid_y <= bottom) & (np.abs(grid_x - cx) <= frac * h)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


_SS = IMAGE_SIZE * SUPERSAMPLE
_GRID_Y, _GRID_X = (np.mgrid[0:_SS, 0:_SS].astype(np.float32) + 0.5) / SUPERSAMPLE


def draw(objects: list[SceneObject], background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """Draw objects onto a plain background; returns a (64, 64, 3) uint8 anti-aliased image."""
    canvas = np.empty((_SS, _SS, 3), dtype=np.float32)
    canvas[:] = background
    for obj in objects:
        # Only touch the object's bounding window: drawing stays cheap with many objects.
        x0 = max(int((obj.cx - obj.size / 2 - 1) * SUPERSAMPLE), 0)
        x1 = min(int((obj.cx + obj.size / 2 + 1) * SUPERSAMPLE) + 1, _SS)
        y0 = max(int((obj.cy - obj.size / 2 - 1) * SUPERSAMPLE), 0)
        y1 = min(int((obj.cy + obj.size / 2 + 1) * SUPERSAMPLE) + 1, _SS)
        mask = _shape_mask(obj.shape, obj.cx, obj.cy, obj.size, _GRID_X[y0:y1, x0:x1], _GRID_Y[y0:y1, x0:x1])
        canvas[y0:y1, x0:x1][mask] = COLORS[obj.color]
    small = canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Placement

MIN_SIZE, MAX_SIZE = 11.0, 19.0
MARGIN = 2.0  # from the image border
GAP = 3.0  # between objects' bounding boxes, so that rendered scenes never touch


def _fits(box: tuple[float, float, float, float], placed: list[SceneObject]) -> bool:
    x0, y0, x1, y1 = box
    for other in placed:
        a0, b0, a1, b1 = other.box
        if x0 < a1 + GAP and a0 < x1 + GAP and y0 < b1 + GAP and b0 < y1 + GAP:
            return False
    return True


def _random_object(rng: np.random.Generator, color: str, shape: str, size_range: tuple[float, float],
                   placed: list[SceneObject], region=None, tries: int = 200) -> SceneObject | None:
    for _ in range(tries):
        size = float(rng.uniform(*size_range))
        lo, hi = MARGIN + size / 2, IMAGE_SIZE - MARGIN - size / 2
        cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        obj = SceneObject(color, shape, cx, cy, size)
        if region is not None and not region(obj):
            continue
        if _fits(obj.box, placed):
            return obj
    return None


def relation_holds(relation: str, first: SceneObject, second: SceneObject, min_offset: float = 3.0) -> bool:
    """``first <relation> second``, judged on centres: the offset along the relation's axis has the right
    sign, is at least ``min_offset`` pixels, and is larger than the offset across it."""
    dx, dy = second.cx - first.cx, second.cy - first.cy  # image y grows downwards
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    across = dy if relation in ("left of", "right of") else dx
    return along >= min_offset and along > abs(across)


def render_scene(prompt: str | PromptSpec, rng: np.random.Generator | int) -> Scene:
    """Draw a random scene that satisfies ``prompt``. ``rng`` is a numpy Generator or a seed."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    text = prompt if isinstance(prompt, str) else _spec_prompt(spec)
    for _ in range(100):
        objects = _place(spec, rng)
        if objects is not None:
            return Scene(text, spec, objects, draw(objects))
    raise RuntimeError(f"could not place a scene for {text!r}")  # not reached with the size ranges above


def _spec_prompt(spec: PromptSpec) -> str:
    if spec.family == "count":
        return count_prompt(spec.count, spec.color, spec.shape)
    return relation_prompt(spec.first, spec.relation, spec.second)


def _place(spec: PromptSpec, rng: np.random.Generator) -> list[SceneObject] | None:
    placed: list[SceneObject] = []
    if spec.family == "count":
        # Four objects need smaller sizes to fit with gaps in 64x64.
        size_range = (MIN_SIZE, MAX_SIZE - 2.0 * max(spec.count - 2, 0))
        for _ in range(spec.count):
            obj = _random_object(rng, spec.color, spec.shape, size_range, placed)
            if obj is None:
                return None
            placed.append(obj)
        return placed
    first = _random_object(rng, spec.first.color, spec.first.shape, (MIN_SIZE, MAX_SIZE), placed)
    if first is None:
        return None
    placed.append(first)
    second = _random_object(
        rng, spec.second.color, spec.second.shape, (MIN_SIZE, MAX_SIZE), placed,
        # A clear margin over the judge's threshold, so every rendered relation is unambiguous.
        region=lambda o: relation_holds(spec.relation, first, o, min_offset=8.0)
        and relation_holds(spec.relation, first, o) and _clear_relation(spec.relation, first, o),
    )
    if second is None:
        return None
    return [first, second]


def _clear_relation(relation: str, first: SceneObject, second: SceneObject) -> bool:
    dx, dy = second.cx - first.cx, second.cy - first.cy
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    across = dy if relation in ("left of", "right of") else dx
    return along >= 1.5 * abs(across)


def random_prompt(rng: np.random.Generator, prompts: list[str]) -> str:
    return prompts[int(rng.integers(len(prompts)))]
