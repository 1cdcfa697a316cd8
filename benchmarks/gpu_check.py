"""`make gpu-check`: every check and measurement that needs a GPU, as one command of at most 9 minutes.

    make gpu-check DRY=1        # any machine: print the plan, check its inputs (a test runs this on CPU)
    make gpu-check              # a machine with a CUDA device: run it

Steps, one after the other, each in its own process under its own time limit (the limits add up to
STEP_LIMITS_TOTAL_S, under 9 minutes, so the whole run ends in time even where a step has to be cut; the
latency and evaluation steps get the most: their first call of each model and shape compiles it):
  1. the CUDA tests (`pytest -m cuda tests/test_cuda.py`): bf16 vs fp32 logits within the stated
     tolerance, static == dynamic greedy tokens (also through the methods as an evaluation decodes),
     compiled == eager decoding, no host synchronisation from c2c code in the fused prefill;
  2. latency at the paper's shapes (random weights) on a reduced grid, batch 1 then batch 8
     (`benchmarks/latency.py`);
  3. training throughput at the paper's shapes, online and from cached prompt caches
     (`benchmarks/train_throughput.py --cases paper --modes online,cached`);
  4. evaluation throughput at the paper's shapes (`benchmarks/eval_throughput.py --cuda-only`).
Writes results/gpu/<device>/{cuda_tests,latency,train_throughput,eval_throughput,summary}.json,
summary.md and gpu_check.log (every step's output), and prints one summary table.

On a lent GPU machine (no registry reachable; its python3 has torch and CUDA, but an older
transformers than requirements.lock), with the tree and `.gpu-inputs/` carried:
  here:  make gpu-inputs          # .gpu-inputs/: the locked transformers and datasets wheels (with the
                                  # datasets dependencies the machine lacks) and the Qwen3 tokenizer
  there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-inputs/wheels/*.whl \\
         && PYTHONPATH=/tmp/site make gpu-check PYTHON=python3; cp -r results/gpu/* "$OUT"/
If an import then fails for another package's version, add that package's wheel: GPU_WHEELS on the
command line replaces the Makefile's list, so give that list with NAME appended
(`make gpu-inputs GPU_WHEELS="<the Makefile's GPU_WHEELS> NAME"`). The machine's torch is its own (not the lock's):
the summary records the versions used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ROOT / ".gpu-inputs"  # carried to a GPU machine: wheels/ and tokenizers/ (`make gpu-inputs`)
TOKENIZER_CANDIDATES = (INPUTS / "tokenizers" / "qwen3", ROOT.parent / "shared" / "tokenizers" / "qwen3")
TREE_INPUTS = ("benchmarks/latency.py", "benchmarks/train_throughput.py", "benchmarks/eval_throughput.py",
               "tests/test_cuda.py", "tests/conftest.py", "requirements.lock", "c2c/assets/tiny_corpus.txt")
BUDGET_S = 9 * 60  # a lent machine runs one command for at most 10 minutes, carried wheels installed first


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: int
    output: str  # file under the results folder


def plan(out: Path, tokenizer: Path | str) -> list[Step]:
    python = sys.executable
    latency = [python, "benchmarks/latency.py", "--shapes", "paper", "--prompts", "1024", "--answers", "32",
               "--t2t-message", "128", "--warmup", "1", "--repeats", "3"]
    return [
        Step("cuda tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rA",
                            "-m", "cuda", "tests/test_cuda.py", f"--junitxml={out / 'cuda_tests.xml'}"],
             90, "cuda_tests.json"),
        Step("latency, batch 1", latency + ["--batches", "1", "--out", str(out / "latency_b1.csv")], 135,
             "latency.json"),
        Step("latency, batch 8", latency + ["--batches", "8", "--out", str(out / "latency_b8.csv")], 120,
             "latency.json"),
        Step("train throughput", [python, "benchmarks/train_throughput.py", "--cases", "paper", "--modes", "online,cached",
                                  "--steps", "3", "--warmup", "1", "--output", str(out / "train_throughput.json")],
             55, "train_throughput.json"),
        Step("eval throughput", [python, "benchmarks/eval_throughput.py", "--cuda-only", "--batch-sizes", "1", "16",
                                 "--items", "16", "--repeats", "2", "--max-new-tokens", "64", "--tokenizer",
                                 str(tokenizer), "--out", str(out / "eval_throughput.json")],
             110, "eval_throughput.json"),
    ]


STEP_LIMITS_TOTAL_S = sum(step.limit_s for step in plan(Path("."), "."))
assert STEP_LIMITS_TOTAL_S < BUDGET_S  # the rest is for starting Python and writing the summary


def locked_version(package: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise ValueError(f"requirements.lock pins no {package}")


def find_tokenizer() -> Path | None:
    return next((path for path in TOKENIZER_CANDIDATES if (path / "tokenizer.json").is_file()), None)


def device_folder(name: str) -> str:
    """A folder name from a device name: letters, digits, '.', '_' and '-' ("NVIDIA H200" -> "NVIDIA-H200")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "gpu"


def check_inputs() -> list[str]:
    """Problems with what the run needs (empty: ready); prints one line per input."""
    import transformers

    problems = []
    for path in TREE_INPUTS:
        ok = (ROOT / path).is_file()
        print(f"  {'ok     ' if ok else 'MISSING'} {path}")
        problems += [] if ok else [f"{path} is missing from the tree"]
    tokenizer = find_tokenizer()
    print(f"  {'ok     ' if tokenizer else 'MISSING'} Qwen3 tokenizer: "
          f"{tokenizer or ' or '.join(map(str, TOKENIZER_CANDIDATES))}")
    problems += [] if tokenizer else ["no Qwen3 tokenizer: run `make gpu-inputs` (copies ../shared/tokenizers/qwen3)"]
    wanted = locked_version("transformers")
    ok = transformers.__version__ == wanted
    print(f"  {'ok     ' if ok else 'WRONG  '} transformers {transformers.__version__} here, {wanted} locked")
    problems += [] if ok else [f"transformers {transformers.__version__} is installed, the code needs the locked "
                               f"{wanted}: install .gpu-inputs/wheels/ (`make gpu-inputs` here; see this module)"]
    wheels = sorted((INPUTS / "wheels").glob(f"transformers-{wanted}-*.whl"))
    print(f"  {'ok     ' if wheels else 'absent '} carried wheel for a GPU machine: "
          f"{wheels[0].relative_to(ROOT) if wheels else f'.gpu-inputs/wheels/transformers-{wanted}-*.whl (make gpu-inputs)'}")
    if problems:
        return problems  # collecting the CUDA tests needs the rest
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                                "--collect-only", "-m", "cuda", "tests/test_cuda.py"],
                               cwd=ROOT, capture_output=True, text=True, env=child_env(), timeout=300)
    count = re.search(r"(\d+) tests? collected", collected.stdout)
    ok = collected.returncode == 0 and count is not None
    print(f"  {'ok     ' if ok else 'BROKEN '} CUDA tests: {count.group(1) if count else 0} collected (-m cuda)")
    problems += [] if ok else [f"collecting the CUDA tests failed: {collected.stdout[-1000:]}{collected.stderr[-1000:]}"]
    return problems


def child_env() -> dict:
    """The environment of each step: this tree importable without installing it (a bare GPU machine)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    return env


def run_step(step: Step, log) -> dict:
    """Run one step under its time limit (its whole process group is killed at the limit)."""
    print(f"\n== {step.name} (limit {step.limit_s} s): {' '.join(step.argv)}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(step.argv, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=step.limit_s)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status = f"cut at its {step.limit_s} s limit"
    print(output, end="", flush=True)
    log.write(f"== {step.name}: {status}\n{output}\n")
    return {"step": step.name, "status": status, "seconds": round(time.perf_counter() - start, 1),
            "command": " ".join(step.argv)}


def junit_to_json(xml_path: Path, json_path: Path) -> dict:
    tests = []
    for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        detail = next((child.get("message", "") for child in case if child.tag in ("failure", "error", "skipped")), "")
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "message": detail[:2000]})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
    json_path.write_text(json.dumps({"counts": counts, "tests": tests}, indent=2) + "\n")
    xml_path.unlink()
    return counts


def latency_to_json(out: Path) -> list[dict]:
    import csv

    rows = []
    for path in sorted(out.glob("latency_b*.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
        path.unlink()
    by_setting: dict[tuple, dict] = {}
    for row in rows:
        by_setting.setdefault((int(row["batch"]), int(row["prompt"]), int(row["answer"])), {})[row["method"]] = float(row["ms"])
    ratios = [{"batch": b, "prompt": p, "answer": a, **{f"{m}_ms": v for m, v in ms.items()},
               "c2c_over_receiver": round(ms["c2c"] / ms["receiver"], 3) if {"c2c", "receiver"} <= ms.keys() else None,
               "t2t_over_c2c": round(ms["t2t"] / ms["c2c"], 3) if {"t2t", "c2c"} <= ms.keys() else None}
              for (b, p, a), ms in sorted(by_setting.items())]
    (out / "latency.json").write_text(json.dumps({"rows": rows, "settings": ratios}, indent=2) + "\n")
    return ratios


def findings(out: Path, results: list[dict]) -> list[str]:
    """One line of numbers per step, read from what the steps wrote."""
    lines = []
    if (out / "cuda_tests.xml").is_file():
        counts = junit_to_json(out / "cuda_tests.xml", out / "cuda_tests.json")
        lines.append("CUDA tests: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        if counts["passed"] == 0 or counts["passed"] != sum(counts.values()):  # on a GPU a skip is a failure too
            results[0]["status"] = "not all passed"
    for s in latency_to_json(out):
        lines.append(f"latency B={s['batch']} P={s['prompt']} A={s['answer']}: C2C/receiver {s['c2c_over_receiver']}, "
                     f"T2T/C2C {s['t2t_over_c2c']}")
    if (out / "train_throughput.json").is_file():
        for r in json.loads((out / "train_throughput.json").read_text())["results"]:
            lines.append(f"train {r.get('mode', 'online')} {r['batch']}x{r['length']}: " + (r["error"] if "error" in r else
                         f"{r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']}, {r.get('peak_memory_gib')} GiB"))
    if (out / "eval_throughput.json").is_file():
        for setting in json.loads((out / "eval_throughput.json").read_text())["settings"]:
            lines.append(f"eval {setting['setting'].rsplit(', ', 1)[-1]} ({setting['device']}): " + ", ".join(
                f"B={r['batch_size']} {r['items_per_s']:.2f} items/s" for r in setting["rows"]))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check its inputs; run nothing")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "<device name>"
    out = ROOT / "results" / "gpu" / device_folder(device) if cuda else ROOT / "results" / "gpu" / "<device>"
    steps = plan(out.relative_to(ROOT), find_tokenizer() or TOKENIZER_CANDIDATES[0])  # the steps run in ROOT
    print(f"gpu-check: {len(steps)} steps, time limits {STEP_LIMITS_TOTAL_S} s in all (budget {BUDGET_S} s); "
          f"results in {out.relative_to(ROOT)}/")
    for step in steps:
        print(f"  [{step.limit_s:>3} s] {step.name}: {' '.join(step.argv)}")
    print("inputs:")
    problems = check_inputs()
    if problems:
        print("gpu-check: not ready:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"gpu-check DRY: ready{'' if cuda else ' (no CUDA device here: run it on a GPU machine)'}; nothing run")
        return 0
    if not cuda:
        print("gpu-check: needs a CUDA device (`make gpu-check DRY=1` checks the plan anywhere)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (out / "gpu_check.log").open("w") as log:
        results = [run_step(step, log) for step in steps]
    lines = findings(out, results)
    import transformers

    summary = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
               "transformers": transformers.__version__, "seconds": round(time.perf_counter() - start, 1),
               "steps": results, "findings": lines}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = [f"# gpu-check on {device}", "", f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
             f"{transformers.__version__}; {summary['seconds']} s in all.", "", "| step | status | seconds |",
             "|---|---|---:|"] + [f"| {r['step']} | {r['status']} | {r['seconds']} |" for r in results]
    table += ["", *[f"- {line}" for line in lines], ""]
    (out / "summary.md").write_text("\n".join(table))
    print("\n" + "\n".join(table))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
