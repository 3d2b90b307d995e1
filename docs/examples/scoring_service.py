"""A scoring service for diffalign's http reward (contract: docs/rewards.md). Scores = mean brightness.

Run: SCORER_TOKEN=... uvicorn scoring_service:app --host 127.0.0.1 --port 8000
"""
import base64
import hmac
import io
import os

import numpy as np
from fastapi import FastAPI, Header, HTTPException
from PIL import Image
from pydantic import BaseModel


class Batch(BaseModel):
    images: list[str]  # base64 PNG files, no "data:" prefix
    prompts: list[str]
    metadata: list[dict] = []


app = FastAPI()


@app.post("/score")
def score(batch: Batch, authorization: str = Header("")) -> dict:
    token = os.environ.get("SCORER_TOKEN", "")
    if token and not hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong bearer token")
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in batch.images]
    scores = [float(im.mean() / 255.0) for im in images]  # your model goes here
    return {"scores": scores, "info": {"images": len(scores)}}
