"""Items/s of batched C2C evaluation against batch 1, on the shared decode engine.

CPU: the tiny pair (random weights, untrained random fuser with open gates) on the tiny benchmark
fixtures. CUDA (when available): the paper's shapes, a Qwen3-0.6B-shaped receiver and a
Qwen2.5-0.5B-shaped sharer with random weights, the Qwen3 tokenizer for both (they share a
vocabulary), and a fuser of the paper's size, in bfloat16. Random weights never emit an end token,
so every item decodes the full ``max_new_tokens``: a worst case for "generate".

Per setting: one warm-up pass over a batch, then ``--repeats`` timed passes over all items; the
median gives items/s. Writes a table to stdout and ``results/eval_throughput.json``.

    python benchmarks/eval_throughput.py [--batch-sizes 1 4 16] [--repeats 3] [--items 32] [--threads 1]

On a shared CPU the numbers depend on the load (recorded in the JSON as the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from c2c.align import layer_map
from c2c.benchmarks import load_benchmark, write_tiny_fixtures
from c2c.fuser import C2CFuser, FuserConfig
from c2c.methods import C2C
from c2c.models import load_model

ROOT = Path(__file__).resolve().parents[1]
QWEN3_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen3"


def tiny_items(n: int):
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_tiny_fixtures(tmp)
        pool = [i for name in ("mmlu-redux", "arc-challenge", "openbookqa", "ceval")
                for i in load_benchmark(name, folders[name])]
    return [pool[k % len(pool)] for k in range(n)]  # repeats are fine: each call answers them again


def random_fuser(receiver, sharer, seed=0, **options):
    config = FuserConfig.for_models(receiver.config, sharer.config,
                                    layer_map(receiver.config.num_hidden_layers, sharer.config.num_hidden_layers),
                                    **options)
    torch.manual_seed(seed)
    fuser = C2CFuser(config).eval()
    with torch.no_grad():
        fuser.gate_logit.fill_(1.0)  # open: the fusion really runs
    return fuser


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure(method, items, batch_sizes, repeats, device) -> list[dict]:
    rows = []
    for batch_size in batch_sizes:
        method.answer(items[:batch_size], batch_size=batch_size)  # warm-up
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            method.answer(items, batch_size=batch_size)
            sync(device)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        rows.append({"batch_size": batch_size, "items": len(items), "seconds_median": median,
                     "seconds_all": times, "items_per_s": len(items) / median})
    base = rows[0]["items_per_s"]
    for row in rows:
        row["speedup_vs_first"] = row["items_per_s"] / base
    return rows


def cpu_setting(args) -> list[dict]:
    receiver, r_tok = load_model("tiny-receiver")
    sharer, s_tok = load_model("tiny-sharer")
    fuser = random_fuser(receiver, sharer, hidden_dim=32, intermediate_dim=24)
    items = tiny_items(args.items)
    out = []
    for scoring in ("logits", "generate"):
        method = C2C.from_models(receiver, r_tok, sharer, s_tok, fuser, scoring=scoring,
                                 max_new_tokens=args.max_new_tokens)
        out.append({"setting": f"cpu tiny pair, C2C {scoring}", "device": "cpu",
                    "rows": measure(method, items, args.batch_sizes, args.repeats, "cpu")})
    return out


def gpu_setting(args) -> list[dict]:
    if not Path(args.tokenizer).is_dir():
        raise FileNotFoundError(f"the Qwen3 tokenizer folder {args.tokenizer} is missing (--tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    tokenizer.padding_side = "left"
    vocab = 151936
    common = dict(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=32768,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        receiver = Qwen3ForCausalLM(Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                                num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                                **common)).to(torch.bfloat16).eval()
        sharer = Qwen2ForCausalLM(Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                              num_attention_heads=14, num_key_value_heads=2, **common)
                                  ).to(torch.bfloat16).eval()
    fuser = random_fuser(receiver, sharer)  # the paper's size: hidden 1024, intermediate 1024, 3 layers
    items = tiny_items(args.items)
    out = []
    for scoring in ("logits", "generate"):
        method = C2C.from_models(receiver, tokenizer, sharer, tokenizer, fuser, scoring=scoring,
                                 max_new_tokens=args.max_new_tokens)
        out.append({"setting": f"cuda paper shapes (Qwen3-0.6B <- Qwen2.5-0.5B, random weights, bf16), "
                               f"C2C {scoring}", "device": torch.cuda.get_device_name(0),
                    "rows": measure(method, items, args.batch_sizes, args.repeats, "cuda")})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own); on a shared, "
                        "busy CPU, 1 avoids thread oversubscription stalls that swamp small models")
    parser.add_argument("--out", default=str(ROOT / "results" / "eval_throughput.json"))
    parser.add_argument("--tokenizer", default=str(QWEN3_TOKENIZER), help="the Qwen3 tokenizer folder (CUDA setting)")
    parser.add_argument("--cuda-only", action="store_true", help="skip the CPU tiny-pair setting")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_sizes[0] != 1:
        args.batch_sizes = [1] + [b for b in args.batch_sizes if b != 1]

    load_at_start = os.getloadavg()
    settings = [] if args.cuda_only else cpu_setting(args)
    if torch.cuda.is_available():
        settings += gpu_setting(args)
        gpu_note = None
    else:
        gpu_note = "CUDA not available: the paper-shape GPU measurement was skipped"
        print(gpu_note)

    print(f"\n{'setting':<75} {'batch':>5} {'items/s':>9} {'speedup':>8}")
    for s in settings:
        for row in s["rows"]:
            print(f"{s['setting']:<75} {row['batch_size']:>5} {row['items_per_s']:>9.2f} "
                  f"{row['speedup_vs_first']:>7.2f}x")
    result = {
        "what": "items/s of batched C2C evaluation (c2c.methods.C2C.answer) vs batch 1; median of repeats after "
                "a warm-up batch; random weights decode max_new_tokens every item",
        "command": "python benchmarks/eval_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(), "gpu": gpu_note or "measured", "settings": settings,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
