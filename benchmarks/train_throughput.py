"""Fuser training throughput: tokens/s and model-FLOPs utilisation of one optimizer step.

    python benchmarks/train_throughput.py [--steps 5] [--warmup 2] [--threads N] [--cases tiny,paper]
                                          [--modes online,cached]

Cases:
- tiny:  the tiny pair (tiny-receiver <- tiny-sharer, the fuser of configs/train_tiny.yaml), fp32 on
         CPU (bf16 autocast on a GPU), batches 4x256 and 8x512;
- paper: Qwen3-0.6B <- Qwen2.5-0.5B shapes built from their configs with random weights, the paper's
         fuser (hidden 1024, 3 layers), bf16 autocast with fp32 master weights, batches 4x1024 and
         8x2048. GPU only: skipped (and said so) without a CUDA device.
- small: the small profile's multiple-choice regime (configs/train_small_mc.yaml): the offline
         Qwen2.5-Coder-0.5B-Instruct <- 1.5B-Instruct in bf16, the fuser (hidden 256) in fp32, batch 16
         of 196 tokens split as an MC example is (190 prompt tokens, 6 answer tokens). Needs the offline
         models (`make models-small`).
Batches of tiny and paper are split 70% instruction / 30% response tokens; no padding, every prompt
token fused.

Modes: `online` runs both frozen models over the prompt in every step; `cached` reads their prompt
caches from prefix stores (c2c.prefixes, what `prefix_cache: true` does in training) in a temporary
folder, filled by the warm-up steps, so a timed step costs the fuser and the receiver's pass over the
response only. Examples/s of the two modes, measured in one run, is the speed-up of cached training.
A step is exactly what `c2c.train` does per micro-batch: fused prefill, receiver forward over the
response, cross-entropy on the response, backward into the fuser, gradient clipping, AdamW step,
gate temperature update. Timed over `--steps` steps after `--warmup`, synchronising only at the ends.

FLOPs of one step (B sequences, P prompt + R response tokens; N_* = parameters in the transformer
body, without embeddings and output layer; V x H = the receiver's output layer; N_f = fuser parameters):
    fuser (forward + backward)              6 N_f  B (P-1)
    sharer prefill (forward, frozen)        2 N_s  B P
    receiver prefill (forward, frozen)      2 N_r  B (P-1)
    receiver over the response, forward     2 N_r  B R + 2 V H B R
    ... and backward to its activations     2 N_r  B R + 2 V H B R   (no weight gradients: frozen)
The cached mode does not run the two prefills: its FLOPs leave those two terms out. Attention-score
FLOPs are left out (as in the usual 6N rule). MFU = FLOPs / time / peak dense bf16
FLOP/s of the GPU (CPU: no peak known, MFU not reported).

Results are printed as a table and merged into results/train_throughput.json (entries are replaced by
case, mode, device and shape), with a description of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from c2c.align import layer_map
from c2c.data import TrainBatch
from c2c.fused import C2CModel, FusedInputs, SharerInputs
from c2c.fuser import C2CFuser, FuserConfig
from c2c.models import load_model
from c2c.offline import SMALL_PAIR
from c2c.prefixes import PrefixStore
from c2c.train import FuserTrainingModule, optimizer_groups
from c2c.train_config import load_train_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "train_throughput.json"
PROMPT_FRACTION = 0.7  # tiny and paper cases
MC_PROMPT_FRACTION = 190 / 196  # small case: an MC example's prompt and answer (" X.<|im_end|>\n" and padding)
MODES = ("online", "cached")
# dense bf16 peak FLOP/s by GPU name fragment (no sparsity)
PEAK_BF16 = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.0e12,
             "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.05e12, "A10G": 125.0e12, "RTX 4090": 165.2e12}


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_BF16.items():
        if fragment in name:
            return peak
    return None


def body_parameters(model) -> int:
    """Parameters of the transformer body: all but the input embedding and the output layer."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def step_flops(n_fuser: int, n_sharer: int, n_receiver: int, vocab_hidden: int, batch: int, prompt: int,
               response: int, prefills: bool = True) -> float:
    """The formula in the module docstring (without the two prefill terms when prefills is False)."""
    fused = batch * (prompt - 1)
    prefill = 2 * n_sharer * batch * prompt + 2 * n_receiver * fused if prefills else 0
    return 6 * n_fuser * fused + prefill + 4 * n_receiver * batch * response + 4 * vocab_hidden * batch * response


# ---- model pairs -------------------------------------------------------------------------------


def tiny_pair(device, dtype):
    receiver, receiver_tok = load_model("tiny-receiver", dtype=dtype, device=device)
    sharer, sharer_tok = load_model("tiny-sharer", dtype=dtype, device=device)
    fuser_options = load_train_config(ROOT / "configs" / "train_tiny.yaml").fuser
    return receiver, receiver_tok, sharer, sharer_tok, fuser_options


def paper_pair(device, dtype):
    """Qwen3-0.6B and Qwen2.5-0.5B shapes with random weights (their public configs, written out here)."""
    receiver_config = Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)
    sharer_config = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)
    models = []
    for config in (receiver_config, sharer_config):
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        models.append(model.requires_grad_(False).eval())
    # any one tokenizer for both sides: the batch is built from ids, the shared vocabulary skips alignment
    _, tokenizer = load_model("tiny-receiver")
    fuser_options = {"hidden_dim": 1024, "intermediate_dim": 1024, "num_layers": 3, "dropout": 0.1}
    return models[0], tokenizer, models[1], tokenizer, fuser_options


def small_pair(device, dtype):
    """The small profile's real offline pair in bf16 (the frozen models' dtype in configs/train_small_mc.yaml)."""
    receiver, receiver_tok = load_model(SMALL_PAIR[0], dtype=torch.bfloat16, device=device)
    sharer, sharer_tok = load_model(SMALL_PAIR[1], dtype=torch.bfloat16, device=device)
    fuser_options = load_train_config(ROOT / "configs" / "train_small_mc.yaml").fuser
    return receiver, receiver_tok, sharer, sharer_tok, fuser_options


# ---- one case ----------------------------------------------------------------------------------


def synthetic_batch(receiver, sharer, batch: int, length: int, device, seed: int = 0,
                    prompt_fraction: float = PROMPT_FRACTION) -> TrainBatch:
    """Random ids, no padding, P = prompt_fraction of the tokens prompt (all fused, one sharer token per
    receiver token), R = the rest response."""
    generator = torch.Generator().manual_seed(seed)
    prompt = int(round(length * prompt_fraction))
    response = length - prompt
    ids = torch.randint(0, receiver.config.vocab_size, (batch, prompt), generator=generator)
    sharer_ids = torch.randint(0, sharer.config.vocab_size, (batch, prompt), generator=generator)
    ones = torch.ones(batch, prompt, dtype=torch.long)
    sharers = [SharerInputs(sharer_ids, ones, torch.arange(prompt).expand(batch, prompt).contiguous(),
                            torch.ones(batch, prompt, dtype=torch.bool))]
    continuation = torch.randint(0, receiver.config.vocab_size, (batch, response), generator=generator)
    mask = torch.ones(batch, response, dtype=torch.long)
    result = TrainBatch(FusedInputs(ids, ones, sharers), continuation, mask, continuation.clone(),
                        torch.arange(batch * response), batch * response, batch * length)
    return result.to(device)


def run_case(name: str, pair, device, precision: str, shapes, steps: int, warmup: int, modes=("online",),
             prompt_fraction: float = PROMPT_FRACTION) -> list[dict]:
    rows = []
    for mode in modes:
        if mode == "online":
            rows += _run_mode(name, pair, device, precision, shapes, steps, warmup, mode, prompt_fraction)
            continue
        if warmup < 1:
            raise ValueError("the cached mode needs --warmup >= 1: the warm-up steps fill the prefix stores")
        receiver, sharer = pair[0], pair[2]
        with tempfile.TemporaryDirectory(prefix="c2c-throughput-") as folder:
            stores = [PrefixStore(model, Path(folder) / role, progress=False).attach()
                      for role, model in (("receiver", receiver), ("sharer", sharer))]
            try:
                rows += _run_mode(name, pair, device, precision, shapes, steps, warmup, mode, prompt_fraction)
            finally:
                for store in stores:
                    store.detach()
            if any(store.computed == 0 for store in stores):  # the warm-up must have filled both stores
                raise RuntimeError("the cached mode computed no prefix caches: its stores were not used")
    return rows


def _run_mode(name, pair, device, precision, shapes, steps, warmup, mode, prompt_fraction) -> list[dict]:
    receiver, receiver_tok, sharer, sharer_tok, fuser_options = pair
    mapping = layer_map(receiver.config.num_hidden_layers, sharer.config.num_hidden_layers)
    config = FuserConfig.for_models(receiver.config, sharer.config, mapping, anneal_steps=1000, **fuser_options)
    torch.manual_seed(0)
    fuser = C2CFuser(config).to(device)  # fp32 master weights
    model = C2CModel(receiver, receiver_tok, [sharer], [sharer_tok], [fuser]).train()
    module = FuserTrainingModule(model)
    optimizer = torch.optim.AdamW(optimizer_groups(fuser, 0.01), lr=1e-4)
    n_fuser = sum(p.numel() for n, p in fuser.named_parameters() if n != "gate_logit")
    n_receiver, n_sharer = body_parameters(receiver), body_parameters(sharer)
    vocab_hidden = receiver.get_output_embeddings().weight.numel()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    rows = []
    for batch_size, length in shapes:
        batch = synthetic_batch(receiver, sharer, batch_size, length, device, prompt_fraction=prompt_fraction)
        prompt, response = batch.inputs.input_ids.shape[1], batch.continuation_ids.shape[1]

        def step(number, batch=batch):
            with autocast:
                loss = module(batch) / batch.num_label_tokens
            loss.backward()
            torch.nn.utils.clip_grad_norm_(fuser.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            fuser.set_step(number)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        try:
            for i in range(warmup):
                step(i + 1)
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for i in range(steps):
                step(warmup + i + 1)
            sync()
            elapsed = (time.perf_counter() - start) / steps
        except torch.OutOfMemoryError:
            rows.append({"case": name, "mode": mode, "batch": batch_size, "length": length, "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        flops = step_flops(n_fuser, n_sharer, n_receiver, vocab_hidden, batch_size, prompt, response,
                           prefills=mode == "online")
        peak = peak_flops(device)
        row = {
            "case": name, "mode": mode,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": precision, "model_dtype": str(receiver.dtype).removeprefix("torch."),
            "batch": batch_size, "length": length, "prompt": prompt, "response": response,
            "threads": torch.get_num_threads(), "steps": steps, "step_time_s": round(elapsed, 5),
            "examples_per_s": round(batch_size / elapsed, 3), "tokens_per_s": round(batch_size * length / elapsed, 1),
            "response_tokens_per_s": round(batch_size * response / elapsed, 1),
            "model_tflop_per_step": round(flops / 1e12, 5), "achieved_tflop_s": round(flops / elapsed / 1e12, 4),
            "mfu": round(flops / elapsed / peak, 4) if peak else None,
            "params": {"fuser": n_fuser, "receiver_body": n_receiver, "sharer_body": n_sharer,
                       "receiver_output_layer": vocab_hidden},
        }
        if device.type == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows.append(row)
        del batch
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'case':6} {'mode':7} {'device':26} {'prec':5} {'thr':>3} {'B x L':>9} {'P/R':>9} {'step s':>8} " \
             f"{'ex/s':>8} {'tok/s':>10} {'TFLOP/s':>9} {'MFU':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:6} {r['mode']:7} {'':26} {'':5} {'':>3} {r['batch']}x{r['length']:<6} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['case']:6} {r['mode']:7} {r['device'][:26]:26} {r['precision']:5} {r['threads']:>3} "
              f"{r['batch']:>3}x{r['length']:<5} {r['prompt']:>4}/{r['response']:<4} {r['step_time_s']:>8.4f} "
              f"{r['examples_per_s']:>8.3f} {r['tokens_per_s']:>10.0f} {r['achieved_tflop_s']:>9.4f} {mfu:>6}")
    for speedup in cached_speedups(rows):
        print(f"{speedup['case']} {speedup['batch']}x{speedup['length']}: cached prompt caches train "
              f"{speedup['speedup']:.1f}x the examples/s of online prefills")


def cached_speedups(rows: list[dict]) -> list[dict]:
    """Examples/s of the cached mode over the online mode, per case and shape measured in both."""
    timed = {(r["case"], r["batch"], r["length"], r["mode"]): r for r in rows if "error" not in r}
    return [{"case": case, "batch": batch, "length": length,
             "speedup": round(timed[(case, batch, length, "cached")]["examples_per_s"] / r["examples_per_s"], 2)}
            for (case, batch, length, mode), r in timed.items()
            if mode == "online" and (case, batch, length, "cached") in timed]


def save(rows: list[dict], skipped: list[str], path: Path) -> None:
    previous = json.loads(path.read_text()) if path.exists() else {}
    key = lambda r: (r["case"], r.get("mode", "online"), r.get("device"), r.get("precision"), r.get("threads"),  # noqa: E731
                     r["batch"], r["length"])
    new_keys = {key(r) for r in rows}
    kept = [r for r in previous.get("results", []) if key(r) not in new_keys]
    description = machine()
    for r in rows:
        r["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        r["machine"] = {k: description.get(k) for k in ("cpu", "cpu_count", "gpu", "load_average")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "formula": "6 N_f B (P-1) + 2 N_s B P + 2 N_r B (P-1) + 4 N_r B R + 4 V H B R "
                   "(N_* without embeddings/output layer; attention scores excluded)",
        "machine": description, "skipped": skipped, "results": kept + rows,
        "cached_speedups": cached_speedups(rows)}, indent=2) + "\n")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--cases", default="tiny,paper", help="comma-separated: tiny, paper, small")
    parser.add_argument("--modes", default="online", help="comma-separated: online, cached")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16" if cuda else "fp32"
    dtype = torch.bfloat16 if cuda else torch.float32
    rows, skipped = [], []
    cases, modes = args.cases.split(","), args.modes.split(",")
    unknown = sorted(set(cases) - {"tiny", "paper", "small"}) + sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown case or mode {unknown}: cases are tiny, paper, small; modes are {', '.join(MODES)}")
    if "tiny" in cases:
        rows += run_case("tiny", tiny_pair(device, dtype), device, precision, [(4, 256), (8, 512)], args.steps,
                         args.warmup, modes)
    if "paper" in cases:
        if cuda:
            rows += run_case("paper", paper_pair(device, dtype), device, precision, [(4, 1024), (8, 2048)],
                             args.steps, args.warmup, modes)
        else:
            message = "paper shapes (Qwen3-0.6B <- Qwen2.5-0.5B): skipped, no CUDA device"
            skipped.append(message)
            print(message)
    if "small" in cases:
        rows += run_case("small", small_pair(device, dtype), device, precision, [(16, 196)], args.steps, args.warmup,
                         modes, prompt_fraction=MC_PROMPT_FRACTION)
    print_table(rows)
    save(rows, skipped, args.output)
    print(f"written to {args.output}")
    return rows


if __name__ == "__main__":
    main()
