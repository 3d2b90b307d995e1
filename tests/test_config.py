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
    with pytest.raises(ConfigError, match=r"train\.algorithm: Input should be 'ddpo', 'dag-db' or 'dag-kl'"):
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
