"""Bad input, through the real CLI: every malformed config, prompts file, reward output and model path ends in
one clear message naming the field and the fix, never a traceback, and never trains on bad data.

Each case runs ``diffalign train ...`` in its own child process on the tiny random pipeline (the ``cli``
fixture of conftest.py: the console script's entry point forked from a warm server). One case also runs
as a plain ``python -m diffalign.cli`` subprocess and must print the same message. The table of inputs and the messages the CLI printed is docs/reliability.md's "Bad input" section:
the last test compares the committed table with this run's (paths and ports normalised), so it cannot drift
from what the code prints. ``DIFFALIGN_WRITE_DOCS=1`` rewrites it instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import tiny_run_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- bad-input-table:begin -->", "<!-- bad-input-table:end -->"
BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'


def _python_reward(function: str) -> str:
    return f'reward.terms=[{{name="python", args={{function="{function}"}}}}]'


def _http_reward(path: str, **args) -> str:
    extra = "".join(f", {k}={v}" for k, v in args.items())
    return 'reward.terms=[{name="http", args={url="http://127.0.0.1:{port}' + path + '"' + extra + '}}]'


@dataclass
class Case:
    id: str
    kind: str  # config / prompts / reward / model
    what: str  # the malformed input, for the table
    sets: tuple[str, ...] = ()  # --set overrides on top of the tiny run
    config: str | None = None  # name of a config file the ctx writes (see _files)
    expect: tuple[str, ...] = ()  # substrings of the message: the field and the fix


CASES = [
    # --- configs --------------------------------------------------------------------------------------
    Case("toml-syntax", "config", "config file with a TOML syntax error (`[train` ...)", config="syntax.toml",
         expect=("not valid TOML", "line 2")),
    Case("toml-binary", "config", "config file that is binary (PNG bytes)", config="binary.toml",
         expect=("not a text file", "TOML")),
    Case("config-missing", "config", "`--config` path that does not exist", config="missing.toml",
         expect=("not found", "configs/")),
    Case("unknown-section", "config", "unknown section `[trian]`", config="unknown_section.toml",
         expect=("trian: unknown key", "allowed keys here", "train")),
    Case("unknown-key", "config", "unknown key `train.lr`", sets=("train.lr=0.1",),
         expect=("train.lr: unknown key", "learning_rate")),
    Case("wrong-type-int", "config", '`train.epochs = "ten"`', sets=('train.epochs="ten"',),
         expect=("train.epochs", "valid integer", "'ten'")),
    Case("wrong-type-bool", "config", '`log.progress = "maybe"`', sets=('log.progress="maybe"',),
         expect=("log.progress", "boolean")),
    Case("wrong-type-list", "config", "`model.lora_target_modules = 7`", sets=("model.lora_target_modules=7",),
         expect=("model.lora_target_modules", "list")),
    Case("range-lr", "config", "`train.learning_rate = 5` (must be < 1)", sets=("train.learning_rate=5",),
         expect=("train.learning_rate", "less than 1")),
    Case("range-batch", "config", "`sample.batch_size = 0`", sets=("sample.batch_size=0",),
         expect=("sample.batch_size", "greater than or equal to 1")),
    Case("range-eta", "config", "`sample.eta = 0` (no log-probability)", sets=("sample.eta=0",),
         expect=("sample.eta", "greater than 0")),
    Case("bad-choice", "config", '`train.algorithm = "ppo"`', sets=('train.algorithm="ppo"',),
         expect=("train.algorithm", "'ddpo'", "'dag-kl'")),
    Case("inconsistent-batches", "config", "`train.batch_size = 3` with 4 samples per epoch", sets=("train.batch_size=3",),
         expect=("train.batch_size (3) must divide", "sample.batch_size")),  # no input dump
    Case("empty-output-dir", "config", '`output_dir = " "` (blank)', sets=('output_dir=" "',),
         expect=("output_dir", "must not be empty")),
    Case("set-no-equals", "config", "`--set train.epochs` (no value)", sets=("train.epochs",),
         expect=("expected section.key=value", "--set train.epochs=3")),
    Case("set-not-section", "config", "`--set train.epochs.x=1` (a value is not a section)",
         sets=("train.epochs.x=1",), expect=("train.epochs", "not a section")),
    Case("unknown-reward", "config", '`reward.terms = [{name = "aesthetics"}]`', sets=('reward.terms=[{name="aesthetics"}]',),
         expect=("reward.terms[0].name 'aesthetics' is unknown", "aesthetic")),
    Case("reward-bad-arg", "config", "`toy` reward given an argument it does not take",
         sets=('reward.terms=[{name="toy", args={colour="red"}}]',), expect=("reward.terms[0].args", "colour", "it takes")),
    Case("reward-bad-import", "config", "python reward from a module that does not exist",
         sets=(_python_reward("no_such_pkg.scores:aesthetic"),), expect=("python reward", "no_such_pkg")),
    Case("reward-not-callable", "config", "python reward naming a non-callable attribute",
         sets=(_python_reward("tests.reliability.bad_rewards:not_callable"),), expect=("python reward", "not_callable")),
    Case("http-bad-url", "config", 'http reward with `url = "ftp://scorer/score"`',
         sets=('reward.terms=[{name="http", args={url="ftp://scorer/score"}}]',), expect=("url must start with http",)),
    Case("lora-targets", "config", '`model.lora_target_modules = ["to_qq"]` (no such module)',
         sets=('model.lora_target_modules=["to_qq"]',), expect=("model.lora_target_modules", "to_qq", "to_q")),
    # --- prompts ----------------------------------------------------------------------------------------
    Case("prompts-missing", "prompts", "`sample.prompts` = a file that does not exist", sets=('sample.prompts="{tmp}/nope.txt"',),
         expect=("sample.prompts", "not found", "one prompt per line")),
    Case("prompts-empty", "prompts", "`sample.prompts` = an empty file", sets=('sample.prompts="{tmp}/empty.txt"',),
         expect=("sample.prompts", "holds no prompts", "one prompt per line")),
    Case("prompts-binary", "prompts", "`sample.prompts` = a binary file (PNG bytes)", sets=('sample.prompts="{tmp}/binary.txt"',),
         expect=("sample.prompts", "not a text file", "one prompt per line")),
    Case("prompts-empty-list", "prompts", "`sample.prompts = []`", sets=("sample.prompts=[]",),
         expect=("sample.prompts", "at least one prompt")),
    # --- reward outputs (python) --------------------------------------------------------------------------
    Case("reward-nan", "reward", "python reward returning NaN", sets=(_python_reward("tests.helpers.user_rewards:returns_nan"),),
         expect=("reward 'python' on batch 1 of epoch 1", "non-finite", "reward.on_error")),
    Case("reward-inf", "reward", "python reward returning inf", sets=(_python_reward("tests.reliability.bad_rewards:returns_inf"),),
         expect=("reward 'python' on batch 1 of epoch 1", "non-finite", "reward.on_error")),
    Case("reward-wrong-length", "reward", "python reward returning 5 scores for 4 images",
         sets=(_python_reward("tests.helpers.user_rewards:wrong_count"),), expect=("returned 5 scores for 4 images",)),
    Case("reward-2d", "reward", "python reward returning a (4, 2) array",
         sets=(_python_reward("tests.reliability.bad_rewards:returns_2d"),), expect=("returned 8 scores for 4 images",)),
    Case("reward-text", "reward", 'python reward returning the string "high"',
         sets=(_python_reward("tests.reliability.bad_rewards:returns_text"),), expect=("reward 'python'", "not a sequence of numbers")),
    Case("reward-none", "reward", "python reward returning None",
         sets=(_python_reward("tests.reliability.bad_rewards:returns_none"),), expect=("reward 'python'", "not a sequence of numbers")),
    Case("reward-raises", "reward", "python reward raising RuntimeError",
         sets=(_python_reward("tests.helpers.user_rewards:raises"),), expect=("reward 'python' raised on batch 1 of epoch 1", "scoring backend unavailable")),
    Case("reward-skip-exhausted", "reward", 'raising reward with `on_error = "skip_batch"`, `max_skipped_batches = 0`',
         sets=(_python_reward("tests.helpers.user_rewards:raises"), 'reward.on_error="skip_batch"', "reward.max_skipped_batches=0"),
         expect=("reward.max_skipped_batches", "raise the limit")),
    Case("reward-all-skipped", "reward", 'raising reward with `on_error = "skip_batch"`: every batch of the run skipped',
         sets=(_python_reward("tests.helpers.user_rewards:raises"), 'reward.on_error="skip_batch"'),
         expect=("nothing was trained", "no LoRA was written", "metrics.jsonl")),
    # --- reward outputs (HTTP scoring service) ------------------------------------------------------------
    Case("http-500", "reward", "scoring service answering HTTP 500 (`retries = 1`, `backoff = 0.01`)", sets=(_http_reward("/500", retries=1, backoff=0.01),),
         expect=("http reward http://127.0.0.1:<port>/500", "HTTP 500", "2 attempt")),
    Case("http-timeout", "reward", "scoring service slower than `timeout = 0.5` (`retries = 0`)",
         sets=(_http_reward("/slow", timeout=0.5, retries=0),), expect=("http reward", "/slow", "timed out after 0.5s")),
    Case("http-invalid-json", "reward", "scoring service answering `not json` (`retries = 0`)", sets=(_http_reward("/badjson", retries=0),),
         expect=("http reward", "response is not JSON")),
    Case("http-no-scores", "reward", 'scoring service answering `{"score": 1}` (`retries = 0`)', sets=(_http_reward("/noscores", retries=0),),
         expect=("http reward", "must be a JSON object with 'scores'")),
    Case("http-wrong-count", "reward", "scoring service answering 3 scores for 4 images (`retries = 0`)",
         sets=(_http_reward("/short", retries=0),),
         expect=("reward 'http' (http://127.0.0.1:<port>/short)", "returned 3 scores for 4 images")),
    Case("http-nan", "reward", 'scoring service answering `{"scores": [NaN, ...]}` (`retries = 0`)',
         sets=(_http_reward("/nan", retries=0),), expect=("reward 'http' (http://127.0.0.1:<port>/nan)", "non-finite")),
    Case("http-null", "reward", 'scoring service answering `{"scores": [0.5, null, ...]}` (`retries = 0`)',
         sets=(_http_reward("/null", retries=0),), expect=("/null", "null (None) at position 1")),
    Case("http-429", "reward", "scoring service answering HTTP 429 with `Retry-After: 0.1` (`retries = 1`)",
         sets=(_http_reward("/429", retries=1),), expect=("/429 failed after 2 attempt(s)", "Retry-After: 0.1")),
    Case("http-404", "reward", "scoring service answering HTTP 404 (wrong path; `retries = 2`, a 4xx is not retried)", sets=(_http_reward("/wrong-path", retries=2),),
         expect=("http reward", "HTTP 404", "1 attempt")),
    Case("http-refused", "reward", "scoring service not running (connection refused; `retries = 0`)",
         sets=('reward.terms=[{name="http", args={url="http://127.0.0.1:{dead}/score", retries=0}}]',),
         expect=("http reward http://127.0.0.1:<port>/score", "ConnectError")),
    Case("http-env-unset", "config", 'http reward header `Authorization = "env:DIFFALIGN_TEST_UNSET"`, variable unset',
         sets=('reward.terms=[{name="http", args={url="http://127.0.0.1:{port}/score", '
               'headers={Authorization="env:DIFFALIGN_TEST_UNSET"}}}]',),
         expect=("reward.terms[0].args.headers.Authorization", "DIFFALIGN_TEST_UNSET is not set")),
    # --- model paths ------------------------------------------------------------------------------------
    Case("model-missing-dir", "model", "`model.id` = a directory that does not exist", sets=('model.id="{tmp}/no-model"',),
         expect=("model.id", "no model_index.json", "save_pretrained")),
    Case("model-no-index", "model", "`model.id` = a directory without model_index.json", sets=('model.id="{tmp}/no-index"',),
         expect=("model.id", "no model_index.json")),
    Case("model-bad-index", "model", "`model.id` = a directory whose model_index.json is not JSON", sets=('model.id="{tmp}/bad-index"',),
         expect=("model.id", "model_index.json")),
    Case("model-garbage-weights", "model", "`model.id` = a pipeline whose UNet weights are random bytes",
         sets=('model.id="{tmp}/garbage-weights"',), expect=("model.id", "unet", "damaged", "save_pretrained")),
    Case("model-truncated-weights", "model", "`model.id` = a pipeline whose VAE weights file is cut in half",
         sets=('model.id="{tmp}/truncated-weights"',), expect=("model.id", "vae", "damaged", "save_pretrained")),
    Case("model-missing-component", "model", "`model.id` = a pipeline with its text_encoder folder deleted",
         sets=('model.id="{tmp}/no-text-encoder"',), expect=("model.id", "text_encoder")),
]


class _Scorer(BaseHTTPRequestHandler):
    """A tiny scoring service misbehaving by path."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = len(body["prompts"])
        path = self.path
        if path == "/500":
            return self._send(500, b"internal scorer error", "text/plain")
        if path == "/slow":
            time.sleep(3.0)
            return self._send(200, json.dumps({"scores": [0.5] * n}).encode())
        if path == "/badjson":
            return self._send(200, b"not json")
        if path == "/noscores":
            return self._send(200, b'{"score": 1}')
        if path == "/short":
            return self._send(200, json.dumps({"scores": [0.5] * (n - 1)}).encode())
        if path == "/nan":
            return self._send(200, b'{"scores": [NaN' + b", 0.5" * (n - 1) + b"]}")
        if path == "/null":
            return self._send(200, b'{"scores": [0.5, null' + b", 0.5" * (n - 2) + b"]}")
        if path == "/429":
            self.send_response(429)
            self.send_header("Retry-After", "0.1")
            self.send_header("Content-Length", "12")
            self.end_headers()
            return self.wfile.write(b"slow down!!!")
        return self._send(404, b'{"detail": "Not Found"}')

    def _send(self, status, payload, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_pipe_dir, cli):
    """Files the cases point at, a misbehaving scoring service, a dead port."""
    tmp = tmp_path_factory.mktemp("bad-input")
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    (tmp / "syntax.toml").write_text('output_dir = "runs/x"\n[train\nepochs = 3\n')
    (tmp / "binary.toml").write_bytes(png)
    (tmp / "unknown_section.toml").write_text("[trian]\nepochs = 3\n")
    (tmp / "empty.txt").write_text("\n  \n# only a comment\n")
    (tmp / "binary.txt").write_bytes(png)
    (tmp / "no-index").mkdir()
    (tmp / "no-index" / "unet").mkdir()
    for name in ("bad-index", "garbage-weights", "truncated-weights", "no-text-encoder"):
        shutil.copytree(tiny_pipe_dir, tmp / name)
    (tmp / "bad-index" / "model_index.json").write_text("{ this is not json")
    unet = next((tmp / "garbage-weights" / "unet").glob("*.safetensors"))
    unet.write_bytes(os.urandom(unet.stat().st_size))
    vae = next((tmp / "truncated-weights" / "vae").glob("*.safetensors"))
    vae.write_bytes(vae.read_bytes()[: vae.stat().st_size // 2])
    shutil.rmtree(tmp / "no-text-encoder" / "text_encoder")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    dead = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)  # bound then closed: nothing listens there
    dead_port = dead.server_port
    dead.server_close()
    yield {"tmp": tmp, "pipe": tiny_pipe_dir, "port": server.server_port, "dead": dead_port, "run": cli}
    server.shutdown()


RESULTS: dict[str, tuple[Case, str]] = {}


def _normalise(text: str, ctx) -> str:
    text = text.replace(str(ctx["tmp"]), "<tmp>").replace(str(ctx["pipe"]), "<tiny-pipe>")
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", text)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_message(case: Case, ctx, tmp_path):
    out = tmp_path / "run"
    sets = tiny_run_overrides(ctx["pipe"], out, BRIGHT, "train.epochs=2", "checkpoint.every=1")
    for s in case.sets:  # placeholders by replace: the TOML values have braces of their own
        for key in ("tmp", "port", "dead"):
            s = s.replace("{" + key + "}", str(ctx[key]))
        sets.append(s)
    args = ["train"]
    if case.config is not None:
        args += ["--config", str(ctx["tmp"] / case.config)]
    for s in sets:
        args += ["--set", s]
    result = ctx["run"](args, tmp_path)
    stderr = result.stderr.strip()
    assert result.code == 2, f"exit {result.code}\nstdout: {result.stdout}\nstderr: {stderr}"
    assert "Traceback" not in stderr and "Traceback" not in result.stdout, stderr
    # The message is what follows "error: " (libraries may log progress bars and warnings before it).
    found = re.search(r"^error: .*", stderr, flags=re.MULTILINE | re.DOTALL)
    assert found, stderr
    message = _normalise(found.group(0), ctx)
    RESULTS[case.id] = (case, message)
    for part in case.expect:
        assert part in message, f"{part!r} not in the message:\n{message}"
    # Nothing was trained on the bad input: no checkpoint, no LoRA.
    assert not list(out.glob("checkpoints/checkpoint-*")), "a checkpoint was written"
    assert not (out / "lora").exists(), "a LoRA was written"


def test_plain_subprocess_prints_the_same_message(ctx, tmp_path):
    """The forked runner is faithful: ``python -m diffalign.cli`` prints the same message for a reward case."""
    case = next(c for c in CASES if c.id == "reward-nan")
    if case.id not in RESULTS:
        pytest.skip("needs the reward-nan case to have run")
    sets = tiny_run_overrides(ctx["pipe"], tmp_path / "run", "train.epochs=2", *case.sets)
    cmd = [sys.executable, "-m", "diffalign.cli", "train", *[x for s in sets for x in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = re.search(r"^error: .*", proc.stderr, flags=re.MULTILINE | re.DOTALL).group(0)
    assert _normalise(message.strip(), ctx) == RESULTS[case.id][1]


def _table() -> str:
    rows = ["| # | kind | malformed input | what `diffalign train` prints (stderr; exit code 2) |",
            "| --- | --- | --- | --- |"]
    for i, case in enumerate(CASES, 1):
        message = RESULTS[case.id][1].replace("|", "\\|").replace("\n", "<br>")
        rows.append(f"| {i} | {case.kind} | {case.what} | `{message}` |" if "<br>" not in message
                    else f"| {i} | {case.kind} | {case.what} | <code>{message}</code> |")
    return "\n".join(rows)


def test_documented_table_is_what_the_cli_prints():
    """docs/reliability.md holds this run's messages (rewrite with DIFFALIGN_WRITE_DOCS=1)."""
    if len(RESULTS) < len(CASES):
        pytest.skip("needs every bad-input case of this module to have run")
    table = _table()
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    if os.environ.get("DIFFALIGN_WRITE_DOCS") == "1":
        DOC.write_text(doc[:start] + "\n" + table + "\n" + doc[end:])
        return
    assert doc[start:end].strip() == table, (
        "docs/reliability.md's bad-input table differs from what the CLI prints now; rerun with "
        "DIFFALIGN_WRITE_DOCS=1 .venv/bin/pytest tests/reliability/test_bad_input.py and commit the doc")
