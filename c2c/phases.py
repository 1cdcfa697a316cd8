"""Where a query's time goes: the paper's Table 3 (time and tokens per phase) and Table 4's time column.

Every item runs alone (batch size 1) through each method on the shared engine of ``c2c.methods``
(generate scoring: the chat template with thinking off, greedy decoding), each phase timed on its own:

* receiver / sharer alone: **prefill** (every prompt token but the last, ``c2c.fused.prefix_cache``),
  **decode** (the last prompt token, then every generated one, ``c2c.fused.generate_from_prefix``);
* T2T: the sharer's prefill and decode of its background text (at most ``sharer_max_new_tokens``),
  then the receiver's prefill and decode of the question with that text;
* C2C: one ``C2CModel.prefill`` call, split by hooks around each model's decoder into **receiver
  prefill**, **sharer prefill** and **fusion** (the rest of the call: gathering the aligned sharer
  cache, the fuser, writing the fused cache), then the receiver's decode from the fused cache.

Clocks: CUDA events on a GPU, ``time.perf_counter`` on a CPU. The first ``warmup`` items run once untimed.
Per phase, the table reports the median over items (ms) and the mean token counts; a method's time
per query is the median of its per-item totals.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from c2c.benchmarks import DEFAULT_T2T_PROTOCOL, MCItem, t2t_receiver_messages, t2t_sharer_prompt
from c2c.fused import PREFIX_STORE_ATTRIBUTE, generate_from_prefix, left_pad, pad_token_id, prefix_cache
from c2c.methods import C2C, _check_decoding, _decode_new, _eos_ids, _greedy_kwargs, chat_messages, render_ids

METHOD_ORDER = ("receiver", "sharer", "t2t", "c2c")


class Clock:
    """Marks on one device's timeline: CUDA events on a GPU (read after a synchronise), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1000.0


def elapsed_ms(fn: Callable, device: torch.device):
    """(fn(), milliseconds it took on ``device``)."""
    clock = Clock(device)
    start = clock.mark()
    result = fn()
    end = clock.mark()
    return result, clock.ms(start, end)


class DecoderTimer:
    """Times every forward of the given decoders while active (hooks): role -> list of ms, in call order."""

    def __init__(self, decoders: dict[str, torch.nn.Module], device: torch.device):
        if len({id(m) for m in decoders.values()}) != len(decoders):
            raise ValueError(f"the timed models {list(decoders)} must be distinct objects (e.g. a sharer other "
                             "than the receiver itself)")
        self.decoders, self.clock = decoders, Clock(device)
        self.marks: dict[str, list] = defaultdict(list)
        self.handles = []

    def __enter__(self):
        for role, module in self.decoders.items():
            self.handles.append(module.register_forward_pre_hook(lambda *_, r=role: self.marks[r].append(self.clock.mark())))
            self.handles.append(module.register_forward_hook(lambda *_, r=role: self.marks[r].append(self.clock.mark())))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def total_ms(self, role: str) -> float:
        marks = self.marks[role]
        return sum(self.clock.ms(marks[i], marks[i + 1]) for i in range(0, len(marks), 2))


def _single(model, tokenizer, messages: list[dict], max_new_tokens: int) -> dict:
    """Prefill and decode of one model on one chat: tokens, ms, and the reply."""
    ids, mask = left_pad([render_ids(tokenizer, messages)], pad_token_id(tokenizer), model.device)  # (1, N)
    cache, prefill = elapsed_ms(lambda: prefix_cache(model, ids, mask), model.device)
    greedy = _greedy_kwargs(model, tokenizer, max_new_tokens)
    sequences, decode = elapsed_ms(lambda: generate_from_prefix(model, ids, mask, cache, **greedy), model.device)
    _check_decoding(greedy)
    texts, counts = _decode_new(tokenizer, sequences[:, ids.shape[1]:], _eos_ids(model, tokenizer))
    return {"input_tokens": ids.shape[1], "output_tokens": counts[0], "prefill_ms": prefill, "decode_ms": decode,
            "text": texts[0]}


def _fused(method: C2C, item: MCItem, max_new_tokens: int) -> tuple[dict, dict]:
    """C2C on one item: (sharer stage, receiver stage), the fusion time in the sharer stage's fusion_ms."""
    m = method.model
    inputs = method.prepare([chat_messages(item)]).to(m.receiver.device)
    timer = DecoderTimer({"receiver": m.receiver.get_decoder(), "sharer": m.sharers[0].get_decoder()},
                         m.receiver.device)
    with timer:
        cache, prefill = elapsed_ms(lambda: m.prefill(inputs), m.receiver.device)
    receiver_ms, sharer_ms = timer.total_ms("receiver"), timer.total_ms("sharer")
    greedy = _greedy_kwargs(m.receiver, m.receiver_tokenizer, max_new_tokens)
    sequences, decode = elapsed_ms(lambda: generate_from_prefix(m.receiver, inputs.input_ids, inputs.attention_mask,
                                                                cache, **greedy), m.receiver.device)
    _check_decoding(greedy)
    _, counts = _decode_new(m.receiver_tokenizer, sequences[:, inputs.input_ids.shape[1]:],
                            _eos_ids(m.receiver, m.receiver_tokenizer))
    sharer = {"input_tokens": int(inputs.sharers[0].attention_mask.sum()), "output_tokens": 0,
              "prefill_ms": sharer_ms, "decode_ms": 0.0, "fusion_ms": prefill - receiver_ms - sharer_ms}
    receiver = {"input_tokens": inputs.input_ids.shape[1], "output_tokens": counts[0], "prefill_ms": receiver_ms,
                "decode_ms": decode}
    return sharer, receiver


def item_phases(method: C2C, item: MCItem, *, max_new_tokens: int, sharer_max_new_tokens: int,
                t2t_protocol: str = DEFAULT_T2T_PROTOCOL) -> list[dict]:
    """One row per (method, stage) for one item: method, stage, input/output tokens, prefill/decode/fusion ms
    (T2T in ``t2t_protocol``, one of ``c2c.benchmarks.T2T_PROTOCOLS``)."""
    m = method.model
    receiver, r_tok, sharer, s_tok = m.receiver, m.receiver_tokenizer, m.sharers[0], m.sharer_tokenizers[0]
    chat = chat_messages(item)
    background = _single(sharer, s_tok, [{"role": "user", "content": t2t_sharer_prompt(item, t2t_protocol)}],
                         sharer_max_new_tokens)
    stages = [("receiver", "receiver", _single(receiver, r_tok, chat, max_new_tokens)),
              ("sharer", "sharer", _single(sharer, s_tok, chat, max_new_tokens)),
              ("t2t", "sharer", background),
              ("t2t", "receiver", _single(receiver, r_tok, t2t_receiver_messages(item, background["text"], t2t_protocol),
                                          max_new_tokens))]
    c2c_sharer, c2c_receiver = _fused(method, item, max_new_tokens)
    stages += [("c2c", "sharer", c2c_sharer), ("c2c", "receiver", c2c_receiver)]
    rows = []
    for name, stage, values in stages:
        rows.append({"item": item.id, "method": name, "stage": stage, "input_tokens": values["input_tokens"],
                     "output_tokens": values["output_tokens"], "prefill_ms": values["prefill_ms"],
                     "decode_ms": values["decode_ms"], "fusion_ms": values.get("fusion_ms", 0.0)})
    return rows


@torch.no_grad()
def phase_timing(method: C2C, items: Sequence[MCItem], *, max_new_tokens: int = 64, sharer_max_new_tokens: int = 256,
                 t2t_protocol: str = DEFAULT_T2T_PROTOCOL, warmup: int = 1) -> list[dict]:
    """``item_phases`` of every item (after ``warmup`` untimed items, the first ones repeated)."""
    items = list(items)
    if not items:
        raise ValueError("phase_timing needs at least one item")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    m = method.model
    if any(getattr(model, PREFIX_STORE_ATTRIBUTE, None) is not None for model in (m.receiver, *m.sharers)):
        raise ValueError("a model of this C2C method reads its prompt caches from disk (prefix_cache): build the "
                         "method with prefix_cache=False to time its prefill")
    options = {"max_new_tokens": max_new_tokens, "sharer_max_new_tokens": sharer_max_new_tokens,
               "t2t_protocol": t2t_protocol}
    for i in range(warmup):
        item_phases(method, items[i % len(items)], **options)
    return [row for item in items for row in item_phases(method, item, **options)]


def phase_table(rows: list[dict]) -> list[dict]:
    """Table 3: per (method, stage) the mean tokens and median ms per phase; per method the median total."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in rows:
        groups[(row["method"], row["stage"])].append(row)
        totals[row["method"]][row["item"]] += row["prefill_ms"] + row["decode_ms"] + row["fusion_ms"]
    out = []
    # methods in METHOD_ORDER, and within T2T and C2C the sharer's stage first (the order they run in)
    for (method, stage), found in sorted(groups.items(), key=lambda kv: (METHOD_ORDER.index(kv[0][0]),
                                                                         kv[0][1] != "sharer")):
        out.append({"method": method, "stage": stage, "items": len(found),
                    "input_tokens": statistics.mean(r["input_tokens"] for r in found),
                    "output_tokens": statistics.mean(r["output_tokens"] for r in found),
                    "prefill_ms": statistics.median(r["prefill_ms"] for r in found),
                    "fusion_ms": statistics.median(r["fusion_ms"] for r in found),
                    "decode_ms": statistics.median(r["decode_ms"] for r in found),
                    "method_total_ms": statistics.median(totals[method].values())})
    return out


def time_per_query(rows: list[dict]) -> list[dict]:
    """Table 4's time column: per method, the median and mean total ms per query (the paper reports means)."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in rows:
        totals[row["method"]][row["item"]] += row["prefill_ms"] + row["decode_ms"] + row["fusion_ms"]
    return [{"method": method, "items": len(totals[method]), "median_ms": statistics.median(totals[method].values()),
             "mean_ms": statistics.mean(totals[method].values())} for method in METHOD_ORDER if method in totals]
