import json

from typer.testing import CliRunner

from diffalign.cli import app
from tests.conftest import tiny_run_overrides

runner = CliRunner()
BRIGHT = 'reward.terms=[{name="python", args={function="tests.helpers.user_rewards:brightness"}}]'


def _sets(*items):
    out = []
    for item in items:
        out += ["--set", item]
    return out


def test_train_eval_report_sample_roundtrip(tiny_pipe_dir, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_pipe_dir, run, BRIGHT, "train.epochs=1", "train.learning_rate=5e-2",
                                   "eval.prompts=['two red circles', 'one blue square']", "eval.samples_per_prompt=2")
    result = runner.invoke(app, ["train", *_sets(*overrides)])
    assert result.exit_code == 0, result.output
    assert "LoRA written to" in result.output
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    assert "drift" in result.output and "success" in result.output
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["num_images"] == 4 and evaluation["drift"] > 0
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    html = (run / "report.html").read_text()
    assert "Before vs after" in html and "data:image/png;base64," in html
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", "--run", str(run), "-p", "two red circles", "--n", "2", "--steps", "3",
                                 "--out", str(grid)])
    assert result.exit_code == 0, result.output
    assert grid.stat().st_size > 0


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    result = runner.invoke(app, ["train", "--set", "train.lr=1"])
    assert result.exit_code == 2 and "train.lr: unknown key" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["train", "--set", f'model.id="{tmp_path}/nowhere"'])
    assert result.exit_code == 2 and "not a diffusers pipeline directory" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "config" in result.output
