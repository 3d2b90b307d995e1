import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from diffalign.config import RewardTerm
from diffalign.rewards import RewardError, RewardPool, build_reward
from diffalign.rewards.http import HttpReward

IMAGES = np.stack([np.full((64, 64, 3), v, dtype=np.uint8) for v in (10, 128, 250)])
PROMPTS = ["one red circle"] * 3
META = [{}] * 3


def test_jpeg_rewards_have_opposite_signs_and_rank_noise_as_incompressible():
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    flat = np.full((2, 64, 64, 3), 200, dtype=np.uint8)
    images = np.concatenate([noisy, flat])
    comp, _ = build_reward([RewardTerm(name="jpeg_compressibility")])(images, PROMPTS + ["x"], [{}] * 4)
    incomp, _ = build_reward([RewardTerm(name="jpeg_incompressibility")])(images, PROMPTS + ["x"], [{}] * 4)
    np.testing.assert_allclose(comp, -incomp)
    assert comp[2:].min() > comp[:2].max()  # flat images compress better


def test_python_reward_and_weighted_sum():
    reward = build_reward([
        RewardTerm(name="python", weight=2.0, args={"function": "tests.helpers.user_rewards:brightness"}),
        RewardTerm(name="jpeg_compressibility", weight=0.0),
    ])
    total, info = reward(IMAGES, PROMPTS, META)
    np.testing.assert_allclose(total, 2 * IMAGES.reshape(3, -1).mean(1) / 255.0)
    assert "python" in info and "jpeg_compressibility" in info


def test_python_reward_from_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def score(images, prompts, metadata):\n    return [len(p) for p in prompts]\n")
    total, _ = build_reward([RewardTerm(name="python", args={"function": f"{f}:score"})])(IMAGES, PROMPTS, META)
    assert list(total) == [14.0] * 3


@pytest.mark.parametrize("fn, message", [
    ("returns_nan", r"non-finite scores \(NaN/inf\) at positions \[0\]"),
    ("wrong_count", "returned 4 scores for 3 images"),
    ("raises", "raised on batch 7.1: RuntimeError: scoring backend unavailable"),
])
def test_bad_reward_output_names_reward_and_batch(fn, message):
    reward = build_reward([RewardTerm(name="python", args={"function": f"tests.helpers.user_rewards:{fn}"})])
    with pytest.raises(RewardError, match=message) as err:
        reward(IMAGES, PROMPTS, META, batch="7.1")
    assert "python" in str(err.value)


def test_unknown_reward_and_bad_args_are_explained():
    with pytest.raises(ValueError, match="choose one of"):
        build_reward([RewardTerm(name="nope")])
    with pytest.raises(ValueError, match=r"\['qualty'\] not accepted by reward 'jpeg_compressibility'"):
        build_reward([RewardTerm(name="jpeg_compressibility", args={"qualty": 3})])


def test_reward_pool_runs_in_background_and_keeps_order():
    calls = []

    def slow(images, prompts, metadata):
        time.sleep(0.2)
        calls.append(prompts[0])
        return [float(len(prompts[0]))] * len(prompts)

    slow.name = "slow"
    from diffalign.rewards import WeightedReward
    pool = RewardPool(WeightedReward([("slow", 1.0, slow)]), workers=1)
    t0 = time.perf_counter()
    futures = [pool.submit(IMAGES, [p] * 3, META, batch=i) for i, p in enumerate(["a", "bb", "ccc"])]
    submitted = time.perf_counter() - t0
    results = [f.result()[0][0] for f in futures]
    pool.close()
    assert submitted < 0.15  # submit does not wait for scoring
    assert results == [1.0, 2.0, 3.0]


# ---------------------------------------------------------------------------------------------------
# HTTP reward against a local server


class _Handler(BaseHTTPRequestHandler):
    mode = "ok"
    hits = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        type(self).hits += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")
            return
        if self.mode == "slow":
            time.sleep(1.0)
        payload = b"not json" if self.mode == "badjson" else json.dumps(
            {"scores": [float(len(p)) for p in body["prompts"]], "info": {"n": len(body["images"])}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    _Handler.hits = 0
    yield srv
    srv.shutdown()


def test_http_reward_roundtrip(server):
    _Handler.mode = "ok"
    url = f"http://127.0.0.1:{server.server_port}/score"
    scores, info = HttpReward(url)(IMAGES, ["a", "bb", "ccc"], META)
    assert scores == [1.0, 2.0, 3.0] and info == {"n": 3}


def test_http_reward_500_is_retried_then_named(server):
    _Handler.mode = "500"
    url = f"http://127.0.0.1:{server.server_port}/score"
    with pytest.raises(RewardError, match=rf"{url} failed after 3 attempt\(s\): HTTP 500"):
        HttpReward(url, retries=2, backoff=0.01)(IMAGES, PROMPTS, META)
    assert _Handler.hits == 3


def test_http_reward_timeout_and_bad_json(server):
    url = f"http://127.0.0.1:{server.server_port}/score"
    _Handler.mode = "slow"
    with pytest.raises(RewardError, match="timed out after 0.2s"):
        HttpReward(url, timeout=0.2, retries=0)(IMAGES, PROMPTS, META)
    _Handler.mode = "badjson"
    with pytest.raises(RewardError, match="response is not JSON"):
        HttpReward(url, retries=0)(IMAGES, PROMPTS, META)


def test_http_reward_rejects_non_http_url():
    with pytest.raises(ValueError, match="must start with http"):
        HttpReward("ftp://x")


# ---------------------------------------------------------------------------------------------------
# Aesthetic predictor, offline with a tiny random CLIP


def test_aesthetic_reward_with_tiny_local_clip(tmp_path):
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffalign.rewards.aesthetic import AestheticMLP

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    save_file(AestheticMLP(16).state_dict(), str(tmp_path / "mlp.safetensors"))
    reward = build_reward([RewardTerm(name="aesthetic", args={
        "clip_model": str(tmp_path / "clip"), "mlp_path": str(tmp_path / "mlp.safetensors")})])
    scores, _ = reward(IMAGES, PROMPTS, META)
    assert scores.shape == (3,) and np.isfinite(scores).all() and len(set(np.round(scores, 6))) == 3
    with pytest.raises(ValueError, match="mlp_path"):
        build_reward([RewardTerm(name="aesthetic", args={"clip_model": str(tmp_path / "clip"), "mlp_path": "nope.pth"})])
