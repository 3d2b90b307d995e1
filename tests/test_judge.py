"""Tests of the toy-world judge: exact on freshly rendered scenes, never fooled by a scene of another
prompt, robust to what generated images look like (blur, noise, colour drift, tinted background, specks,
touching objects), and a partial score that orders images sensibly.

Every test is seeded. ``python tests/test_judge.py`` redraws ``docs/judge_hard_cases.png``.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from scipy import ndimage

from diffalign.toy.judge import (
    CLASS_NAMES,
    DetectedObject,
    Judgement,
    classify_pixels,
    detect_batch,
    detect_objects,
    judge,
    judge_batch,
)
from diffalign.toy.scenes import (
    BACKGROUND,
    COLORS,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    SceneObject,
    all_count_prompts,
    all_relation_prompts,
    count_prompt,
    draw,
    parse_prompt,
    relation_prompt,
    render_scene,
)

COUNT_PROMPTS, RELATION_PROMPTS = all_count_prompts(), all_relation_prompts()


def random_prompts(rng: np.random.Generator, n: int) -> list[str]:
    """Half count, half relation prompts (uniform over all prompts would be 92% relation)."""
    return [(COUNT_PROMPTS, RELATION_PROMPTS)[k % 2][int(rng.integers(len((COUNT_PROMPTS, RELATION_PROMPTS)[k % 2])))]
            for k in range(n)]


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(20240611)
    return [render_scene(p, rng) for p in random_prompts(rng, 1000)]


def success_rate(images, scenes) -> float:
    success, _, _ = judge_batch(np.asarray(images), [s.prompt for s in scenes])
    return float(success.mean())


# ----------------------------------------------------------------------------------------------------
# Perturbations: what images from a small diffusion model look like. Each takes and returns (N, 64, 64, 3)
# uint8 and draws its strength per image.


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def blur(images, rng, sigma=(0.7, 1.0)):
    return _u8([ndimage.gaussian_filter(im.astype(np.float32), (s, s, 0))
                for im, s in zip(images, rng.uniform(*sigma, len(images)), strict=True)])


def noise(images, rng, std=8.0):
    return _u8(images + rng.normal(0.0, std, images.shape))


def colour_drift(images, rng, hue_degrees=4.0, saturation=0.15, brightness=0.15):
    """Hue shift of a few degrees, saturation and brightness scaled by up to +-15%, per image."""
    n = len(images)
    hsv = rgb_to_hsv(images / 255.0)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue_degrees, hue_degrees, n)[:, None, None] / 360.0) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - saturation, 1 + saturation, n)[:, None, None], 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(1 - brightness, 1 + brightness, n)[:, None, None], 0, 1)
    return _u8(hsv_to_rgb(hsv) * 255.0)


def tint(images, rng, amplitude=0.08):
    """A slowly varying colour cast: each channel scaled by a gradient of up to +-8% plus an offset."""
    yy, xx = np.mgrid[0:64, 0:64] / 63.0 - 0.5
    n = len(images)
    grad = rng.uniform(-amplitude, amplitude, (n, 2, 3))
    offset = rng.uniform(-amplitude / 2, amplitude / 2, (n, 3))
    field = 1.0 + grad[:, None, None, 0] * xx[None, :, :, None] + grad[:, None, None, 1] * yy[None, :, :, None]
    return _u8(images * (field + offset[:, None, None, :]))


def specks(images, rng, count=(3, 9)):
    """Small faint dots of random colour (radius 0.7-1.6 px, 30-80% opaque) anywhere, on objects too."""
    out = images.astype(np.float32)
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    for im in out:
        for _ in range(int(rng.integers(*count))):
            cx, cy, r = rng.uniform(0, 64), rng.uniform(0, 64), rng.uniform(0.7, 1.6)
            alpha = rng.uniform(0.3, 0.8) * np.clip(r + 0.5 - np.hypot(xx - cx, yy - cy), 0, 1)[..., None]
            im[:] = im * (1 - alpha) + rng.uniform(0, 255, 3) * alpha
    return _u8(out)


def everything(images, rng):
    return specks(noise(blur(tint(colour_drift(images, rng), rng), rng), rng), rng)


# ----------------------------------------------------------------------------------------------------
# Exactness


def test_rendered_scenes_succeed(scenes):
    success, partial, judgements = judge_batch(np.stack([s.image for s in scenes]), [s.prompt for s in scenes])
    print(f"\nrendered scenes: success {success.mean():.4f} on {len(scenes)}")
    assert success.mean() >= 0.99
    assert np.all(partial[success] == 1.0) and np.all(partial[~success] < 1.0)
    assert partial.dtype == np.float32 and success.dtype == bool
    # The detected objects are the drawn ones, with centres within half a pixel.
    for scene, j in zip(scenes[:200], judgements[:200], strict=True):
        drawn = sorted((o.color, o.shape, o.cx, o.cy) for o in scene.objects)
        found = sorted((o.color, o.shape, o.cx, o.cy) for o in j.objects)
        assert [d[:2] for d in drawn] == [f[:2] for f in found], scene.prompt
        assert np.allclose([d[2:] for d in drawn], [f[2:] for f in found], atol=0.5), scene.prompt


def near_miss(prompt: str, rng: np.random.Generator) -> str:
    """A prompt of the same family that differs in one thing and asks for something else."""
    spec = parse_prompt(prompt)
    while True:
        if spec.family == "count":
            count, colour, shape = spec.count, spec.color, spec.shape
            what = rng.integers(3)
            if what == 0:
                count = int(rng.choice([n for n in range(1, len(NUMBER_WORDS) + 1) if n != count]))
            elif what == 1:
                colour = str(rng.choice([c for c in COLORS if c != colour]))
            else:
                shape = str(rng.choice([s for s in SHAPES if s != shape]))
            other = count_prompt(count, colour, shape)
        else:
            first, relation, second = spec.first, spec.relation, spec.second
            what = rng.integers(4)
            if what == 0:
                relation = str(rng.choice([r for r in RELATIONS if r != relation]))
            elif what == 1:
                first, second = second, first  # same relation, objects swapped
            elif what == 2:
                first = ObjectSpec(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
            else:
                second = ObjectSpec(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
            if first == second:
                continue
            other = relation_prompt(first, relation, second)
        if parse_prompt(other).canonical() != spec.canonical():
            return other


def test_scenes_of_another_prompt_fail(scenes):
    rng = np.random.default_rng(7)
    others = [near_miss(s.prompt, rng) for s in scenes]
    success, partial, _ = judge_batch(np.stack([s.image for s in scenes]), others)
    print(f"\nscenes judged against a near-miss prompt: success {success.mean():.4f} on {len(scenes)}")
    assert success.sum() == 0
    assert partial.max() < 1.0


def test_same_meaning_prompt_succeeds():
    rng = np.random.default_rng(3)
    scene = render_scene("a red circle left of a blue square", rng)
    assert judge(scene.image, "a blue square right of a red circle").success
    assert not judge(scene.image, "a blue square left of a red circle").success


# ----------------------------------------------------------------------------------------------------
# Robustness

PERTURBATIONS = {  # name: (perturbation, scenes used, minimum success rate)
    "blur sigma 0.7-1.0": (blur, 300, 0.99),
    "noise std 8": (noise, 300, 0.99),
    "blur + noise": (lambda im, rng: noise(blur(im, rng), rng), 300, 0.99),
    "colour drift": (colour_drift, 300, 0.99),
    "tinted background": (tint, 300, 0.99),
    "faint specks": (specks, 300, 0.98),
    "all of the above": (everything, 400, 0.97),
}


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_robust_to(name, scenes):
    perturb, n, minimum = PERTURBATIONS[name]
    index = list(PERTURBATIONS).index(name)
    rng = np.random.default_rng(index)
    start = 100 * index % (len(scenes) - n)  # a different slice of the scenes for each perturbation
    chosen = scenes[start:start + n]
    rate = success_rate(perturb(np.stack([s.image for s in chosen]), rng), chosen)
    print(f"\n{name}: success {rate:.4f} on {n}")
    assert rate >= minimum


def test_specks_alone_are_no_objects():
    rng = np.random.default_rng(11)
    blank = np.empty((50, 64, 64, 3), dtype=np.uint8)
    blank[:] = BACKGROUND
    images = noise(specks(blank, rng, count=(5, 15)), rng)
    assert sum(len(objs) for objs in detect_batch(images)) == 0


def test_garbage_never_succeeds():
    """Pixel noise, random colour blotches and flat colour fields: no prompt succeeds, and a scatter of
    blobs scores low even where two of them would fit a relation prompt."""
    rng = np.random.default_rng(13)
    pixel_noise = rng.integers(0, 256, (60, 64, 64, 3), dtype=np.uint8)
    field = ndimage.gaussian_filter(rng.uniform(0, 255, (60, 64, 64, 3)), (0, 5, 5, 0))
    blotches = _u8((field - field.mean(axis=(1, 2, 3), keepdims=True)) * 10 + 200)
    flat = np.stack([np.full((64, 64, 3), c, np.uint8) for c in COLORS.values()])
    for images in (pixel_noise, blotches, flat):
        success, partial, _ = judge_batch(images, random_prompts(rng, len(images)))
        assert not success.any()
        assert partial.max() < 0.6


def test_each_shape_and_colour_alone():
    rng = np.random.default_rng(5)
    for colour in COLORS:
        for shape in SHAPES:
            for size in (11.0, 15.0, 19.0):
                image = draw([SceneObject(colour, shape, rng.uniform(16, 48), rng.uniform(16, 48), size)])
                for im in (image, blur(image[None], rng)[0]):
                    objs = detect_objects(im)
                    assert [(o.color, o.shape) for o in objs] == [(colour, shape)], (colour, shape, size)


def touching(shape_a, shape_b, colour_a, colour_b, size_a, size_b, angle, overlap=0.5, y=32.0):
    """Two objects that touch (overlap by ``overlap`` px), the second in the direction ``angle`` (degrees,
    counter-clockwise from the right): circles rim to rim, other shapes box to box."""
    a = SceneObject(colour_a, shape_a, 22.0, y, size_a)
    dist = (size_a + size_b) / 2 - overlap
    t = np.radians(angle)
    if not shape_a == shape_b == "circle":
        dist /= max(abs(np.cos(t)), abs(np.sin(t)))  # boxes meet where their projections on an axis do
    return [a, SceneObject(colour_b, shape_b, 22.0 + dist * np.cos(t), y - dist * np.sin(t), size_b)]


@pytest.mark.parametrize("sigma", [0.0, 0.8])
def test_touching_same_colour_circles_count_two(sigma):
    found = []
    for size_a, size_b, angle in [(14, 14, 0), (12, 17, 0), (16, 13, 45), (14, 14, -30), (18, 11, 10),
                                  (13, 13, 60), (15, 15, 0), (11, 12, 0)]:
        image = draw(touching("circle", "circle", "green", "green", size_a, size_b, angle, y=36.0))
        if sigma:
            image = ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))
            image = _u8(image)
        objs = detect_objects(image)
        found.append(len(objs))
        assert [(o.color, o.shape) for o in objs] == [("green", "circle")] * 2, (size_a, size_b, angle, objs)
    assert found == [2] * len(found)
    assert judge(image, "two green circles").success


@pytest.mark.parametrize("shapes", [("triangle", "triangle"), ("circle", "square"), ("square", "triangle"),
                                    ("square", "square")])
def test_touching_same_colour_objects_count_two(shapes):
    counts = []
    for size_a, size_b in [(14, 14), (12, 17), (17, 12), (15, 13)]:
        for dy in (-2.0, 0.0, 2.0):
            objs = touching(*shapes, "blue", "blue", size_a, size_b, 0)
            objs[1].cy += dy
            counts.append(len(detect_objects(draw(objs))))
    assert counts == [2] * len(counts)


def test_touching_different_colours_split_by_colour():
    rng = np.random.default_rng(2)
    for colour_a, colour_b in [("red", "green"), ("red", "blue"), ("yellow", "blue"), ("red", "yellow")]:
        for shape_a, shape_b in [("circle", "square"), ("square", "square"), ("triangle", "circle")]:
            image = draw(touching(shape_a, shape_b, colour_a, colour_b, 15, 14, rng.uniform(-20, 20)))
            objs = detect_objects(image)
            assert sorted((o.color, o.shape) for o in objs) == sorted([(colour_a, shape_a), (colour_b, shape_b)])


# ----------------------------------------------------------------------------------------------------
# Partial score


def partial_of(objects: list[SceneObject], prompt: str) -> float:
    j = judge(draw(objects), prompt)
    assert 0.0 <= j.partial <= 1.0 and (j.partial == 1.0) == j.success
    return j.partial


def test_partial_orders_count_images():
    spots = [(14, 14), (44, 16), (24, 46)]
    def scene(colour, shape, n, extra=()):
        return [SceneObject(colour, shape, x, y, 14) for x, y in spots[:n]] + list(extra)

    prompt = "three blue squares"
    empty = partial_of([], prompt)
    wrong_both = partial_of(scene("red", "circle", 3), prompt)
    wrong_colour = partial_of(scene("red", "square", 3), prompt)
    wrong_shape = partial_of(scene("blue", "circle", 3), prompt)
    one, two, three = (partial_of(scene("blue", "square", n), prompt) for n in (1, 2, 3))
    assert three == 1.0
    assert one < two < three
    assert wrong_both < wrong_colour < two
    assert two - wrong_colour >= 0.3  # a wrong count with the right kind is clearly better than a wrong colour
    assert wrong_both < wrong_shape < three and empty < two
    extra = [SceneObject("red", "circle", 50, 50, 12)]
    with_extra = partial_of(scene("blue", "square", 3, extra), prompt)
    with_two_extra = partial_of(scene("blue", "square", 3, extra + [SceneObject("green", "triangle", 50, 34, 11)]),
                                prompt)
    assert with_two_extra < with_extra < 1.0
    four = partial_of(scene("blue", "square", 3, [SceneObject("blue", "square", 50, 50, 12)]), prompt)
    assert wrong_colour < four < 1.0


def test_partial_rises_as_the_relation_comes_true():
    prompt = "a red circle left of a blue square"
    xs = np.arange(6.0, 60.0, 2.0)
    partials = [partial_of([SceneObject("red", "circle", 24, 18, 14), SceneObject("blue", "square", x, 46, 14)],
                           prompt) for x in xs]
    assert np.all(np.diff(partials) >= -1e-9)
    assert partials[0] < 0.8 and partials[-1] == 1.0
    # Smooth: no single 2 px step closes more than a third of the gap.
    assert np.max(np.diff(partials)) <= (partials[-1] - partials[0]) / 3
    # Wrong kinds score lower than the right kinds, wherever they stand.
    wrong_colour = partial_of([SceneObject("green", "circle", 16, 32, 14), SceneObject("blue", "square", 48, 32, 14)],
                              prompt)
    only_one = partial_of([SceneObject("red", "circle", 16, 32, 14)], prompt)
    assert only_one < wrong_colour < 1.0
    assert partial_of([], prompt) < only_one


def test_judgement_details():
    j = judge(draw([SceneObject("blue", "square", 20, 20, 14)]), "two blue squares")
    assert isinstance(j, Judgement) and not j.success
    assert set(j.details) >= {"count", "colour", "shape", "relation", "extras"}
    assert j.details["count"] == 0.5 and j.details["colour"] == 1.0 and j.details["shape"] == 1.0
    obj = j.objects[0]
    assert isinstance(obj, DetectedObject) and obj.color == "blue" and obj.shape == "square"
    assert obj.box == pytest.approx((13, 13, 27, 27), abs=1.0) and (obj.cx, obj.cy) == pytest.approx((20, 20), abs=0.6)
    assert 14 * 14 - 20 <= obj.area <= 14 * 14 + 20


# ----------------------------------------------------------------------------------------------------
# Inputs


def test_input_formats_agree(scenes):
    from PIL import Image

    chosen = scenes[:16]
    images = np.stack([s.image for s in chosen])
    prompts = [s.prompt for s in chosen]
    reference = judge_batch(images, prompts)[1]
    assert np.array_equal(judge_batch(images / 255.0, prompts)[1], reference)
    assert np.array_equal(judge_batch(images.astype(np.float32) / 255.0, prompts)[1], reference)
    assert np.array_equal(judge_batch([Image.fromarray(im) for im in images], prompts)[1], reference)
    assert np.array_equal(judge_batch(list(images), prompts)[1], reference)
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    assert np.array_equal(judge_batch(tensor, prompts)[1], reference)
    assert judge(images[0] / 255.0, prompts[0]).partial == reference[0]
    # A bigger image is resized to 64x64 first.
    big = np.asarray(Image.fromarray(images[0]).resize((128, 128), Image.Resampling.NEAREST))
    assert judge(big, prompts[0]).success == judge(images[0], prompts[0]).success
    assert classify_pixels(images).shape == (16, 64, 64) and CLASS_NAMES[0] == "background"


def test_empty_batch_and_errors():
    success, partial, judgements = judge_batch(np.zeros((0, 64, 64, 3), np.uint8), [])
    assert success.shape == partial.shape == (0,) and judgements == []
    image = np.full((64, 64, 3), 240, np.uint8)
    with pytest.raises(ValueError, match="2 prompts"):
        judge_batch(image[None], ["one red circle", "one red circle"])
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        judge(image, "a cat")
    with pytest.raises(ValueError, match="expected images"):
        judge_batch(np.zeros((2, 3, 4, 5, 6), np.uint8), ["one red circle"] * 2)
    assert judge(image, "one red circle").objects == []


# ----------------------------------------------------------------------------------------------------
# The figure of hard cases in docs/judge.md


def save_hard_cases(path: str = "docs/judge_hard_cases.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    cases = []

    def add(title, image, prompt):
        cases.append((title, image, prompt))

    pair = touching("circle", "circle", "green", "green", 15, 13, 20)
    add("touching circles", draw(pair), "two green circles")
    add("touching circles, blur 1", blur(draw(pair)[None], rng, (1.0, 1.0))[0], "two green circles")
    add("circle + square touching", draw(touching("circle", "square", "red", "red", 16, 12, 0)),
        "a red circle left of a red square")
    scene = render_scene("three yellow triangles", rng)
    add("heavy blur 1.5", blur(scene.image[None], rng, (1.5, 1.5))[0], scene.prompt)
    add("heavy blur 2.5", blur(scene.image[None], rng, (2.5, 2.5))[0], scene.prompt)
    scene = render_scene("a blue circle above a red square", rng)
    background = np.array(BACKGROUND, np.float32)
    for alpha in (0.5, 0.4):
        add(f"faint: {alpha:.0%} strength", _u8(background + alpha * (scene.image - background)), scene.prompt)
    small = draw([SceneObject("blue", "triangle", 20, 22, 11.0), SceneObject("blue", "triangle", 44, 42, 11.5)])
    for sigma in (1.0, 2.0):
        add(f"small triangles, blur {sigma:g}", blur(small[None], rng, (sigma, sigma))[0], "two blue triangles")
    scene = render_scene("four red circles", rng)
    add("all perturbations", everything(scene.image[None], rng)[0], scene.prompt)

    cols = 5
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.5 * rows))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, image, prompt) in zip(axes.ravel(), cases, strict=False):
        j = judge(image, prompt)
        ax.imshow(image, interpolation="nearest")
        found = ", ".join(f"{o.color} {o.shape}" for o in j.objects) or "nothing"
        verdict = "SUCCESS" if j.success else "fail"
        ax.set_title(f"{title}\n'{prompt}'\n{verdict}, partial {j.partial:.2f}\nfound: {found}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    save_hard_cases()
