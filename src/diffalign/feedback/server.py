"""The labeling app: FastAPI serving plain HTML/CSS/JS and a small JSON API over a :class:`FeedbackStore`.

Run it with ``python -m diffalign.feedback.server --store DIR`` (see ``--help``) or :func:`serve`.

Security model (see docs/feedback.md): binds 127.0.0.1 by default; any other host needs an access token;
with a token set every POST needs it (``Authorization: Bearer <token>`` or ``X-Diffalign-Token``, compared in
constant time); POSTs must be JSON and, without a token, must not come from a non-loopback origin (so a
web page elsewhere cannot post labels to a local app); bodies are size-limited (413); images are served by
id only; every error is JSON with a 4xx status. Once the store holds invitations (``diffalign feedback
invite``), a submission counts for the evaluator whose personal token it carries (identity.py), and that
token also stands in for the access token.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import secrets
import sys
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffalign.feedback.compare_app import HiddenImageError, add_compare_routes
from diffalign.feedback.identity import resolve_evaluator, signed_in
from diffalign.feedback.store import FeedbackError, FeedbackStore, NotFoundError

STATIC_DIR = Path(str(resources.files("diffalign.feedback") / "static"))
TOKEN_HEADER = "x-diffalign-token"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
                                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 possibly in brackets) is a loopback address."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SubmissionIn(BaseModel):
    """One evaluator's labels for a round."""

    model_config = ConfigDict(extra="forbid")

    evaluator: str | None = Field(
        default=None, max_length=200,
        description="The evaluator's name (1-64 printable characters). With invitations, optional: the personal "
                    "token says who submits, and a different name is refused.")
    labels: dict[int, str] = Field(description="Every image id of the round mapped to 'good' or 'bad'.")
    best_image_id: int | None = Field(
        default=None, description="A good image of the round or the round's previous best; null if none is good.")


class SubmissionOut(BaseModel):
    submission_id: int
    round_id: int
    evaluator: str
    complete: bool
    evaluators_submitted: int
    evaluators_required: int


class _BodyLimit:
    """Pure ASGI middleware: refuses request bodies larger than ``max_body_bytes`` with a JSON 413."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return await _json(send, 400, "invalid Content-Length header")
            if too_big:
                return await _json(send, 413, f"request body larger than {self.max_body_bytes} bytes")
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        # Read the whole (bounded) body first, so a chunked upload cannot get past the limit either.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _json(send, 413, f"request body larger than {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _json(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type="text/html", headers={"Cache-Control": "no-store"})


def create_app(store: FeedbackStore, token: str | None = None, max_body_bytes: int = 1_000_000) -> FastAPI:
    """The labeling app over ``store``. With ``token`` set, every POST must carry it."""
    if token is not None and not token:
        raise ValueError("token: an empty token would protect nothing; pass None or a real token")
    app = FastAPI(title="diffalign labeling app", version="1",
                  description="Label generated images good/bad and pick the best, for HERO / D3PO fine-tuning.",
                  docs_url=None, redoc_url=None)
    app.state.store = store
    token_bytes = token.encode() if token else None

    @app.exception_handler(FeedbackError)
    async def _feedback_error(request: Request, exc: FeedbackError):
        return JSONResponse({"detail": str(exc)}, status_code=getattr(exc, "status_code", 400))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "body"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts) or "invalid request", "errors": _plain(errors)},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            problem = _check_post(request, token_bytes, lambda: signed_in(store, request) is not None)
            if problem is not None:
                status, message = problem
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                response = JSONResponse({"detail": message}, status_code=status, headers=headers)
            else:
                response = await call_next(request)
        else:
            response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    app.add_middleware(_BodyLimit, max_body_bytes=max_body_bytes)  # outermost: before anything reads the body

    # ------------------------------------------------------------------ pages

    @app.get("/", include_in_schema=False)
    def index_page():
        return _page("index.html")

    @app.get("/rounds/{round_id}", include_in_schema=False)
    def round_page(round_id: int):
        store.get_round(round_id)  # 404 for an unknown round
        return _page("round.html")

    @app.get("/runs/{run_id}", include_in_schema=False)
    def run_page(run_id: int):
        store.run_summary(run_id)
        return _page("run.html")

    add_compare_routes(app, store, _page)  # the blind A/B page (compare_app.py)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ------------------------------------------------------------------ API

    @app.get("/api/health", tags=["meta"])
    def health() -> dict:
        return {"ok": True, "schema_version": store.schema_version, "token_required": token is not None,
                "invites": store.has_invites()}

    @app.get("/api/whoami", tags=["meta"])
    def whoami(request: Request) -> dict:
        """Whether this session labels by invitation, and whom the request's personal token signs in (or null)."""
        return {"invites": store.has_invites(), "evaluator": signed_in(store, request)}

    @app.get("/api/rounds", tags=["rounds"])
    def list_rounds(run_id: int | None = None) -> list[dict]:
        """The open rounds (still waiting for evaluators), oldest first."""
        out = []
        for info in store.open_rounds(run_id):
            status = store.round_status(info.id)
            status["run_name"] = store.get_run(info.run_id)["name"]
            out.append(status)
        return out

    @app.get("/api/rounds/{round_id}", tags=["rounds"])
    def get_round(round_id: int, request: Request, evaluator: str | None = None) -> dict:
        """A round with its images; with ``evaluator`` (or a personal token), that evaluator's latest labels."""
        if store.has_invites():  # only your own labels: others' would let evaluators copy each other
            evaluator = signed_in(store, request)
        info = store.get_round(round_id)
        status = store.round_status(round_id)
        status["run_name"] = store.get_run(info.run_id)["name"]
        status["images"] = [_image_json(store, i) for i in info.image_ids]
        status["previous_best"] = (_image_json(store, info.previous_best_image_id)
                                   if info.previous_best_image_id is not None else None)
        status["mine"] = None
        if evaluator:
            key = evaluator.strip().casefold()  # names match without case, as submissions do
            per = store.round_feedback(round_id).per_evaluator
            latest = next((v for k, v in per.items() if k.casefold() == key), None)
            if latest is not None:
                status["mine"] = {"labels": {str(k): v for k, v in latest["labels"].items()},
                                  "best_image_id": latest["best_image_id"], "created_at": latest["created_at"]}
        return status

    @app.post("/api/rounds/{round_id}/submissions", tags=["rounds"], response_model=SubmissionOut)
    def submit(round_id: int, body: SubmissionIn, request: Request) -> SubmissionOut:
        """Submit one evaluator's labels; the same labels again are a no-op, a change is appended. With
        invitations, the submission counts for the personal token's evaluator (401 without one, 403 for
        another name)."""
        evaluator = resolve_evaluator(store, request, body.evaluator)
        submission_id = store.submit(round_id, evaluator, body.labels, body.best_image_id)
        status = store.round_status(round_id)
        return SubmissionOut(submission_id=submission_id, round_id=round_id, evaluator=evaluator.strip(),
                             complete=status["complete"], evaluators_submitted=len(status["evaluators_submitted"]),
                             evaluators_required=status["evaluators_required"])

    @app.get("/api/runs", tags=["runs"])
    def list_runs() -> list[dict]:
        return [{k: v for k, v in run.items() if k != "rounds"} for run in store.list_runs()]

    @app.get("/api/runs/{run_id}", tags=["runs"])
    def get_run(run_id: int) -> dict:
        """A run: current iteration, labels used so far, measured metrics, and its rounds."""
        return store.run_summary(run_id)

    @app.get("/api/runs/{run_id}/agreement", tags=["runs"])
    def get_agreement(run_id: int) -> dict:
        """How far the run's evaluators agree, and who is flagged for a lean (see docs/feedback.md)."""
        return store.agreement(run_id)

    @app.get("/api/images/{image_id}/explanation", tags=["images"])
    def explain(image_id: int, k: int = 5) -> dict:
        """Why HERO rewarded an image of a closed round: the labelled images nearest to it in that round's
        feedback-aligned embedding, with their labels and evaluators (409 while the round is open)."""
        return store.explain(image_id, k)

    @app.get("/api/images/{image_id}.png", tags=["images"],
             responses={200: {"content": {"image/png": {}}}}, response_class=Response)
    def get_image(image_id: int, request: Request):
        """An image by id (PNG). Content-addressed, so it is cached as immutable."""
        meta = store.image_info(image_id)
        if meta["metadata"].get("flagged"):  # never sent to anyone: the page shows the reason instead
            raise HiddenImageError(f"image {image_id} is hidden by the safety filter ({meta['metadata']['flagged']})")
        path = store.image_path(image_id)  # refuses a path outside the store's images/ folder
        if not path.is_file():
            raise NotFoundError(f"image_id: the file of image {image_id} is missing from the store")
        etag = f'"{meta["sha256"]}"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type="image/png", headers=headers)

    return app


def _image_json(store: FeedbackStore, image_id: int) -> dict:
    meta = store.image_info(image_id)
    reason = meta["metadata"].get("flagged") or None  # the safety filter's: no URL, only why
    return {"id": meta["id"], "round_id": meta["round_id"], "position": meta["position"], "sha256": meta["sha256"],
            "width": meta["width"], "height": meta["height"], "flagged": bool(reason), "flag_reason": reason,
            "url": None if reason else f"/api/images/{meta['id']}.png"}


def _plain(value: Any) -> Any:
    """Validation error details made JSON-safe (pydantic may put exceptions in ``ctx``)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): _plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_plain(v) for v in value]
        return str(value)


def _check_access_token(request: Request, token_bytes: bytes) -> tuple[int, str] | None:
    given = request.headers.get(TOKEN_HEADER)
    auth = request.headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if not given:
        return 401, ("an access token is required: send 'Authorization: Bearer <token>' or 'X-Diffalign-Token' "
                     "(open the URL with ?token=... that the server printed)")
    if not hmac.compare_digest(given.encode(), token_bytes):
        return 403, "wrong access token"
    return None


def _check_post(request: Request, token_bytes: bytes | None, personal_ok=lambda: False) -> tuple[int, str] | None:
    """Why a state-changing request is refused, as (status, message), or None when it may go on.

    ``personal_ok()`` says whether the request carries a valid personal token: an invited evaluator's link
    is all they need, so it stands in for the access token (it is as secret, and it names who submits).
    """
    if token_bytes is not None:
        problem = None if personal_ok() else _check_access_token(request, token_bytes)
        if problem is not None:
            return problem
    else:
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = urlsplit(origin).hostname or ""
            if not is_loopback(host):
                return 403, f"cross-origin request from {origin} refused"
        elif origin == "null":
            return 403, "cross-origin request from an opaque origin refused"
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return 415, "send the request body as JSON (Content-Type: application/json)"
    return None


def serve(store: FeedbackStore, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          log=print, log_level: str = "warning") -> None:
    """Run the labeling app with uvicorn until interrupted.

    Binding to anything but a loopback address requires ``token``: on a shared network, anyone could
    otherwise post labels into the training loop.
    """
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refusing to serve the labeling app on {host!r} without an access token: anyone who can reach "
            f"that address could label images for your training run. Pass a token (--token or "
            f"--generate-token), or bind 127.0.0.1 and use an SSH tunnel.")
    import uvicorn

    app = create_app(store, token=token)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{port}/"
    if token:
        url += f"?token={token}"
    log(f"diffalign labeling app for store {store.directory}: open {url}")
    if host in ("0.0.0.0", "::"):
        log("  (listening on every interface: use this machine's address instead of 127.0.0.1 from elsewhere)")
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffalign.feedback.server",
                                     description="Serve the diffalign labeling app over a feedback store.")
    parser.add_argument("--store", required=True, help="the feedback store directory (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=None, help="access token required for submissions "
                        "(default: $DIFFALIGN_FEEDBACK_TOKEN if set)")
    parser.add_argument("--generate-token", action="store_true", help="make up a random access token")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    import os

    token = args.token or os.environ.get("DIFFALIGN_FEEDBACK_TOKEN") or None
    if args.generate_token and not token:
        token = secrets.token_urlsafe(24)
    store = FeedbackStore(args.store)
    try:
        serve(store, host=args.host, port=args.port, token=token, log_level=args.log_level,
              log=lambda m: print(m, flush=True))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
