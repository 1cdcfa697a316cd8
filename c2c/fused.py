"""The fused model: one receiver, one or more sharers and their fusers.

Prefill: every prompt token but the last runs through the receiver and through each sharer; the
receiver's cache of those tokens is replaced by the fused cache. Decode: the receiver alone, via
transformers' own `generate` continuing from that cache, so greedy, sampling, stopping criteria,
streamers and batching all come from transformers.

Which positions are fused is explicit: per sharer, a boolean `fuse_mask` over the receiver's
prompt positions (message tokens, never padding or, for different tokenizers, template tokens),
and always only the prompt prefix (all tokens but the last).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from c2c.align import AlignedPrompt, TokenAligner
from c2c.fuser import C2CFuser

MULTI_SHARER_MODES = ("sequential", "parallel")


@dataclass
class SharerInputs:
    """What one sharer reads for a batch, and how its positions line up with the receiver's."""

    input_ids: torch.Tensor  # (B, Ns) left-padded sharer token ids
    attention_mask: torch.Tensor  # (B, Ns)
    index: torch.Tensor  # (B, Nr) for each receiver position, the sharer position whose KV it fuses
    fuse_mask: torch.Tensor  # (B, Nr) bool, receiver positions to fuse from this sharer


@dataclass
class FusedInputs:
    """A left-padded batch for the fused model."""

    input_ids: torch.Tensor  # (B, Nr) receiver token ids
    attention_mask: torch.Tensor  # (B, Nr)
    sharers: list[SharerInputs]

    def to(self, device) -> "FusedInputs":
        sharers = [SharerInputs(**{f.name: getattr(s, f.name).to(device) for f in fields(s)}) for s in self.sharers]
        return FusedInputs(self.input_ids.to(device), self.attention_mask.to(device), sharers)

    def select(self, rows) -> "FusedInputs":
        """The sub-batch of the given row indices (padding columns kept)."""
        sharers = [SharerInputs(**{f.name: getattr(s, f.name)[rows] for f in fields(s)}) for s in self.sharers]
        return FusedInputs(self.input_ids[rows], self.attention_mask[rows], sharers)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch, as transformers' generate computes them: (B, N)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad rows of token ids: ids (B, W) and attention mask (B, W), W the longest row."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long, device=device)
    return ids, mask


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


def sharer_prefix_length(aligned: AlignedPrompt) -> int:
    """How many of the sharer's tokens fusion reads: up to the one aligned with the receiver's second-to-last
    token (the last prompt token is never fused). Causal attention makes the KV of those tokens independent
    of the rest, so the sharer runs on this prefix only (for a shared vocabulary: the receiver's ids but the last)."""
    fused_positions = aligned.sharer_index[:len(aligned.receiver_ids) - 1]
    return max(fused_positions) + 1 if fused_positions else 1


def collate(aligned: Sequence[Sequence[AlignedPrompt]], receiver_pad_id: int, sharer_pad_ids: Sequence[int]) -> FusedInputs:
    """Left-pad aligned prompts into tensors. `aligned[b][i]` is prompt b aligned for sharer i; each
    sharer's ids are cut to what fusion reads (`sharer_prefix_length`)."""
    receiver_rows = [prompt[0].receiver_ids for prompt in aligned]
    for b, prompt in enumerate(aligned):
        if any(a.receiver_ids != prompt[0].receiver_ids for a in prompt):
            raise ValueError(f"prompt {b}: the aligners disagree on the receiver's tokenization")
    width = max(len(row) for row in receiver_rows)
    input_ids, attention_mask = left_pad(receiver_rows, receiver_pad_id)  # (B, Nr)
    sharers = []
    for i, pad_id in enumerate(sharer_pad_ids):
        rows = [prompt[i] for prompt in aligned]
        lengths = [sharer_prefix_length(a) for a in rows]
        sharer_ids, sharer_mask = left_pad([a.sharer_ids[:n] for a, n in zip(rows, lengths)], pad_id)  # (B, Ns)
        sharer_width = sharer_ids.shape[1]
        index = [[0] * (width - len(a.receiver_ids)) + [j + sharer_width - n for j in a.sharer_index]
                 for a, n in zip(rows, lengths)]
        fuse_mask = left_pad([[int(f) for f in a.fuse_mask] for a in rows], 0)[0].bool()  # (B, Nr)
        sharers.append(SharerInputs(sharer_ids, sharer_mask, torch.tensor(index), fuse_mask))
    return FusedInputs(input_ids, attention_mask, sharers)


PREFIX_STORE_ATTRIBUTE = "c2c_prefix_store"  # set by c2c.prefixes.PrefixStore.attach(model)


def kv_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DynamicCache:
    """The model's cache of every token of a left-padded batch, computed by its decoder alone (no lm_head),
    without gradients. A model with an attached `c2c.prefixes.PrefixStore` reads the rows from disk instead
    (computing and storing the ones it lacks)."""
    store = getattr(model, PREFIX_STORE_ATTRIBUTE, None)
    if store is not None:
        return store.cache(input_ids, attention_mask)
    return decoder_cache(model, input_ids, attention_mask)


def decoder_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DynamicCache:
    """`kv_cache` computed by the model, never from a store. Every layer keeps every position: a cache built from
    the model's config would keep only the last window of a sliding-window layer (Gemma 3), and fusion reads the
    sharer at every prompt position; the attention mask applies the window either way."""
    cache = DynamicCache()
    with torch.no_grad():
        model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), cache=cache, use_cache=True)
    return cache


def prefix_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DynamicCache:
    """The model's cache of every token but the last of a left-padded batch (see `kv_cache`).

    `generate(input_ids, attention_mask, cache=cache)` continues from it. Every method
    (receiver alone, sharer alone, T2T, C2C) starts decoding this way, so they share one engine.
    """
    n = input_ids.shape[1] - 1
    return kv_cache(model, input_ids[:, :n], attention_mask[:, :n])


def to_static_cache(cache: DynamicCache, config, max_cache_len: int) -> StaticCache:
    """Copy a prefix cache into a preallocated `StaticCache` (what compiled / CUDA-graph decoding needs)."""
    static = StaticCache(config=config, max_cache_len=max_cache_len)
    for target, source in zip(static.layers, cache.layers):
        target.update(source.keys, source.values)  # fills positions [0, n) and advances the length
    return static


# Static caches are sized in multiples of this: the compiled decode step is specialised to the cache's shape,
# so batches of many prompt lengths share a few compiled graphs instead of recompiling for each length
STATIC_CACHE_MULTIPLE = 256


def requested_max_new_tokens(model, generate_kwargs: dict) -> int | None:
    """The max_new_tokens `model.generate(**generate_kwargs)` decodes with, in transformers' order: the
    argument, else the `generation_config=` passed, else the model's own generation config (None: unset)."""
    candidates = (generate_kwargs.get("max_new_tokens"),
                  getattr(generate_kwargs.get("generation_config"), "max_new_tokens", None),
                  model.generation_config.max_new_tokens)
    return next((n for n in candidates if n is not None), None)


@torch.no_grad()
def generate_from_prefix(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         cache: DynamicCache | None = None, *, static_cache: bool | None = None, **generate_kwargs):
    """`model.generate` continuing from `cache` (default: the model's own prefix cache of the prompt).

    static_cache: decode with a preallocated StaticCache, which transformers compiles on CUDA
    (None = only where the model is on a CUDA device; eager dynamic cache on CPU). Its length is the
    prompt + `requested_max_new_tokens(model, generate_kwargs)`, rounded up to a multiple of
    `STATIC_CACHE_MULTIPLE`.
    """
    if cache is None:
        cache = prefix_cache(model, input_ids, attention_mask)
    if static_cache is None:
        static_cache = input_ids.device.type == "cuda"
    if static_cache:
        max_new_tokens = requested_max_new_tokens(model, generate_kwargs)
        if not max_new_tokens:
            raise ValueError("static_cache=True needs max_new_tokens (an argument, or in the generation_config "
                             "passed or the model's) to size the cache")
        length = input_ids.shape[1] + max_new_tokens
        cache = to_static_cache(cache, model.config, -(-length // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **generate_kwargs)


def _context_length(config) -> int:
    return getattr(config, "max_position_embeddings", None) or 2**31


class ContextLengthError(ValueError):
    """A prompt (+ the tokens to generate) does not fit a model's context."""


def check_context(config, prompt_tokens: int, new_tokens: int = 0, who: str = "the model") -> None:
    """Refuse a prompt of `prompt_tokens` (+ `new_tokens` to generate) longer than a model's context
    (`max_position_embeddings`). Every method calls it before its model runs (receiver, sharer, both T2T
    stages, C2C for the receiver and each sharer), so all refuse the same prompts with the same error."""
    context = _context_length(config)
    if prompt_tokens + new_tokens > context:
        raise ContextLengthError(f"prompt of {prompt_tokens} tokens + {new_tokens} new tokens exceeds {who}'s context "
                                 f"of {context}; shorten the prompt or max_new_tokens")


def _stack_kv(cache: DynamicCache) -> torch.Tensor:
    """(2 * layers, B, H, N, D): keys and values of every layer, K before V."""
    return torch.stack([tensor for layer in cache.layers for tensor in (layer.keys, layer.values)])


class C2CModel(nn.Module):
    """A receiver that answers from a cache fused with the caches of one or more sharers.

    receiver, sharers: frozen transformers causal LMs; tokenizers: theirs (both None for a model fed
    `FusedInputs` built elsewhere, e.g. from token ids); fusers: one `C2CFuser` per sharer.
    `alignment`: token alignment strategy ("first"/"longest") for sharers whose vocabulary differs
    from the receiver's; None disables alignment (then such a sharer is an error). A fuser trained with
    another strategy (its config's `alignment`) is refused: it learned on other sharer tokens.
    """

    def __init__(self, receiver, receiver_tokenizer, sharers: Sequence, sharer_tokenizers: Sequence | None,
                 fusers: Sequence[C2CFuser], *, alignment: str | None = "longest", multi_sharer: str = "sequential"):
        super().__init__()
        if sharer_tokenizers is None:
            sharer_tokenizers = [None] * len(sharers)
        if not (len(sharers) == len(sharer_tokenizers) == len(fusers)) or not sharers:
            raise ValueError(f"need one tokenizer and one fuser per sharer, got {len(sharers)} sharers, "
                             f"{len(sharer_tokenizers)} tokenizers, {len(fusers)} fusers")
        if multi_sharer not in MULTI_SHARER_MODES:
            raise ValueError(f"multi_sharer must be one of {MULTI_SHARER_MODES}, got {multi_sharer!r}")
        if (receiver_tokenizer is None) != any(t is None for t in sharer_tokenizers):
            raise ValueError("give the receiver's and every sharer's tokenizer, or none of them")
        self.receiver = receiver.requires_grad_(False).eval()
        self.sharers = nn.ModuleList(s.requires_grad_(False).eval() for s in sharers)
        self.fusers = nn.ModuleList(fusers)
        self.receiver_tokenizer = receiver_tokenizer
        self.sharer_tokenizers = list(sharer_tokenizers)
        self.multi_sharer = multi_sharer
        self.aligners = []
        for i, (sharer, tokenizer, fuser) in enumerate(zip(sharers, sharer_tokenizers, fusers)):
            fuser.config.check_fits(receiver.config, sharer.config)
            if receiver_tokenizer is None:
                continue
            aligner = TokenAligner(receiver_tokenizer, tokenizer, strategy=alignment or "first")
            if not aligner.shared_vocabulary and alignment is None:
                raise ValueError(f"sharer {i} has a different tokenizer from the receiver and alignment is disabled; "
                                 "pass alignment='longest' or 'first'")
            trained = fuser.config.alignment
            if not aligner.shared_vocabulary and trained is not None and trained != aligner.strategy:
                raise ValueError(f"sharer {i}'s fuser was trained with token alignment {trained!r}, not "
                                 f"{alignment!r}: pass alignment={trained!r} (C2C.from_models and an eval config "
                                 "without `alignment` use the fuser's own), or use a fuser trained with "
                                 f"{alignment!r}")
            self.aligners.append(aligner)

    def train(self, mode: bool = True):
        """Only the fusers ever train; receiver and sharers stay in eval mode."""
        self.fusers.train(mode)
        return self

    # ---- inputs --------------------------------------------------------------------------------
    def prepare(self, prompts: Sequence, *, chat: bool = True, add_generation_prompt: bool = True,
                enable_thinking: bool = False) -> FusedInputs:
        """Tokenize and align a batch: chats (lists of {"role", "content"}) or, with chat=False, plain texts."""
        if not self.aligners:
            raise ValueError("this C2CModel was built without tokenizers: pass FusedInputs built from token ids")
        if not prompts:
            raise ValueError("prepare() got an empty batch of prompts")
        aligned = []
        for b, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {b} is empty")
            if chat:
                aligned.append([a.align_chat(prompt, add_generation_prompt=add_generation_prompt,
                                             enable_thinking=enable_thinking) for a in self.aligners])
            else:
                aligned.append([a.align_text(prompt) for a in self.aligners])
        return collate(aligned, pad_token_id(self.receiver_tokenizer), [pad_token_id(t) for t in self.sharer_tokenizers])

    def check_lengths(self, inputs: FusedInputs, max_new_tokens: int = 0) -> None:
        """A prompt must have >= 2 tokens and fit the receiver's and every sharer's context."""
        length = inputs.input_ids.shape[1]
        if length < 2:
            raise ValueError(f"a fused prompt needs at least 2 receiver tokens (got {length}): all but the last are fused")
        check_context(self.receiver.config, length, max_new_tokens, "the receiver")
        for i, (sharer, sharer_inputs) in enumerate(zip(self.sharers, inputs.sharers)):
            check_context(sharer.config, sharer_inputs.input_ids.shape[1], 0, f"sharer {i}")

    # ---- prefill + fuse ------------------------------------------------------------------------
    def _sharer_kv(self, i: int, sharer_inputs: SharerInputs, length: int) -> torch.Tensor:
        """Sharer i's keys/values for receiver positions [0, length), picked by the layer map: (2L, B, Hs, n, Ds)."""
        kv = _stack_kv(kv_cache(self.sharers[i], sharer_inputs.input_ids, sharer_inputs.attention_mask))  # (2S, B, Hs, Ns, Ds)
        _, B, Hs, _, Ds = kv.shape
        index = sharer_inputs.index[:, :length].view(1, B, 1, length, 1).expand(kv.shape[0], B, Hs, length, Ds)
        kv = kv.gather(3, index)  # (2S, B, Hs, n, Ds): aligned to receiver positions
        return kv.index_select(0, self.fusers[i].sharer_groups)  # (2L, B, Hs, n, Ds) K, V of each receiver layer

    def prefill(self, inputs: FusedInputs) -> DynamicCache:
        """Receiver cache of every prompt token but the last, with the sharers fused in.

        The receiver and sharers run without gradients; the fusion itself follows the ambient grad
        mode, so training can backpropagate from the receiver's loss into the fusers.
        """
        self.check_lengths(inputs)
        n = inputs.input_ids.shape[1] - 1
        attention_mask = inputs.attention_mask[:, :n]
        cache = prefix_cache(self.receiver, inputs.input_ids, inputs.attention_mask)
        receiver_kv = _stack_kv(cache)  # (2L, B, Hr, n, Dr)
        fused = receiver_kv
        for i, fuser in enumerate(self.fusers):
            sharer_inputs = inputs.sharers[i]
            mask = sharer_inputs.fuse_mask[:, :n] & attention_mask.bool()  # (B, n)
            sharer_kv = self._sharer_kv(i, sharer_inputs, n)
            source = fused if self.multi_sharer == "sequential" else receiver_kv
            fused = fused + fuser.delta(sharer_kv, source, mask)
        for t, layer in enumerate(cache.layers):
            layer.keys, layer.values = fused[2 * t], fused[2 * t + 1]
        return cache

    def forward(self, inputs: FusedInputs, continuation_ids: torch.Tensor | None = None,
                continuation_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Receiver logits after the fused prefix: for the last prompt token and each continuation token.

        continuation_ids: (B, R) right-padded tokens that follow the prompt (e.g. the answer to train
        on), continuation_mask: (B, R). Returns logits (B, 1 + R, V): position 0 predicts the first
        continuation token. Gradients flow into the fusers (not the frozen models).
        """
        ids, mask, positions = self.continuation_inputs(inputs, continuation_ids, continuation_mask)
        return self.receiver(input_ids=ids, attention_mask=mask, position_ids=positions,
                             cache=self.prefill(inputs), use_cache=True).logits

    @staticmethod
    def continuation_inputs(inputs: FusedInputs, continuation_ids: torch.Tensor | None = None,
                            continuation_mask: torch.Tensor | None = None):
        """What the receiver reads after the fused prefix: ids (B, 1 + R) = the last prompt token + the
        continuation, the attention mask over prompt + continuation, and their positions (B, 1 + R)."""
        ids = inputs.input_ids[:, -1:]  # (B, 1) the last prompt token, never fused
        mask = inputs.attention_mask
        if continuation_ids is not None:
            if continuation_mask is None:
                continuation_mask = torch.ones_like(continuation_ids)
            ids = torch.cat([ids, continuation_ids], dim=1)  # (B, 1 + R)
            mask = torch.cat([mask, continuation_mask.to(mask.dtype)], dim=1)
        return ids, mask, position_ids(mask)[:, -ids.shape[1]:]

    @torch.no_grad()
    def generate(self, inputs: FusedInputs, *, static_cache: bool | None = None, **generate_kwargs):
        """Fused prefill, then `receiver.generate` continuing from the fused cache (all its options apply)."""
        self.check_lengths(inputs, requested_max_new_tokens(self.receiver, generate_kwargs) or 0)
        return generate_from_prefix(self.receiver, inputs.input_ids, inputs.attention_mask, self.prefill(inputs),
                                    static_cache=static_cache, **generate_kwargs)

