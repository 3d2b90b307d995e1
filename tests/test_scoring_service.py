"""docs/rewards.md's example scoring service, started on 127.0.0.1 and trained against; no secret reaches disk.

One tiny run covers both: the service (docs/examples/scoring_service.py, the code the doc shows) demands a bearer
token; the run's config carries it in plain text in ``headers`` (what people do) plus a second header given as
an ``env:VAR`` reference; every file the run writes (config.toml, lora/diffalign_config.toml, TensorBoard's
hparams.yml and events, checkpoints, metrics) and everything it prints is searched for both secrets.
"""

import importlib.util
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from diffalign.config import load_config
from diffalign.rewards import RewardError, build_reward
from diffalign.trainer import train
from tests.conftest import tiny_run_overrides

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "scoring_service.py"
TOKEN = "sk-test-5f1c9a0e7d2b4c86"
CLIENT_ID = "client-id-93e1b07a"


@pytest.fixture()
def service_url(monkeypatch):
    import uvicorn

    monkeypatch.setenv("SCORER_TOKEN", TOKEN)
    spec = importlib.util.spec_from_file_location("scoring_service", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server = uvicorn.Server(uvicorn.Config(module.app, host="127.0.0.1", port=0, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.05)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/score"
    server.should_exit = True
    thread.join(timeout=10)


def test_docs_show_the_example_service_verbatim():
    doc = (REPO / "docs" / "rewards.md").read_text()
    code = EXAMPLE.read_text()
    assert code.strip() in doc, "docs/rewards.md must show docs/examples/scoring_service.py as it is"


def test_example_service_scores_and_refuses_a_wrong_token(service_url):
    images = np.stack([np.full((8, 8, 3), v, dtype=np.uint8) for v in (0, 255)])
    reward = build_reward(load_config(overrides=[
        f'reward.terms=[{{name="http", args={{url="{service_url}", headers={{Authorization="Bearer {TOKEN}"}}}}}}]'
    ]).reward.terms)
    scores, info = reward(images, ["a", "b"], [{}, {}])
    assert scores.tolist() == [0.0, 1.0] and info["http/images"] == 2
    wrong = build_reward(load_config(overrides=[
        f'reward.terms=[{{name="http", args={{url="{service_url}", retries=2, headers={{Authorization="Bearer x"}}}}}}]'
    ]).reward.terms)
    with pytest.raises(RewardError, match=rf"{re.escape(service_url)} failed after 1 attempt\(s\): HTTP 401"):
        wrong(images, ["a", "b"], [{}, {}])


def test_training_against_the_service_writes_no_secret_anywhere(service_url, tiny_pipe_dir, tmp_path, monkeypatch,
                                                                capfd):
    monkeypatch.setenv("SCORER_CLIENT_ID", CLIENT_ID)
    run = tmp_path / "run"
    term = (f'reward.terms=[{{name="http", args={{url="{service_url}", headers={{Authorization="Bearer {TOKEN}", '
            f'X-Client-Id="env:SCORER_CLIENT_ID"}}}}}}]')
    overrides = tiny_run_overrides(tiny_pipe_dir, run, term, "train.epochs=2", "checkpoint.every=1",
                                   "log.tracker=tensorboard", "log.progress=true")
    result = train(load_config(overrides=overrides))
    assert result.history[-1]["optimizer_steps"] > 0 and (result.lora_dir / "diffalign_config.toml").is_file()
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.toml", "diffalign_config.toml", "hparams.yml", "metrics.jsonl", "trainer_state.json"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    hparams = next(p for p in files if p.name == "hparams.yml").read_text()
    assert "reward.terms" in hparams and "<redacted>" in hparams  # the tracker got the config, redacted
    for secret in (TOKEN, CLIENT_ID):
        for variant in {secret, secret.encode().hex()}:
            leaked = [str(p.relative_to(run)) for p in files if variant.encode() in p.read_bytes()]
            assert not leaked, f"{secret} found in {leaked}"
            assert not [p for p in files if variant in str(p)]
    printed = capfd.readouterr()
    assert TOKEN not in printed.out + printed.err and CLIENT_ID not in printed.out + printed.err
    # The saved config keeps the reference, so it can be committed and rerun with the variable set.
    saved = load_config(run / "config.toml")
    assert saved.reward.terms[0].args["headers"] == {"Authorization": "<redacted>", "X-Client-Id": "env:SCORER_CLIENT_ID"}
