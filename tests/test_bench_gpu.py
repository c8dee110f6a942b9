"""``benchmarks/bench_gpu.py`` (``make bench-gpu``) runs end to end on the CPU with tiny
sizes, and refuses one-line when CUDA is asked for and absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"


@pytest.mark.slow
def test_quick_cpu_run_writes_every_measure(tmp_path):
    out = tmp_path / "results_gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick",
                          "--repeats", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["quick"] and report["machine"]["device"] == "cpu"
    core, axial, sliding = report["core"], report["axialnet"], report["sliding_window"]
    for entry in (core["inference"], core["explain_1"], core["explain_20"], axial["inference"],
                  axial["explain"], sliding["inference"], sliding["explain"]):  # fmt: skip
        assert entry["seconds"] > 0 and len(entry["runs_s"]) == 1
    assert axial["findings"] == ["atelectasis", "pleural_effusion", "cardiomegaly", "nodule",
                                 "pericardial_effusion"]  # fmt: skip
    assert axial["explain_ms_per_scan"] == pytest.approx(1000 * axial["explain"]["seconds"])
    assert sliding["classes"] == ["right_lung", "heart"]
    assert f"wrote {out}" in run.stdout


def test_cuda_asked_without_cuda_is_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: no CUDA device")
    assert not (tmp_path / "r.json").exists()
