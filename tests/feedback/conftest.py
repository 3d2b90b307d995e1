"""Fixtures of the feedback tests: stores with toy-world images, live servers (thread or subprocess), Chromium."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from diffalign.feedback.store import FeedbackStore

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]


def toy_images(prompt: str, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` toy-world scenes that satisfy ``prompt`` (uint8 64x64x3), seeded."""
    from diffalign.toy.scenes import render_scene

    return [render_scene(prompt, seed * 1000 + i).image for i in range(n)]


def mixed_images(prompt: str, n: int, seed: int = 0) -> tuple[list[np.ndarray], list[bool]]:
    """``n`` scenes, about half matching ``prompt`` and half matching another prompt; returns (images, matches)."""
    from diffalign.toy.scenes import all_count_prompts, all_relation_prompts, render_scene

    rng = np.random.default_rng(seed)
    others = [p for p in all_count_prompts() + all_relation_prompts() if p != prompt]
    images, matches = [], []
    for i in range(n):
        match = bool(rng.random() < 0.5)
        text = prompt if match else others[int(rng.integers(len(others)))]
        images.append(render_scene(text, seed * 1000 + i).image)
        matches.append(match)
    return images, matches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "store")
    yield s
    s.close()


class ThreadServer:
    """The real app under uvicorn, in a thread of the test process, on a free loopback port."""

    def __init__(self, store: FeedbackStore, token: str | None = None, max_body_bytes: int = 1_000_000):
        import uvicorn

        from diffalign.feedback.server import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(store, token=token, max_body_bytes=max_body_bytes), host="127.0.0.1",
                                port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def start(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(store):
    """Start a server for ``store``: ``live_server(token=None)`` returns a started ThreadServer."""
    servers = []

    def start(token: str | None = None, max_body_bytes: int = 1_000_000) -> ThreadServer:
        server = ThreadServer(store, token=token, max_body_bytes=max_body_bytes).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class ServerProcess:
    """``python -m diffalign.feedback.server`` as a child process (killable with SIGKILL)."""

    def __init__(self, directory: Path, port: int | None = None, token: str | None = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.proc: subprocess.Popen | None = None
        self.log_path = self.directory.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 300.0) -> ServerProcess:  # importing the app takes 15-20 s under load
        cmd = [sys.executable, "-m", "diffalign.feedback.server", "--store", str(self.directory),
               "--port", str(self.port)]
        if self.token:
            cmd += ["--token", self.token]
        env = {k: v for k, v in os.environ.items() if k != "DIFFALIGN_FEEDBACK_TOKEN"}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/api/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not come up within {timeout} s: {self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up, like a crash or a power cut of the process."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_log()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "log", None)
        if log is not None and not log.closed:
            log.close()


@pytest.fixture
def server_process(tmp_path):
    """Start ``python -m diffalign.feedback.server`` on a store directory; stopped after the test."""
    procs = []

    def start(directory: Path, port: int | None = None, token: str | None = None) -> ServerProcess:
        proc = ServerProcess(directory, port=port, token=token).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium driven by Playwright (never ``playwright install``).

    Missing Chromium or Playwright skips the browser tests on a developer's machine, but fails them in CI
    (``CI`` set), where the set-up installs Debian's ``chromium`` package.
    """
    in_ci = bool(os.environ.get("CI"))
    if not Path(CHROMIUM).exists():
        reason = f"Debian's chromium is not installed ({CHROMIUM} missing): run 'apt-get install -y chromium'"
        if in_ci:
            pytest.fail(reason + " - CI must install it (the browser tests cannot be skipped in CI)")
        pytest.skip(reason)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        reason = f"the playwright python package is not installed ({exc}): pip install -e '.[dev]'"
        if in_ci:
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def images():
    """Image makers: ``images.toy(prompt, n, seed)`` and ``images.mixed(prompt, n, seed)``."""

    class Makers:
        toy = staticmethod(toy_images)
        mixed = staticmethod(mixed_images)

    return Makers
