"""The paper's section-3 oracles on a multiple-choice benchmark: cache enrichment, layer by layer.

Three ways to fill the receiver's cache before it scores the option letter (spec, "Oracle experiments"):

* **Direct**: the zero-shot prompt (``chat_messages`` + the letter-scoring assistant prefix).
* **Few-shot**: the same final turn after ``shots`` exemplar turns (user: the exemplar's MC prompt,
  assistant: "The correct answer is X"), i.e. a multi-turn chat; the cache is longer.
* **Oracle**: prefill the few-shot prompt, then keep only the cache entries of the Direct prompt's
  tokens (the question-aligned slice): the cache is exactly as long as Direct's, but its entries
  were computed while attending to the exemplars.

The question-aligned slice. The few-shot ids must be the Direct ids with one contiguous span (the
exemplars) inserted: ``direct == fewshot[:k] + fewshot[len(fewshot) - (len(direct) - k):]``.
``question_span`` takes the smallest such ``k`` (longest common suffix), so with a ChatML template
the kept slice is the whole final user turn + generation prompt + prefix, and template tokens
before the first turn (a BOS, a default system header) are kept from the start of the prompt.

Positions (``positions=``). The kept entries were computed at few-shot positions: token j of the
Direct prompt sits at j (j < k) or j + E (j >= k, E = exemplar tokens).

* ``"shift"`` (default): every kept key is re-rotated by its position change (RoPE of -E), so the
  oracle cache sits at exactly Direct's positions and the scored token runs at Direct's position.
  The oracle then differs from Direct only in what the entries hold. Exact for rotary models with
  a fixed ``inv_freq`` (Qwen2/2.5/3, Llama 3 scaling included; not dynamic NTK scaling), up to the
  rounding of the cache dtype. Layer-wise enrichment always uses this mode (mixing layers needs one
  position frame).
* ``"keep"``: entries keep their few-shot positions and the scored token runs at its few-shot
  position. Exactly the few-shot forward with the exemplar columns masked out for the scored token.
  When k == 0 (nothing kept before the exemplars) both modes give the same relative positions.

Scoring: the option letters' next-token log-probabilities after the assistant prefix
(``c2c.methods.letter_scoring``), as in the evaluator's "logits" mode; the scored (last) token
is never part of the cache and runs on the receiver alone, as in every method.

"Cache length" in the tables is the number of KV entries per layer the scored token attends to,
itself included (the prompt length for Direct and Few-shot; Direct's for the oracle).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from c2c.benchmarks import MCItem, load_benchmark, mc_prompt
from c2c.fused import left_pad, pad_token_id, position_ids, prefix_cache
from c2c.methods import DEFAULT_ASSISTANT_PREFIX, LetterScoring, chat_messages, letter_scoring, render_ids

POSITION_MODES = ("shift", "keep")

Exemplars = Sequence[MCItem] | Mapping[str, Sequence[MCItem]]  # one list for all, or subject -> list


# --------------------------------------------------------------------------- prompts


def load_exemplars(name: str, source=None, *, split: str = "dev", shots: int = 5) -> dict[str, list[MCItem]]:
    """The first ``shots`` items of each subject of a benchmark split: subject -> exemplars.

    MMLU-Redux has no dev split; MMLU's (``name="mmlu"``) has the same subjects.
    """
    out: dict[str, list[MCItem]] = {}
    for item in load_benchmark(name, source, split=split):
        if len(out.setdefault(item.subject, [])) < shots:
            out[item.subject].append(item)
    return out


def pick_exemplars(item: MCItem, exemplars: Exemplars, shots: int) -> list[MCItem]:
    """Up to ``shots`` exemplars for ``item``: its subject's (a mapping) or the shared list; never itself."""
    pool = exemplars.get(item.subject, []) if isinstance(exemplars, Mapping) else exemplars
    return [e for e in pool if e.id != item.id][:shots]


def fewshot_messages(item: MCItem, exemplars: Sequence[MCItem],
                     answer_prefix: str = DEFAULT_ASSISTANT_PREFIX) -> list[dict[str, str]]:
    """Exemplar turns (user: MC prompt, assistant: "<prefix> X"), then the zero-shot turn of ``item``."""
    messages = []
    for e in exemplars:
        messages += [{"role": "user", "content": mc_prompt(e)},
                     {"role": "assistant", "content": f"{answer_prefix.strip()} {e.answer}"}]
    return messages + chat_messages(item)


def question_span(direct_ids: Sequence[int], fewshot_ids: Sequence[int]) -> int:
    """The k with direct = fewshot[:k] + fewshot[-(len(direct) - k):], smallest such k.

    ValueError if the few-shot prompt is not the direct one with one span inserted (ending with
    the direct prompt's last token).
    """
    nd, nf = len(direct_ids), len(fewshot_ids)
    suffix = 0
    while suffix < min(nd, nf) and direct_ids[nd - 1 - suffix] == fewshot_ids[nf - 1 - suffix]:
        suffix += 1
    k = nd - suffix
    if suffix == 0 or nf < nd or list(direct_ids[:k]) != list(fewshot_ids[:k]):
        raise ValueError(f"the few-shot prompt ({nf} tokens) is not the direct prompt ({nd} tokens) with one "
                         "contiguous span inserted; the chat template must render earlier turns independently "
                         "of the last one")
    return k


# --------------------------------------------------------------------------- caches


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (B, H, N, D)


def cache_kv(cache: DynamicCache) -> KV:
    """The (keys, values) tensors of every layer of a cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_cache(model, kv: KV) -> DynamicCache:
    """A fresh cache holding these tensors (scoring appends to a cache, so build one per use)."""
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def _rotary(model):
    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(f"{type(model).__name__} has no rotary embedding with inv_freq; positions='shift' needs "
                         "RoPE, use positions='keep'")
    return rotary


def rerotate_keys(model, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Move RoPE-rotated keys by ``delta`` positions (rotate-half convention of Llama/Qwen).

    keys (B, H, N, D); delta (B, N) integer position change. R(p) R(d) = R(p + d), so the result is
    the key the same pre-RoPE vector would have at position p + d. Partial rotary (rot dim < D) is
    handled; attention scaling factors are not part of the rotation and are left untouched.
    """
    inv_freq = _rotary(model).inv_freq.to(device=keys.device, dtype=torch.float32)  # (R/2,)
    angles = delta.to(keys.device, torch.float32)[..., None] * inv_freq  # (B, N, R/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, N, R)
    cos, sin = angles.cos(), angles.sin()
    r = angles.shape[-1]
    k = keys.float()
    rot, rest = k[..., :r], k[..., r:]
    half = rot.shape[-1] // 2
    rotated = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1).to(keys.dtype)


def oracle_slice(kv: KV, index: torch.Tensor) -> KV:
    """Gather cache columns: kv tensors (B, H, Nf, D), index (B, N) -> (B, H, N, D)."""
    out = []
    for k, v in kv:
        B, H, _, D = k.shape
        idx = index.to(k.device).view(B, 1, -1, 1).expand(B, H, index.shape[1], D)
        out.append((k.gather(2, idx), v.gather(2, idx)))
    return out


@torch.no_grad()
def last_token_logits(model, cache: DynamicCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      last_position: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, V) of the last prompt token run on ``cache`` (which holds all tokens but the last).

    attention_mask (B, N) covers the cache and the last token; last_position (B,) defaults to the
    mask's own position of the last token. The cache is appended to: do not reuse it.
    """
    if last_position is None:
        last_position = position_ids(attention_mask)[:, -1]
    out = model(input_ids=input_ids[:, -1:], attention_mask=attention_mask, position_ids=last_position.view(-1, 1),
                cache=cache, use_cache=True)
    return out.logits[:, -1]


@dataclass
class EnrichedBatch:
    """Direct, few-shot and oracle for one batch: caches, logits and what the tables need."""

    items: list[MCItem]
    direct_ids: torch.Tensor  # (B, Wd) left-padded
    direct_mask: torch.Tensor  # (B, Wd)
    direct_kv: KV  # per layer (B, H, Wd-1, D)
    oracle_kv: KV  # per layer (B, H, Wd-1, D): the question-aligned slice of the few-shot cache
    oracle_last_position: torch.Tensor  # (B,) position of the scored token in the oracle run
    direct_lengths: list[int]  # prompt tokens per item
    fewshot_lengths: list[int]
    logits: dict[str, torch.Tensor]  # "direct" / "few-shot" / "oracle" -> (B, V)


@torch.no_grad()
def enrich_batch(model, tokenizer, items: Sequence[MCItem], exemplars: Exemplars, *, shots: int = 5,
                 positions: str = "shift", scoring: LetterScoring | None = None) -> EnrichedBatch:
    """Run Direct, Few-shot and Oracle for a batch of items (one prefill each of Direct and Few-shot)."""
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    scoring = scoring or letter_scoring(tokenizer)
    items = list(items)
    device = model.device
    direct_rows = [render_ids(tokenizer, chat_messages(i), scoring.prefix) for i in items]
    fewshot_rows = [render_ids(tokenizer, fewshot_messages(i, pick_exemplars(i, exemplars, shots), scoring.prefix),
                               scoring.prefix) for i in items]
    starts = [question_span(d, f) for d, f in zip(direct_rows, fewshot_rows)]
    d_ids, d_mask = left_pad(direct_rows, pad_token_id(tokenizer), device)  # (B, Wd)
    f_ids, f_mask = left_pad(fewshot_rows, pad_token_id(tokenizer), device)  # (B, Wf)

    # question-aligned slice: direct cache column c of row b <- few-shot column index[b, c]
    Wd, Wf = d_ids.shape[1], f_ids.shape[1]
    index, delta = [], []
    for d, f, k in zip(direct_rows, fewshot_rows, starts):
        pad_d, pad_f, extra = Wd - len(d), Wf - len(f), len(f) - len(d)
        row_index, row_delta = [0] * pad_d, [0] * pad_d  # padding columns: any column, masked out
        for j in range(len(d) - 1):  # the cached tokens (all but the last)
            shifted = j >= k
            row_index.append(pad_f + j + extra * shifted)
            row_delta.append(-extra * shifted)
        index.append(row_index)
        delta.append(row_delta)
    index = torch.tensor(index, device=device)  # (B, Wd-1)
    delta = torch.tensor(delta, device=device)  # (B, Wd-1)

    direct_cache = prefix_cache(model, d_ids, d_mask)
    direct_kv = cache_kv(direct_cache)
    fewshot_cache = prefix_cache(model, f_ids, f_mask)
    oracle_kv = oracle_slice(cache_kv(fewshot_cache), index)
    lengths_d = torch.tensor([len(r) for r in direct_rows], device=device)
    lengths_f = torch.tensor([len(r) for r in fewshot_rows], device=device)
    if positions == "shift":
        oracle_kv = [(rerotate_keys(model, k, delta), v) for k, v in oracle_kv]
        oracle_last = lengths_d - 1
    else:
        oracle_last = lengths_f - 1

    logits = {
        "direct": last_token_logits(model, direct_cache, d_ids, d_mask),
        "few-shot": last_token_logits(model, fewshot_cache, f_ids, f_mask),
        "oracle": last_token_logits(model, make_cache(model, oracle_kv), d_ids, d_mask, oracle_last),
    }
    return EnrichedBatch(items, d_ids, d_mask, direct_kv, oracle_kv, oracle_last,
                         [len(r) for r in direct_rows], [len(r) for r in fewshot_rows], logits)


def letter_choices(items: Sequence[MCItem], logits: torch.Tensor, scoring: LetterScoring) -> list[str]:
    """The option letter with the highest next-token log-probability per item (first on ties)."""
    choices = []
    for item, row in zip(items, logits.float()):
        values = [float(row[scoring.token_ids[L]]) for L in item.letters]
        choices.append(item.letters[max(range(len(values)), key=values.__getitem__)])
    return choices


def _batches(items: Sequence[MCItem], batch_size: int) -> Iterable[list[MCItem]]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    items = list(items)
    if not items:
        raise ValueError("no items")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def _progress(iterable, show: bool, total: int, desc: str):
    if not show:
        return iterable
    return tqdm(iterable, total=total, desc=desc)


# --------------------------------------------------------------------------- experiments


def cache_enrichment(model, tokenizer, items: Sequence[MCItem], exemplars: Exemplars, *, shots: int = 5,
                     positions: str = "shift", batch_size: int = 8,
                     assistant_prefix: str = DEFAULT_ASSISTANT_PREFIX, progress: bool = False) -> list[dict]:
    """The cache enrichment table: one row per method (direct, few-shot, oracle).

    Row: method, accuracy (0-1), correct, n, cache_length (mean entries per layer the scored token
    attends to), shots, positions.
    """
    scoring = letter_scoring(tokenizer, assistant_prefix)
    correct = {m: 0 for m in ("direct", "few-shot", "oracle")}
    length = {m: 0 for m in correct}
    n = 0
    for batch in _progress(_batches(items, batch_size), progress, -(-len(items) // batch_size), "enrichment"):
        out = enrich_batch(model, tokenizer, batch, exemplars, shots=shots, positions=positions, scoring=scoring)
        for method, logits in out.logits.items():
            correct[method] += sum(c == i.answer for c, i in zip(letter_choices(batch, logits, scoring), batch))
        length["direct"] += sum(out.direct_lengths)
        length["oracle"] += sum(out.direct_lengths)
        length["few-shot"] += sum(out.fewshot_lengths)
        n += len(batch)
    return [{"method": m, "accuracy": correct[m] / n, "correct": correct[m], "n": n,
             "cache_length": length[m] / n, "shots": shots, "positions": positions} for m in correct]


def _set_label(layers: Sequence[int]) -> str:
    return ",".join(str(t) for t in layers)


def layerwise_enrichment(model, tokenizer, items: Sequence[MCItem], exemplars: Exemplars, *, shots: int = 5,
                         layer_sets: Mapping[str, Sequence[int]] | None = None, best_k: Sequence[int] = (),
                         worst_k: Sequence[int] = (), single_layers: bool = True, batch_size: int = 8,
                         assistant_prefix: str = DEFAULT_ASSISTANT_PREFIX, progress: bool = False) -> list[dict]:
    """Accuracy with the oracle's enriched entries (K and V) at some receiver layers, Direct's elsewhere.

    Evaluated sets: "none" (= Direct exactly), "few-shot" (the Few-shot prompt's own cache, for
    reference: not a layer mix), each single layer (``single_layers``), "all" (= the shifted Oracle
    exactly), the named ``layer_sets``, and for each k in ``best_k`` / ``worst_k`` the k layers with
    the largest / smallest single-layer accuracy ("best-k" / "worst-k", the paper's Top-K / Last-K of
    Figure 4; chosen on these same items, as the paper ranks by Table 10, so best-k's gain is an
    in-sample, optimistic number: pass ``layer_sets`` chosen on other items for a fair one; a
    second pass over the items).

    Row: set (name), kind (none/few-shot/single/all/set/best-k/worst-k), layer (single layers, else
    None), layers ("0,3"), accuracy, delta (accuracy - Direct's), correct, n.
    """
    L = model.config.num_hidden_layers
    sets: dict[str, tuple[str, list[int]]] = {"none": ("none", []), "few-shot": ("few-shot", [])}
    if single_layers or best_k or worst_k:
        sets.update({f"layer {t}": ("single", [t]) for t in range(L)})
    sets["all"] = ("all", list(range(L)))
    for name, layers in (layer_sets or {}).items():
        bad = [t for t in layers if not 0 <= t < L]
        if bad or name in sets:
            raise ValueError(f"layer set {name!r}: {'layers ' + str(bad) + ' out of range' if bad else 'name taken'}")
        sets[name] = ("set", sorted(set(layers)))
    rows = _score_layer_sets(model, tokenizer, items, exemplars, sets, shots, batch_size, assistant_prefix, progress)
    if best_k or worst_k:
        extra = {}
        for kind, ks, pick in (("best-k", best_k, best_layers), ("worst-k", worst_k, worst_layers)):
            for k in ks:
                if not 1 <= k <= L:
                    raise ValueError(f"{kind.replace('-', '_')} values must be in [1, {L}], got {k}")
                extra[f"{kind[:-2]}-{k}"] = (kind, pick(rows, k))
        rows += _score_layer_sets(model, tokenizer, items, exemplars, extra, shots, batch_size, assistant_prefix,
                                  progress)
        direct = rows[0]["accuracy"]
        for row in rows:
            row["delta"] = row["accuracy"] - direct
    if not single_layers:
        rows = [r for r in rows if r["kind"] != "single"]
    return rows


def _score_layer_sets(model, tokenizer, items, exemplars, sets, shots, batch_size, assistant_prefix,
                      progress) -> list[dict]:
    scoring = letter_scoring(tokenizer, assistant_prefix)
    correct = {name: 0 for name in sets}
    n = 0
    for batch in _progress(_batches(items, batch_size), progress, -(-len(items) // batch_size), "layer-wise"):
        out = enrich_batch(model, tokenizer, batch, exemplars, shots=shots, positions="shift", scoring=scoring)
        for name, (kind, layers) in sets.items():
            logits = out.logits["few-shot"] if kind == "few-shot" else layer_mixed_logits(model, out, layers)
            correct[name] += sum(c == i.answer for c, i in zip(letter_choices(batch, logits, scoring), batch))
        n += len(batch)
    direct = correct["none"] / n if "none" in correct else None
    rows = []
    for name, (kind, layers) in sets.items():
        accuracy = correct[name] / n
        rows.append({"set": name, "kind": kind, "layer": layers[0] if kind == "single" else None,
                     "layers": _set_label(layers), "accuracy": accuracy,
                     "delta": None if direct is None else accuracy - direct, "correct": correct[name], "n": n})
    return rows


@torch.no_grad()
def layer_mixed_logits(model, batch: EnrichedBatch, layers: Iterable[int]) -> torch.Tensor:
    """Logits (B, V) of the scored token on Direct's cache with the oracle's entries at ``layers``.

    Needs ``batch`` from ``enrich_batch(..., positions="shift")`` (one position frame for all layers).
    """
    chosen = set(layers)
    kv = [batch.oracle_kv[t] if t in chosen else batch.direct_kv[t] for t in range(len(batch.direct_kv))]
    return last_token_logits(model, make_cache(model, kv), batch.direct_ids, batch.direct_mask)


def best_layers(rows: Sequence[dict], k: int) -> list[int]:
    """The k layers with the highest single-layer accuracy in ``layerwise_enrichment`` rows (ties: lower layer)."""
    return _ranked_layers(rows, k, sign=-1)


def worst_layers(rows: Sequence[dict], k: int) -> list[int]:
    """The k layers with the lowest single-layer accuracy in ``layerwise_enrichment`` rows (ties: lower layer)."""
    return _ranked_layers(rows, k, sign=1)


def _ranked_layers(rows: Sequence[dict], k: int, sign: int) -> list[int]:
    singles = [r for r in rows if r["kind"] == "single"]
    if len(singles) < k:
        raise ValueError(f"need >= {k} single-layer rows, got {len(singles)}")
    ranked = sorted(singles, key=lambda r: (sign * r["accuracy"], r["layer"]))
    return sorted(r["layer"] for r in ranked[:k])


# --------------------------------------------------------------------------- tables


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows (dicts; columns = the union of keys, in first-seen order) as a markdown table (floats to 4 places)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict], path_stem: str | Path) -> tuple[Path, Path]:
    """Write rows (dicts; columns = the union of keys, in first-seen order) to ``<stem>.csv`` and ``<stem>.md``."""
    rows = list(rows)
    if not rows:
        raise ValueError("write_table: no rows")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".md")
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: "" if row.get(c) is None else row.get(c) for c in columns} for row in rows)
    md_path.write_text(markdown_table(rows), encoding="utf-8")
    return csv_path, md_path
