"""A user's scoring service over HTTP.

Request: ``POST url`` with JSON ``{"images": [base64 PNG, ...], "prompts": [...], "metadata": [...]}``.
Response: JSON ``{"scores": [float, ...]}`` (optionally ``"info": {...}``), one score per image.
Timeouts and 5xx/connection errors are retried with exponential backoff; a 4xx is not (the request is
wrong and will stay wrong). The final error names the URL, the status and the start of the body.
"""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
from PIL import Image

from .base import RewardError, register


def encode_png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class HttpReward:
    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
                 headers: dict[str, str] | None = None, name: str = "http"):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"http reward: url must start with http:// or https:// (got {url!r})")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.headers = headers or {}
        self.name = name
        self._client = httpx.Client(timeout=timeout, headers=self.headers)

    def __call__(self, images, prompts, metadata):
        payload = {"images": [encode_png(im) for im in images], "prompts": list(prompts),
                   "metadata": [dict(m) for m in metadata] if metadata else [{} for _ in prompts]}
        last = ""
        for attempt in range(self.retries + 1):
            try:
                resp = self._client.post(self.url, json=payload)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout:g}s"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code < 400:
                    return self._parse(resp)
                last = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                if resp.status_code < 500:
                    break
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise RewardError(f"http reward {self.url} failed after {attempt + 1} attempt(s): {last}")

    def _parse(self, resp: httpx.Response):
        try:
            body = resp.json()
        except ValueError:
            raise RewardError(f"http reward {self.url}: response is not JSON: {resp.text[:200]!r}") from None
        if not isinstance(body, dict) or "scores" not in body:
            raise RewardError(f"http reward {self.url}: response must be a JSON object with 'scores', got {str(body)[:200]}")
        info = body.get("info") if isinstance(body.get("info"), dict) else {}
        return body["scores"], info


@register("http")
def http(url: str, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
         headers: dict[str, str] | None = None) -> HttpReward:
    return HttpReward(url, timeout, retries, backoff, headers)
