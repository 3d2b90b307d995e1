"""bench/gpu_check.py: its dry run (the GPU check's code at tiny sizes on the CPU) and its guards."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

TRAINER_PARTS = [name for name, _, _ in gpu_check.ALGORITHM_PARTS]


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # A budget far above the run's length: on a loaded machine no part may be skipped for time here.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--budget-s", "3000"], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), proc.stdout


def test_dry_run_measures_every_part(dry_report):
    report, stdout = dry_report
    assert report["mode"] == "dry-run" and report["environment"]["device"] == "cpu"
    parts = report["families"]["sd15"]["parts"]
    assert list(parts) == ["sampler", *TRAINER_PARTS, "hero"]
    for name, result in parts.items():
        assert result["status"] == "ok", (name, result)
        assert result["part_s"] > 0
    # The table names every part.
    for name in parts:
        assert f"sd15    {name}" in stdout


def test_dry_run_sampler_matches_the_stock_pipeline(dry_report):
    r = dry_report[0]["families"]["sd15"]["parts"]["sampler"]
    assert r["timed_runs"] == 1 and r["batch"] == 2
    assert r["diffalign_s"] > 0 and r["stock_s"] > 0 and 0.2 < r["ratio"] < 5
    # Same generator, same eta, fp32: the same images (the sampler reproduces DDIMScheduler.step).
    assert r["max_abs_image_difference"] < 1e-4
    assert r["bf16_weights_finite"]["stock"] is True
    assert isinstance(r["bf16_weights_finite"]["diffalign"], bool)


def test_dry_run_trainer_parts_have_throughput_and_memory(dry_report):
    parts = dry_report[0]["families"]["sd15"]["parts"]
    for name, algorithm, checkpointing in gpu_check.ALGORITHM_PARTS:
        r = parts[name]
        assert r["algorithm"] == algorithm and r["gradient_checkpointing"] is checkpointing
        assert r["trajectories_per_epoch"] == 2 and r["timed_epochs"] == 1
        assert 0 < r["trajectories_per_s"] < 1000
        assert math.isclose(r["trajectories_per_s"], 2 / r["epoch_s"], rel_tol=1e-6)
        assert 0 < r["sample_phase_s"] < r["epoch_s"] and 0 < r["train_phase_s"] < r["epoch_s"]
        assert r["peak_gib"] > 0.05  # a Python process with torch resident
        m = r["memory_vs_estimate"]
        assert m["unet_rows"] == 4  # train batch 2 with classifier-free guidance
        assert m["estimate_gib"] > 0 and m["measured_train_increase_gib"] >= 0
        assert math.isfinite(m["ratio_measured_to_estimate"])
    # Checkpointing recomputes blocks instead of saving them: the estimate says so at any size.
    assert parts["ddpo+ckpt"]["memory_vs_estimate"]["estimate_gib"] < parts["ddpo"]["memory_vs_estimate"]["estimate_gib"]


def test_dry_run_hero_round_trains_on_random_labels(dry_report):
    r = dry_report[0]["families"]["sd15"]["parts"]["hero"]
    assert r["timed_rounds"] == 1 and r["rounds_trained"] == 1  # a good and a bad image in every round
    assert r["labels"] == r["images_per_round"] == 4
    assert r["round_s"] > 0 and r["peak_gib"] > 0


def test_dry_run_skips_sdxl_with_a_reason(dry_report):
    sdxl = dry_report[0]["families"]["sdxl"]
    assert sdxl["status"] == "skipped" and "SDXL" in sdxl["reason"]


def test_a_failing_part_is_recorded_and_the_rest_run():
    results = {}

    def boom():
        raise RuntimeError("out of memory in part b")
    parts = [("a", lambda: {"x": 1}), ("b", boom), ("c", lambda: {"y": 2})]
    gpu_check.run_guarded(parts, gpu_check.Clock(100.0), results.__setitem__)
    assert results["a"]["status"] == "ok" and results["a"]["x"] == 1
    assert results["b"]["status"] == "error" and "out of memory in part b" in results["b"]["error"]
    assert any("boom" in line for line in results["b"]["traceback"])
    assert results["c"]["status"] == "ok" and results["c"]["y"] == 2


def test_parts_that_no_longer_fit_the_budget_are_skipped():
    import time

    results, ran = {}, []

    def slow():
        ran.append("slow")
        time.sleep(0.3)
        return {}
    clock = gpu_check.Clock(0.5)
    gpu_check.run_guarded([("slow", slow), ("next", lambda: ran.append("next") or {})], clock, results.__setitem__)
    assert ran == ["slow"]  # 0.2 s left < the 0.3 s the longest part took
    assert results["next"]["status"] == "skipped" and "time budget" in results["next"]["reason"]


def test_estimate_follows_the_published_table_and_is_linear_in_rows():
    table = gpu_check.SCALE_OUT_ESTIMATE_GIB["bf16/plain"]
    assert gpu_check._by_rows(table, 4) == table[4]
    # 6 rows lies on the line through the measured 4 and 8 rows.
    assert math.isclose(gpu_check._by_rows(table, 6), (table[4] + table[8]) / 2)
    est = gpu_check.scale_out_estimate(4, checkpointing=True)
    if not (ROOT / "bench" / "memory_estimate.json").is_file():
        assert math.isclose(est["bytes"], 1.03 * gpu_check.GiB) and "scale_out.md" in est["source"]


def test_without_a_gpu_the_real_check_refuses_with_the_fix(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the real check would run")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
