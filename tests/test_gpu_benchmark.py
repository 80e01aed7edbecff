"""benchmarks/gpu_benchmark.py on the tiny fixtures: what it reports, and a kept --work_dir."""

from __future__ import annotations

import datetime
import json
import sys

import pytest
from conftest import ROOT, script_env, use_environment

sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_benchmark import block_means, log_edges, main, off_the_step_clock, startup_parts


def test_steps_are_compared_in_the_same_blocks_whatever_the_logging_interval():
    every_step = [{"step": s, "step_seconds": float(s)} for s in range(1, 11)]
    every_five = [{"step": 5, "step_seconds": 3.0}, {"step": 10, "step_seconds": 8.0}]
    assert block_means(every_step) == block_means(every_five) == [3.0, 8.0]


def test_startup_parts_come_from_the_trainers_startup_record():
    records = [
        {"step": 0, "startup_seconds": 3.0, "startup/models_seconds": 1.0, "startup/embeddings_cache_seconds": 2.0},
        {"step": 5, "loss": 0.1, "step_seconds": 0.2},
    ]
    assert startup_parts(records) == {
        "startup_seconds": 3.0,
        "startup_parts_seconds": {"models": 1.0, "embeddings_cache": 2.0},
    }
    assert startup_parts(records[1:]) == {}


def test_log_edges_time_the_process_before_its_first_log_line_and_after_its_last():
    log = (
        "Generating train split: 64 examples\n"
        "2026-11-27 05:00:10,500 INFO controlnet_trainer.integrity: Checking that the images open\n"
        "a warning without a timestamp\n"
        "2026-11-27 05:00:40,250 INFO controlnet_trainer.training: Saved the ControlNet\n"
    )
    first = datetime.datetime(2026, 11, 27, 5, 0, 10, 500000).timestamp()
    edges = log_edges(log, started_at=first - 20.5, ended_at=first + 29.75 + 41.0)
    assert edges == pytest.approx({"before_first_log_seconds": 20.5, "after_last_log_seconds": 41.0})
    assert log_edges("no timestamps\n", 0.0, 1.0) == {}


def test_time_a_run_spent_off_the_step_clock_is_what_its_parts_leave_unexplained():
    log = "2026-11-27 11:55:58,692 INFO controlnet_trainer.training: [RANK 0] Saved the ControlNet to /tmp/x (1.6 s)\n"
    # A --use_ema run on an H100 whose weight swap runs every step, off the step clock.
    row = {
        "process_seconds_outside_steps": 62.7,
        "startup_seconds": 6.1,
        "before_first_log_seconds": 20.6,
        "after_last_log_seconds": 2.8,
    }
    assert off_the_step_clock(row, log) == pytest.approx({"final_save_seconds": 1.6, "off_step_clock_seconds": 31.6})
    assert off_the_step_clock(row, "a run that never saved\n") == {}
    assert off_the_step_clock({"process_seconds_outside_steps": 9.0}, log) == {}  # no start-up record


def test_a_kept_work_dir_is_reused_by_the_next_run(tmp_path, monkeypatch):
    """The benchmark runs here (its training cases are child processes either way)."""
    work, out, logs = tmp_path / "work", tmp_path / "results.json", tmp_path / "logs"
    use_environment(monkeypatch, script_env())  # what a command line would give it
    argv = [
        "--tiny",
        "--families=sd15",
        "--only=b2 cached default",
        "--steps=10",
        f"--work_dir={work}",
        f"--out={out}",
        f"--logs={logs}",
    ]

    def bench() -> dict:
        main(argv)
        (case,) = json.loads(out.read_text())["cases"]
        assert "error" not in case, case.get("error")
        return case

    first = bench()
    assert {"models", "embeddings_cache"} <= set(first["startup_parts_seconds"])
    assert 0 < first["startup_seconds"] < first["process_seconds_outside_steps"]
    edges = first["before_first_log_seconds"] + first["after_last_log_seconds"]
    assert 0 < edges < first["process_seconds_outside_steps"] - first["startup_seconds"]
    assert first["final_save_seconds"] >= 0 and "off_step_clock_seconds" in first
    weights = sorted((work / "model-sd15-tiny").rglob("*.safetensors"))
    built = [path.stat().st_mtime_ns for path in weights]
    bench()
    assert [path.stat().st_mtime_ns for path in weights] == built  # the models were not rebuilt
    assert "Reusing the embeddings cached" in (logs / "tiny-sd_b2_cached_default.log").read_text()
