"""The HTTP reward's edges (docs/rewards.md): every error names the URL; null, booleans and strings are refused
by position and value; 408/429/5xx are retried, honouring Retry-After up to max_wait; other 4xx are not."""

import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from diffalign.config import RewardTerm
from diffalign.rewards import RewardError, build_reward
from diffalign.rewards.http import retry_after_seconds

IMAGES = np.stack([np.full((8, 8, 3), v, dtype=np.uint8) for v in (10, 128, 250)])
PROMPTS = ["one red circle"] * 3
META = [{}] * 3

# path -> (status, extra headers, body); the scores are for 3 images
ANSWERS = {
    "/null": (200, {}, b'{"scores": [0.5, null, 0.1]}'),
    "/bool": (200, {}, b'{"scores": [0.5, 0.2, true]}'),
    "/numeric-string": (200, {}, b'{"scores": ["0.5", 0.2, 0.1]}'),
    "/word": (200, {}, b'{"scores": [0.5, "high", 0.1]}'),
    "/short": (200, {}, b'{"scores": [0.5, 0.2]}'),
    "/nan": (200, {}, b'{"scores": [0.5, 0.2, NaN]}'),
    "/not-a-list": (200, {}, b'{"scores": 0.5}'),
    "/429": (429, {"Retry-After": "0.3"}, b"slow down"),
    "/503-long": (503, {"Retry-After": "3600"}, b"maintenance"),
    "/400": (400, {}, b"bad request"),
}


class _Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}
    times: dict[str, list[float]] = {}

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        path = self.path.split("?")[0]
        type(self).hits[path] = type(self).hits.get(path, 0) + 1
        type(self).times.setdefault(path, []).append(time.monotonic())
        status, headers, body = ANSWERS.get(path, (404, {}, b"no such path"))
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def base_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Handler.hits, _Handler.times = {}, {}
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def _reward(url, **args):
    return build_reward([RewardTerm(name="http", args={"url": url, **args})])


@pytest.mark.parametrize("path, message", [
    ("/null", r"returned null \(None\) at position 1"),
    ("/bool", r"returned the boolean true at position 2"),
    ("/numeric-string", r"returned the string '0.5' at position 0"),
    ("/word", r"returned the string 'high' at position 1"),
    ("/short", r"returned 2 scores for 3 images"),
    ("/nan", r"non-finite scores \(NaN/inf\) at positions \[2\]"),
    ("/not-a-list", r"'scores' must be a JSON array of numbers"),
])
def test_content_errors_name_the_url_the_position_and_the_value(base_url, path, message):
    with pytest.raises(RewardError, match=message) as err:
        _reward(base_url + path, retries=0)(IMAGES, PROMPTS, META, batch="2 of epoch 1")
    assert base_url + path in str(err.value)
    assert _Handler.hits[path] == 1  # a 200 with unusable content is not retried


def test_429_is_retried_after_what_retry_after_asks(base_url):
    with pytest.raises(RewardError, match=r"/429 failed after 2 attempt\(s\).*HTTP 429.*Retry-After: 0.3"):
        _reward(base_url + "/429", retries=1, backoff=0.01)(IMAGES, PROMPTS, META)
    first, second = _Handler.times["/429"]
    assert second - first >= 0.3  # not the 0.01 s backoff


def test_retry_after_is_capped_by_max_wait(base_url):
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"/503-long failed after 3 attempt\(s\).*HTTP 503.*Retry-After: 3600"):
        _reward(base_url + "/503-long", retries=2, backoff=0.01, max_wait=0.1)(IMAGES, PROMPTS, META)
    assert _Handler.hits["/503-long"] == 3
    assert time.monotonic() - t0 < 5  # two waits of max_wait, not an hour


def test_other_4xx_is_not_retried(base_url):
    with pytest.raises(RewardError, match=r"/400 failed after 1 attempt\(s\): HTTP 400"):
        _reward(base_url + "/400", retries=3, backoff=0.01)(IMAGES, PROMPTS, META)
    assert _Handler.hits["/400"] == 1


def test_messages_never_show_a_url_password_or_token(base_url):
    url = base_url.replace("http://", "http://alice:hunter2@") + "/400?api_key=abc123&x=1"
    with pytest.raises(RewardError) as err:
        _reward(url, retries=0)(IMAGES, PROMPTS, META)
    message = str(err.value)
    assert "hunter2" not in message and "abc123" not in message
    assert "alice:<redacted>@127.0.0.1" in message and "x=1" in message


def test_retry_after_forms():
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds("0.5") == 0.5
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


@pytest.mark.parametrize("args, message", [
    ({"timeout": 0}, "timeout must be a number of seconds > 0"),
    ({"retries": -1}, "retries must be an integer >= 0"),
    ({"max_wait": "a minute"}, "max_wait must be a number of seconds >= 0"),
    ({"headers": {"X-Api-Key": 12345}}, "header 'X-Api-Key' must be a string"),
])
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message) as err:
        _reward("http://127.0.0.1:9/score", **args)
    assert "12345" not in str(err.value)  # a header's value is never printed


def test_python_rewards_get_the_same_refusals():
    def bools(images, prompts, metadata):
        return np.array([True, False, True])

    def with_none(images, prompts, metadata):
        return [0.1, 0.2, None]

    from diffalign.rewards import WeightedReward
    with pytest.raises(RewardError, match=r"reward 'b' on batch 1 of epoch 3 returned the boolean true at position 0"):
        WeightedReward([("b", 1.0, bools)])(IMAGES, PROMPTS, META, batch="1 of epoch 3")
    with pytest.raises(RewardError, match=r"returned null \(None\) at position 2"):
        WeightedReward([("n", 1.0, with_none)])(IMAGES, PROMPTS, META, batch="1 of epoch 1")
    ints, _ = WeightedReward([("i", 1.0, lambda im, p, m: [1, 2, np.float32(3)])])(IMAGES, PROMPTS, META)
    assert ints.tolist() == [1.0, 2.0, 3.0]  # numbers of any numeric type still pass
