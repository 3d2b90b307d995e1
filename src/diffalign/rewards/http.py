"""A user's scoring service over HTTP: the contract is docs/rewards.md (keep the two in step).

Request: ``POST url``, ``Content-Type: application/json``, body
``{"images": [base64 PNG, ...], "prompts": [...], "metadata": [{...}, ...]}`` (standard base64 of the PNG file,
no ``data:`` prefix; RGB, the sampler's resolution).
Response: status 2xx, a JSON object ``{"scores": [number, ...]}`` (optionally ``"info": {...}``), one finite
number per image in request order; what the scores are is checked by ``validate_scores`` (count, null,
booleans, strings, NaN/inf), whose messages name this URL.

Retried: timeouts and transport errors (refused or dropped connections), 408, 429 and every 5xx, up to
``retries`` more attempts, waiting ``backoff * 2**k`` before retry k+1, or what the server's ``Retry-After``
asks (429/503), never more than ``max_wait`` seconds. Not retried: other 4xx (the request is wrong and will
stay wrong) and a 2xx whose body is unusable. Every error names the URL (its password or secret-looking query
values redacted), the status and the start of the body; header values never appear in messages.
"""

from __future__ import annotations

import base64
import email.utils
import io
import time
from datetime import UTC, datetime

import httpx
import numpy as np
from PIL import Image

from ..redact import redact_url
from .base import RewardError, register

RETRIED_STATUSES = frozenset({408, 429})  # and every status >= 500


def encode_png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date (RFC 9110 10.2.3); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class HttpReward:
    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
                 headers: dict[str, str] | None = None, max_wait: float = 60.0, name: str = "http"):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"http reward: url must start with http:// or https:// (got {url!r})")
        self.source = redact_url(url)  # what messages show
        for arg, value, low in (("timeout", timeout, 0.0), ("backoff", backoff, 0.0), ("max_wait", max_wait, 0.0)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low or \
                    (arg == "timeout" and value == 0):
                raise ValueError(f"http reward {self.source}: {arg} must be a number of seconds "
                                 f"{'> 0' if arg == 'timeout' else '>= 0'} (got {value!r})")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"http reward {self.source}: retries must be an integer >= 0 (got {retries!r})")
        headers = dict(headers or {})
        for key, value in headers.items():  # never print a header's value: it is often a credential
            if not isinstance(value, str):
                raise ValueError(f"http reward {self.source}: header {key!r} must be a string "
                                 f"(got {type(value).__name__})")
        self.url, self.timeout, self.retries, self.backoff, self.max_wait = url, timeout, retries, backoff, max_wait
        self.name = name
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def __call__(self, images, prompts, metadata):
        payload = {"images": [encode_png(im) for im in images], "prompts": list(prompts),
                   "metadata": [dict(m) for m in metadata] if metadata else [{} for _ in prompts]}
        last, waited = "", 0.0
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                resp = self._client.post(self.url, json=payload)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g}s"
            except httpx.HTTPError as e:  # refused, reset, dropped mid-answer, bad TLS...
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code < 400:
                    return self._parse(resp)
                last = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                if resp.status_code not in RETRIED_STATUSES and resp.status_code < 500:
                    break
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                if retry_after is not None:
                    last += f" (Retry-After: {resp.headers['Retry-After']})"
            if attempt < self.retries:
                delay = min(self.backoff * 2**attempt if retry_after is None else retry_after, self.max_wait)
                waited += delay
                time.sleep(delay)
        raise RewardError(f"http reward {self.source} failed after {attempt + 1} attempt(s)"
                          f"{f' ({waited:g}s of waiting)' if waited >= 1 else ''}: {last}")

    def _parse(self, resp: httpx.Response):
        try:
            body = resp.json()
        except ValueError:
            raise RewardError(f"http reward {self.source}: response is not JSON: {resp.text[:200]!r}") from None
        if not isinstance(body, dict) or "scores" not in body:
            raise RewardError(f"http reward {self.source}: response must be a JSON object with 'scores', "
                              f"got {str(body)[:200]}")
        if not isinstance(body["scores"], list):
            raise RewardError(f"http reward {self.source}: 'scores' must be a JSON array of numbers, got "
                              f"{str(body['scores'])[:200]}")
        info = body.get("info") if isinstance(body.get("info"), dict) else {}
        return body["scores"], info


@register("http")
def http(url: str, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
         headers: dict[str, str] | None = None, max_wait: float = 60.0) -> HttpReward:
    """A scoring service: POST a JSON batch of base64 PNGs, get {"scores": [...]} (docs/rewards.md)."""
    return HttpReward(url, timeout, retries, backoff, headers, max_wait)
