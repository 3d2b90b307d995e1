"""The diversity metric as the Vendi score's authors define it, and its pixel embedding."""

import numpy as np
import pytest

from diffalign.metrics import diversity, pixel_embedding, vendi_score
from diffalign.toy.scenes import BACKGROUND


def test_orthogonal_embeddings_score_n_and_identical_score_one():
    for n in (2, 3, 8):
        assert vendi_score(np.eye(n)) == pytest.approx(n)
        assert vendi_score(np.ones((n, 5))) == pytest.approx(1.0)


def test_two_images_are_not_forced_apart():
    # The old metric centred each set on its own mean, so any two images scored exactly 1 (opposite vectors)
    # whatever they showed. Two near-identical images must score near 1, two unrelated ones near 2.
    rng = np.random.default_rng(0)
    a = rng.normal(size=64)
    assert vendi_score(np.stack([a, a + 1e-3 * rng.normal(size=64)])) == pytest.approx(1.0, abs=1e-3)
    b = rng.normal(size=64)
    b -= a * (a @ b) / (a @ a)  # orthogonal to a
    assert vendi_score(np.stack([a, b])) == pytest.approx(2.0)


def test_pair_similarity_does_not_depend_on_the_rest_of_the_set():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 32))
    # The score of a set with a duplicate pair added elsewhere: K's entries among the first 3 are unchanged.
    small, big = vendi_score(x[:3]), vendi_score(np.concatenate([x[:3], x[3:]]))
    assert small < big <= 6 + 1e-9
    k_small = _kernel(x[:3])
    k_big = _kernel(x)[:3, :3]
    np.testing.assert_allclose(k_small, k_big)


def _kernel(x):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def test_pixel_embedding_removes_the_fixed_background():
    blank = np.zeros((2, 64, 64, 3), np.uint8)
    blank[:] = BACKGROUND
    emb = pixel_embedding(blank)
    assert np.abs(emb).max() < 1e-6  # the background alone embeds to zero...
    assert vendi_score(emb) == pytest.approx(1.0)  # ...and two blank images are one image
    # Two different objects on the background: nearly orthogonal, not "alike because of the background".
    imgs = blank.copy()
    imgs[0, 4:20, 4:20] = (200, 30, 30)
    imgs[1, 40:60, 40:60] = (30, 30, 200)
    assert vendi_score(pixel_embedding(imgs)) == pytest.approx(2.0, abs=0.05)
    # Without removing the reference the shared background dominates the cosine.
    assert vendi_score(pixel_embedding(imgs, reference=None)) < 1.2


def test_diversity_is_per_prompt():
    imgs = np.zeros((4, 64, 64, 3), np.uint8)
    imgs[:] = BACKGROUND
    imgs[0, :16, :16] = imgs[1, :16, :16] = (255, 0, 0)  # prompt a: the same image twice
    imgs[2, :16, :16] = (255, 0, 0)
    imgs[3, 48:, 48:] = (0, 0, 255)  # prompt b: two different images
    d = diversity(imgs, ["a", "a", "b", "b"])
    assert d == pytest.approx((1.0 + 2.0) / 2, abs=0.05)


def test_clip_embedding_loads_a_local_model_offline(tmp_path):
    """The semantic embedding for real models, on a tiny random CLIP vision tower saved here (nothing downloaded)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffalign.metrics import clip_embedding

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")
    embed = clip_embedding(str(tmp_path / "clip"))
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    emb = embed(imgs)
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    same = embed(np.stack([imgs[0], imgs[0]]))
    assert vendi_score(same) == pytest.approx(1.0, abs=1e-6)
    assert diversity(imgs, embed=embed) >= 1.0
