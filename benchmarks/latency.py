"""Latency of receiver alone, T2T and C2C on one decode engine, medians after warm-up.

    python benchmarks/latency.py                      # paper shapes on CUDA, else the tiny pair on CPU
    python benchmarks/latency.py --shapes tiny --prompts 64 256 --answers 16 64 --batches 1 4
    python benchmarks/latency.py --shapes small --prompts 64 256 --answers 16 --batches 1 4 --repeats 3

Every method prefills all prompt tokens but the last and continues with transformers' generate
(`c2c.fused.generate_from_prefix`; static cache, compiled, on CUDA). Timings are wall-clock
(CUDA events on GPU) around a whole call, medians of --repeats after --warmup runs. Answers are
forced to exactly A tokens (min_new_tokens = max_new_tokens). T2T: the sharer first writes a
message of exactly --t2t-message tokens (a stated fixed length), then the receiver reads prompt +
message and answers. "hf_eager" is plain `receiver.generate` with a dynamic cache, for the
engine-vs-eager per-token ratio. Pairs: "paper" = random weights of the paper pair's shapes
(CUDA); "small" = the small profile's real pair (Qwen2.5-Coder-0.5B-Instruct <- 1.5B-Instruct, the
offline GGUF weights in bf16) with a random fuser; "tiny" = the tiny receiver as its own sharer.
Every pair shares a vocabulary, so every prompt token is fused.

Writes results/<shapes>/latency.csv (one row per setting and method) and prints the ratios.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
from pathlib import Path

import torch

from c2c.fused import C2CModel, FusedInputs, SharerInputs, generate_from_prefix
from c2c.fuser import random_fuser
from c2c.models import load_model, paper_shape_model
from c2c.offline import SMALL_PAIR
from c2c.phases import elapsed_ms

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, device, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() after warm-up (CUDA events on a GPU, perf_counter on a CPU)."""
    samples = [elapsed_ms(fn, device)[1] for _ in range(warmup + repeats)]
    return statistics.median(samples[warmup:])


def build(shapes: str, device: torch.device):
    """(receiver, sharer, fused model) with a fuser whose gates are all open."""
    if shapes == "paper":
        receiver = paper_shape_model("qwen3-0.6b", device=device)
        sharer = paper_shape_model("qwen2.5-0.5b", device=device)
        fuser_options = {}
    elif shapes == "small":
        receiver, sharer = (load_model(source, dtype=torch.bfloat16, device=device)[0] for source in SMALL_PAIR)
        fuser_options = dict(hidden_dim=256, intermediate_dim=256)
    else:  # the tiny receiver as its own sharer: a shared vocabulary, like the paper pair
        receiver = sharer = load_model("tiny-receiver", device=device)[0]
        fuser_options = dict(hidden_dim=64, intermediate_dim=64)
    fuser = random_fuser(receiver.config, sharer.config, gate_logit=1.0, **fuser_options)
    fuser = fuser.to(device=device, dtype=receiver.dtype)
    model = C2CModel(receiver, None, [sharer], None, [fuser])  # fed token ids directly: no tokenizers needed
    return receiver, sharer, model


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    receiver, sharer, model = build(args.shapes, device)
    vocab = min(receiver.config.vocab_size, 100)
    rows = []
    for batch in args.batches:
        for prompt in args.prompts:
            generator = torch.Generator().manual_seed(prompt)
            ids = torch.randint(3, vocab, (batch, prompt), generator=generator).to(device)
            mask = torch.ones_like(ids)
            fused_inputs = FusedInputs(ids, mask, [SharerInputs(ids, mask, torch.arange(prompt, device=device)
                                                                .expand(batch, -1), mask.bool())])
            message = torch.randint(3, vocab, (batch, args.t2t_message), generator=generator).to(device)
            t2t_ids = torch.cat([ids, message], dim=1)
            for answer in args.answers:
                force = dict(max_new_tokens=answer, min_new_tokens=answer, do_sample=False)
                methods = {
                    "receiver": lambda: generate_from_prefix(receiver, ids, mask, **force),
                    "c2c": lambda: model.generate(fused_inputs, **force),
                    "t2t": lambda: (generate_from_prefix(sharer, ids, mask, max_new_tokens=args.t2t_message,
                                                         min_new_tokens=args.t2t_message, do_sample=False),
                                    generate_from_prefix(receiver, t2t_ids, torch.ones_like(t2t_ids), **force)),
                    "hf_eager": lambda: receiver.generate(input_ids=ids, attention_mask=mask, **force),
                }
                for name, fn in methods.items():
                    ms = timed(fn, device, args.warmup, args.repeats)
                    rows.append(dict(method=name, batch=batch, prompt=prompt, answer=answer,
                                     t2t_message=args.t2t_message if name == "t2t" else 0, ms=round(ms, 3),
                                     ms_per_answer_token=round(ms / answer, 3)))
                    print(f"batch {batch:3d} prompt {prompt:5d} answer {answer:4d} {name:9s} {ms:10.1f} ms", flush=True)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per setting: C2C / receiver, T2T / C2C, HF eager / engine (per token, from the longest answer)."""
    table = {}
    for row in rows:
        table.setdefault((row["batch"], row["prompt"], row["answer"]), {})[row["method"]] = row["ms"]
    return [dict(batch=b, prompt=p, answer=a, c2c_over_receiver=round(m["c2c"] / m["receiver"], 3),
                 t2t_over_c2c=round(m["t2t"] / m["c2c"], 3), hf_eager_over_engine=round(m["hf_eager"] / m["receiver"], 3))
            for (b, p, a), m in sorted(table.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--shapes", choices=("paper", "small", "tiny"), default="paper" if cuda else "tiny")
    parser.add_argument("--prompts", type=int, nargs="+", default=[256, 1024, 4096] if cuda else [64, 256])
    parser.add_argument("--answers", type=int, nargs="+", default=[16, 64, 256] if cuda else [16, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16] if cuda else [1, 4])
    parser.add_argument("--t2t-message", type=int, default=256 if cuda else 32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="CSV to write (default: results/<shapes>/latency.csv)")
    args = parser.parse_args()
    if args.shapes == "paper" and not cuda:
        parser.error("--shapes paper needs a CUDA device (use --shapes tiny on CPU)")
    args.out = args.out or ROOT / "results" / args.shapes / "latency.csv"
    # other processes' work lands in wall-clock timings: the 1-minute load average before the run goes with them
    load_before = round(os.getloadavg()[0], 2)
    rows = run(args)
    machine = torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()}, " \
                                                         f"{torch.get_num_threads()} threads"
    if not cuda and load_before > 0.5:
        print(f"warning: the machine was busy before this run (1-minute load average {load_before} on "
              f"{os.cpu_count()} cores): CPU timings include other processes' work")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "shapes", "machine", "load_before"])
        writer.writeheader()
        writer.writerows({**row, "shapes": args.shapes, "machine": machine, "load_before": load_before} for row in rows)
    print(f"\n{machine}, shapes={args.shapes}; wrote {args.out}")
    print(f"{'batch':>5} {'prompt':>6} {'answer':>6} {'C2C/receiver':>13} {'T2T/C2C':>8} {'HF eager/engine':>16}")
    for r in ratios(rows):
        print(f"{r['batch']:5d} {r['prompt']:6d} {r['answer']:6d} {r['c2c_over_receiver']:13.3f} "
              f"{r['t2t_over_c2c']:8.3f} {r['hf_eager_over_engine']:16.3f}")


if __name__ == "__main__":
    main()
