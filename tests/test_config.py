from pathlib import Path

import pytest

from diffalign.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_derive():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    d = cfg.derived(num_processes=2)
    assert d["trajectories_per_epoch"] == 2 * cfg.sample.batch_size * cfg.sample.num_batches_per_epoch


def test_unknown_key_names_field_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"train\.lr: unknown key; allowed keys here: .*learning_rate"):
        load_config(overrides=["train.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"trian: unknown key; allowed keys here: .*train"):
        load_config(overrides=["trian.epochs=1"])


def test_bad_values_name_field_and_constraint():
    with pytest.raises(ConfigError, match=r"sample\.eta: Input should be greater than 0"):
        load_config(overrides=["sample.eta=0"])
    with pytest.raises(ConfigError, match=r"train\.algorithm: Input should be 'ddpo', 'grpo', 'dag-db' or 'dag-kl'"):
        load_config(overrides=['train.algorithm="ppo"'])
    with pytest.raises(ConfigError, match=r"reward\.on_error"):
        load_config(overrides=['reward.on_error="ignore"'])


def test_inconsistent_batch_sizes_explain_the_fix():
    with pytest.raises(ConfigError, match=r"train\.batch_size \(3\) must divide"):
        load_config(overrides=["sample.batch_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=3"])


def test_overrides_parse_toml_values_and_bare_strings():
    cfg = load_config(overrides=["train.epochs=3", "model.id=org/some-model", "sample.prompts=['one red circle']",
                                 "model.lora_target_modules=['to_q']"])
    assert cfg.train.epochs == 3 and cfg.model.id == "org/some-model"
    assert cfg.sample.prompts == ["one red circle"] and cfg.model.lora_target_modules == ["to_q"]
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(overrides=["train.epochs"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_dump_and_reload_roundtrip(tmp_path):
    from diffalign.config import dump_config

    cfg = load_config(overrides=["train.epochs=7", 'reward.terms=[{name="jpeg_compressibility", weight=2.0}]'])
    dump_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg


def test_overrides_as_people_type_them():
    """Bare words and paths need no '"..."' quoting; numbers stay numbers; text fields keep the typed text."""
    cfg = load_config(overrides=["train.algorithm=dag-kl", "model.id=/path/to/model", "train.epochs=3",
                                 "model.revision=1234", "sample.prompts=eval_relation", "train.learning_rate=1e-3"])
    assert cfg.train.algorithm == "dag-kl" and cfg.model.id == "/path/to/model"
    assert cfg.train.epochs == 3 and cfg.train.learning_rate == 1e-3
    assert cfg.model.revision == "1234" and cfg.sample.prompts == "eval_relation"
    assert load_config(overrides=['train.algorithm="dag-db"']).train.algorithm == "dag-db"  # quoted still works
    assert load_config(overrides=["model.id=2024-01-01"]).model.id == "2024-01-01"  # not a TOML date
    with pytest.raises(ConfigError, match=r"train\.algorthm: unknown key; allowed keys here: .*algorithm"):
        load_config(overrides=["train.algorthm=dag-kl"])
    with pytest.raises(ConfigError, match=r"train\.epochs: Input should be a valid integer.*'three'"):
        load_config(overrides=["train.epochs=three"])


def test_saved_config_redacts_secrets_and_keeps_env_references(tmp_path):
    from diffalign.config import dump_config

    cfg = load_config(overrides=[
        'reward.terms=[{name="http", args={url="https://bob:pw123@scorer/score?token=tok456&v=2", headers={'
        'Authorization="Bearer abc789", X-Trace="trace-0", X-Api-Key="env:SCORER_KEY"}}}]',
        'feedback.token="labelling-secret"'])
    dump_config(cfg, tmp_path / "c.toml")
    text = (tmp_path / "c.toml").read_text()
    for secret in ("pw123", "tok456", "abc789", "trace-0", "labelling-secret"):
        assert secret not in text, secret
    saved = load_config(tmp_path / "c.toml")
    args = saved.reward.terms[0].args
    assert args["headers"] == {"Authorization": "<redacted>", "X-Trace": "<redacted>", "X-Api-Key": "env:SCORER_KEY"}
    assert args["url"] == "https://bob:<redacted>@scorer/score?token=<redacted>&v=2"
    assert saved.feedback.token == "<redacted>" and saved.train == cfg.train  # the rest is intact


def test_env_references_resolve_in_memory_and_errors_name_field_and_variable(monkeypatch):
    from diffalign.rewards import build_reward

    term = 'reward.terms=[{name="http", args={url="http://127.0.0.1:9/s", headers={Authorization="env:SCORER_AUTH"}}}]'
    cfg = load_config(overrides=[term])
    monkeypatch.delenv("SCORER_AUTH", raising=False)
    with pytest.raises(ValueError, match=r"reward\.terms\[0\]\.args\.headers\.Authorization = 'env:SCORER_AUTH': "
                                         r"environment variable SCORER_AUTH is not set"):
        build_reward(cfg.reward.terms)
    monkeypatch.setenv("SCORER_AUTH", "Bearer xyz")
    reward = build_reward(cfg.reward.terms).terms[0][2]
    assert reward._client.headers["Authorization"] == "Bearer xyz"
    assert cfg.reward.terms[0].args["headers"]["Authorization"] == "env:SCORER_AUTH"  # the config is unchanged
    redacted = load_config(overrides=[term.replace("env:SCORER_AUTH", "<redacted>")])
    with pytest.raises(ValueError, match=r"headers\.Authorization is '<redacted>': the secret was removed"):
        build_reward(redacted.reward.terms)


def test_validation_errors_do_not_print_secrets():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=['reward.terms={name="http", args={url="http://x", headers={Authorization="Bearer '
                               'abc789"}}}', 'feedback.token=["tok456"]'])  # a table, not a list of tables
    assert "abc789" not in str(err.value) and "tok456" not in str(err.value)
    assert "reward.terms: Input should be a valid list" in str(err.value) and "feedback.token" in str(err.value)
