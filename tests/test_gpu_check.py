"""`make gpu-check`: the dry run on any machine, and the run's own machinery (steps under time limits, the
summary read from what the steps write) on CPU-sized steps, so a GPU session only has to run it."""

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_the_plan_and_checks_its_inputs(gpu_check):
    result = subprocess.run(["make", "-s", "gpu-check", "DRY=1", f"GPU_PY={sys.executable}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for step in gpu_check.plan(Path("out"), "tok"):
        assert f"] {step.name}: " in result.stdout
    assert f"time limits {gpu_check.STEP_LIMITS_TOTAL_S} s in all (budget 540 s)" in result.stdout
    assert gpu_check.STEP_LIMITS_TOTAL_S <= 540 - 30  # time to start Python and write the summary
    assert gpu_check.BUDGET_S + 60 <= 600  # a lent machine's limit per command, a minute left to install the wheels
    assert "CUDA tests: 8 collected" in result.stdout and "nothing run" in result.stdout


def test_dry_run_names_a_missing_input(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "TREE_INPUTS", (*gpu_check.TREE_INPUTS, "benchmarks/missing.py"))
    assert gpu_check.main(["--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert "MISSING benchmarks/missing.py" in out and "benchmarks/missing.py is missing from the tree" in err


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_steps_run_under_their_limits_and_the_summary_reads_their_outputs(gpu_check, tmp_path, monkeypatch):
    py, out = sys.executable, tmp_path
    steps = [  # in a process each, under a limit: the CUDA tests (all skipped here), and one that is too slow
        gpu_check.Step("cuda tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m",
                                      "cuda", "tests/test_cuda.py", f"--junitxml={out / 'cuda_tests.xml'}"], 300, ""),
        gpu_check.Step("too slow", [py, "-c", "import time; time.sleep(60)"], 1, ""),
    ]
    log = io.StringIO()
    results = [gpu_check.run_step(step, log) for step in steps]
    assert [r["status"] for r in results] == ["ok", "cut at its 1 s limit"]
    assert results[-1]["seconds"] < 30 and "== too slow: cut" in log.getvalue()
    # the benchmark scripts with CPU-sized arguments (in this process: faster), writing what the GPU steps write
    monkeypatch.setattr(sys, "argv", ["latency.py", "--shapes", "tiny", "--prompts", "16", "--answers", "4", "--batches",
                                      "2", "--t2t-message", "4", "--warmup", "0", "--repeats", "1",
                                      "--out", str(out / "latency_b2.csv")])
    load("latency").main()
    load("train_throughput").main(["--cases", "tiny", "--modes", "online,cached", "--steps", "1", "--warmup", "1",
                                   "--output", str(out / "train_throughput.json")])
    load("eval_throughput").main(["--batch-sizes", "1", "--items", "2", "--repeats", "1", "--max-new-tokens", "2",
                                  "--out", str(out / "eval_throughput.json")])

    lines = gpu_check.findings(out, results)
    # without a GPU every CUDA test is skipped: the check reports it as not passed, never as passing
    assert results[0]["status"] == "not all passed"
    tests = json.loads((out / "cuda_tests.json").read_text())
    assert tests["counts"] == {"passed": 0, "failure": 0, "error": 0, "skipped": 8}
    assert all("needs a CUDA device" in t["message"] for t in tests["tests"])
    assert not (out / "cuda_tests.xml").exists() and not list(out.glob("latency_b*.csv"))
    latency = json.loads((out / "latency.json").read_text())
    (setting,) = latency["settings"]
    assert setting["c2c_over_receiver"] == pytest.approx(setting["c2c_ms"] / setting["receiver_ms"], abs=1e-3)
    assert lines[0] == "CUDA tests: 0 passed, 0 failure, 0 error, 8 skipped"
    assert lines[1].startswith("latency B=2 P=16 A=4: C2C/receiver ")
    assert [line.split(":")[0] for line in lines[2:6]] == ["train online 4x256", "train online 8x512",
                                                           "train cached 4x256", "train cached 8x512"]
    assert lines[6].startswith("eval C2C logits (cpu): B=1 ") and lines[7].startswith("eval C2C generate (cpu): B=1 ")
