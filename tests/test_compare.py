"""``diffalign compare``: pairs share their noise, the simulated judge picks, results reach the report and the card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.compare import CompareSettings, resolve_sides, run_compare
from diffalign.config import dump_config, load_config
from diffalign.feedback.store import FeedbackStore

FAST = dict(prompts=["two red circles", "three blue squares"], samples_per_prompt=3, num_steps=3, batch_size=4)


@pytest.fixture(scope="module")
def tuned_run(tiny_pipe_dir, tmp_path_factory):
    """A run directory (config.toml + lora/) whose LoRA visibly changes the tiny pipeline's images."""
    from diffalign.pipeline import attach_lora, load_pipeline, save_lora

    run = tmp_path_factory.mktemp("runs") / "tuned"
    pipe = load_pipeline(str(tiny_pipe_dir))
    attach_lora(pipe.unet, rank=4, alpha=4.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (no change); make the adapter do something
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    save_lora(pipe.unet, run / "lora")
    dump_config(load_config(overrides=[f'model.id="{tiny_pipe_dir}"', f'output_dir="{run}"']), run / "config.toml")
    return run


def _images(store, cid, model):
    return np.stack([store.load_pair_image(p["pair_id"], model) for p in store.pairs(cid)])


def test_the_same_model_on_both_sides_gives_identical_pairs_so_noise_is_shared(tuned_run, tmp_path):
    # eta = 1: every DDIM step draws noise too, so identical images need the step noise shared, not only x_T.
    done = run_compare(str(tuned_run), str(tuned_run / "lora"), CompareSettings(**FAST, eta=1.0), tmp_path / "out",
                       log=lambda m: None)
    with FeedbackStore(done["store"]) as store:
        a, b = _images(store, done["comparison_id"], "a"), _images(store, done["comparison_id"], "b")
    np.testing.assert_array_equal(a, b)
    assert a.std() > 0  # real images, not blanks
    r = done["result"]
    assert r["overall"]["ties"] == 6 and r["overall"]["rate"] == 0.5 and r["verdict"]["decision"] == "inconclusive"


def test_base_against_a_lora_differs_and_the_results_reach_report_and_card(tuned_run, tmp_path):
    done = run_compare("base", str(tuned_run), CompareSettings(**FAST), tmp_path / "out", by="hank",
                       log=lambda m: None)
    with FeedbackStore(done["store"]) as store:
        cid = done["comparison_id"]
        a, b = _images(store, cid, "a"), _images(store, cid, "b")
        picks = store.comparison_choices(cid)
        assert store.comparison_audit(cid)[0]["actor"] == "hank"
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1  # the LoRA changes the images
    assert len(picks) == 6 and {p["evaluator"] for p in picks} == {"sim-judge"}
    r = done["result"]
    assert r["model_a"] == "base" and str(tuned_run) in r["model_b"]
    assert sum(r["overall"][k] for k in ("wins", "losses", "ties")) == 6
    report = (tmp_path / "out" / "compare_report.html").read_text()
    assert "Win rate of B" in report and r["verdict"]["decision"].upper() in report
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["comparison"] == done["name"]
    card = (tuned_run / "lora" / "README.md").read_text()
    assert "## Blind A/B evaluation" in card and done["name"] in card and "B (A = `base`" in card


def test_sides_resolve_and_bad_ones_name_the_argument(tuned_run, tmp_path):
    a, b = resolve_sides("base", str(tuned_run))
    assert a.model_id == b.model_id and a.lora_dir is None and b.lora_dir == tuned_run / "lora"
    with pytest.raises(ValueError, match="B: .* is neither 'base', a finished run directory"):
        resolve_sides("base", str(tmp_path))
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="A: .* pass --model"):
        resolve_sides(str(tmp_path / "loose"), "base")
    with pytest.raises(ValueError, match="ties: 'maybe'"):
        CompareSettings(ties="maybe")


def test_cli_compare_prints_the_table_and_the_verdict(tuned_run, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["compare", "base", str(tuned_run), "--prompts", str(_prompt_file(tmp_path)),
                                      "--samples-per-prompt", "2", "--steps", "3", "--out", str(out),
                                      "--ties", "exclude", "--gate", "0.6"])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "verdict:" in result.output and "ties are left out" in result.output
    again = CliRunner().invoke(app, ["compare-results", "--store", str(out / "feedback"), "--out", str(out)])
    assert again.exit_code == 0 and "ties are left out" in again.output  # the rule stored at creation
    bad = CliRunner().invoke(app, ["compare", "base", "nowhere"])
    assert bad.exit_code == 2 and "B: 'nowhere' is neither" in bad.output


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("two red circles\n")
    return path


def test_human_mode_stores_pairs_without_picks(tuned_run, tmp_path):
    done = run_compare("base", str(tuned_run), CompareSettings(**FAST), tmp_path / "h", evaluator="human",
                       log=lambda m: None)
    assert done["result"]["picks"] == 0 and done["result"]["pairs"] == 6 and done["url"].startswith("/compare/")


@pytest.mark.slow
def test_the_simulated_judge_prefers_a_ddpo_tuned_toy_model_over_the_base(tmp_path):
    """Measured (bench numbers in the issue 18 report): DDPO at lr 1e-3 for 10 epochs of 32 trajectories on the
    hard counting prompts; 16 pairs per prompt gave B 6 wins, 0 losses and 42 ties (the tuned model mostly draws
    the same image from the same noise). Ties are excluded here: under 'half' 42 ties hold the lower bound at
    0.42. 32 pairs per prompt double the decisive pairs. ~9 min train + 4 min pairs on 2 loaded cores."""
    from pathlib import Path

    from diffalign.trainer import train

    run = tmp_path / "ddpo"
    cfg = load_config(Path(__file__).parents[1] / "configs" / "ddpo_toy_counting.toml", overrides=[
        f'output_dir="{run}"', "train.epochs=10", "train.learning_rate=1e-3", 'log.tracker="none"',
        "log.progress=false", "guards.every=0", "checkpoint.every=0"])
    train(cfg, log=lambda m: None)
    done = run_compare("base", str(run), CompareSettings(prompts="hard_counting", samples_per_prompt=32,
                                                         ties="exclude", gate=0.5), tmp_path / "ab", log=lambda m: None)
    overall = done["result"]["overall"]
    assert overall["wins"] > 3 * overall["losses"], overall
    assert overall["low"] > 0.5 and done["result"]["verdict"]["decision"] == "ship", overall
