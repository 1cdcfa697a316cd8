"""Layer and token alignment between a receiver and a sharer.

See the spec sections "Layer alignment" and "Token alignment". The receiver's tokenization is
the base: the sharer gets one token per receiver message token, and its own template tokens.
"""

from dataclasses import dataclass

import tokenizers

# ---------------------------------------------------------------------------------------------
# Layer alignment
# ---------------------------------------------------------------------------------------------

LAYER_MAP_STRATEGIES = ("terminal", "depth")


def layer_map(receiver_layers: int, sharer_layers: int, strategy: str = "terminal") -> list[int]:
    """For each receiver layer t (T of them), the sharer layer (of S) it reads.

    terminal: t -> S - T + t clamped to [0, S-1] (last layers aligned).
    depth: t at t/(T-1), s at s/(S-1), nearest s (ties -> lower). A single receiver layer
    counts as the last one (position 1.0), like terminal; a single sharer layer takes everything.
    """
    if strategy not in LAYER_MAP_STRATEGIES:
        raise ValueError(f"unknown layer map strategy {strategy!r}; allowed: {LAYER_MAP_STRATEGIES}")
    for name, n in (("receiver_layers", receiver_layers), ("sharer_layers", sharer_layers)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    T, S = receiver_layers, sharer_layers
    if strategy == "terminal":
        return [min(max(S - T + t, 0), S - 1) for t in range(T)]
    if T == 1:
        return [S - 1]
    # nearest s to t*(S-1)/(T-1), in exact integer arithmetic: q + remainder r/(T-1)
    mapping = []
    for t in range(T):
        q, r = divmod(t * (S - 1), T - 1)
        mapping.append(q + 1 if 2 * r > T - 1 else q)
    return mapping


def check_layer_map(mapping: list[int], receiver_layers: int, sharer_layers: int) -> None:
    """ValueError unless mapping has one entry per receiver layer, each in [0, sharer_layers-1]."""
    if len(mapping) != receiver_layers:
        raise ValueError(f"layer map has {len(mapping)} entries, expected one per receiver layer ({receiver_layers})")
    for t, s in enumerate(mapping):
        if not 0 <= s < sharer_layers:
            raise ValueError(f"layer map: receiver layer {t} reads sharer layer {s}, valid range is [0, {sharer_layers - 1}]")


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def _regular_vocab(tokenizer) -> dict[str, int]:
    """token -> id without added tokens (the BPE/unigram model's own vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.get_vocab(with_added_tokens=False)
    added = set(tokenizer.get_added_vocab())
    return {tok: i for tok, i in tokenizer.get_vocab().items() if tok not in added}


def shares_vocabulary(receiver_tokenizer, sharer_tokenizer) -> bool:
    """True when the two tokenizers give the same ids to the same tokens.

    One side's regular vocabulary must be contained in the other's with equal ids, and no token
    (added ones included) may have different ids on the two sides. Added tokens present on one
    side only are allowed: the shared Qwen2.5 file (from a GGUF) fills ids 151665.. with
    "[PADn]" placeholders where Qwen3 has <think> etc., yet both models read the same text ids.
    """
    a, b = _regular_vocab(receiver_tokenizer), _regular_vocab(sharer_tokenizer)
    small, big = (a, b) if len(a) <= len(b) else (b, a)
    if any(big.get(tok) != i for tok, i in small.items()):
        return False
    full_a, full_b = receiver_tokenizer.get_vocab(), sharer_tokenizer.get_vocab()
    return all(full_b[tok] == i for tok, i in full_a.items() if tok in full_b)


# GPT-2 byte-level alphabet: byte -> the printable character that stands for it in token strings.
def _byte_alphabet() -> dict[int, str]:
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _is_byte_level_bpe(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return (
        backend is not None
        and isinstance(backend.decoder, tokenizers.decoders.ByteLevel)
        and isinstance(backend.model, tokenizers.models.BPE)
    )


# ---------------------------------------------------------------------------------------------
# Token alignment
# ---------------------------------------------------------------------------------------------

ALIGNMENT_STRATEGIES = ("first", "longest")
DEFAULT_ALIGNMENT = "longest"  # where neither the caller nor a fuser's checkpoint names one
SHARER_TEMPLATES = ("own", "receiver")


@dataclass
class AlignedPrompt:
    receiver_ids: list[int]  # (Nr,) the receiver's own tokenization of the (templated) prompt
    sharer_ids: list[int]  # (Ns,) the token ids the sharer reads
    sharer_index: list[int]  # (Nr,) for each receiver position, the sharer position whose KV it fuses
    fuse_mask: list[bool]  # (Nr,) True where the receiver position is fused (message tokens)

    def extended(self, suffix: "AlignedPrompt") -> "AlignedPrompt":
        """This prompt followed by `suffix` (e.g. an assistant prefix aligned with `align_text`)."""
        offset = len(self.sharer_ids)
        return AlignedPrompt(self.receiver_ids + suffix.receiver_ids, self.sharer_ids + suffix.sharer_ids,
                             self.sharer_index + [offset + j for j in suffix.sharer_index],
                             self.fuse_mask + suffix.fuse_mask)


class TokenAligner:
    """Maps a receiver prompt onto sharer tokens (one sharer token per receiver message token)."""

    def __init__(self, receiver_tokenizer, sharer_tokenizer, strategy: str = "longest", sharer_template: str = "own"):
        if strategy not in ALIGNMENT_STRATEGIES:
            raise ValueError(f"unknown token alignment strategy {strategy!r}; allowed: {ALIGNMENT_STRATEGIES}")
        if sharer_template not in SHARER_TEMPLATES:
            raise ValueError(f"unknown sharer_template {sharer_template!r}; allowed: {SHARER_TEMPLATES}")
        self.receiver = receiver_tokenizer
        self.sharer = sharer_tokenizer
        self.strategy = strategy
        self.sharer_template = sharer_template
        self.shared_vocabulary = shares_vocabulary(receiver_tokenizer, sharer_tokenizer)
        self._receiver_special = set(receiver_tokenizer.all_special_ids)
        # partial UTF-8 tokens are mapped through their bytes when both sides are byte-level BPE
        self._byte_path = _is_byte_level_bpe(receiver_tokenizer) and _is_byte_level_bpe(sharer_tokenizer)
        self._cache: dict[int, int] = {}

    # -- one token -----------------------------------------------------------------------------

    def _sharer_fallback(self) -> int:
        unk = self.sharer.unk_token_id
        return unk if unk is not None else self.sharer.eos_token_id

    def _map_special(self, token_id: int) -> int:
        for role in ("eos", "bos", "pad"):
            if token_id == getattr(self.receiver, f"{role}_token_id"):
                sharer_id = getattr(self.sharer, f"{role}_token_id")
                return sharer_id if sharer_id is not None else self.sharer.eos_token_id
        return self._sharer_fallback()

    def _partial_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes of a receiver token that is not valid UTF-8 on its own, else None."""
        if not self._byte_path:
            return None
        raw = self.receiver.convert_ids_to_tokens(token_id)
        if any(c not in _CHAR_TO_BYTE for c in raw):
            return None
        data = bytes(_CHAR_TO_BYTE[c] for c in raw)
        try:
            data.decode("utf-8")
            return None
        except UnicodeDecodeError:
            return data

    def _sharer_pieces(self, token_id: int) -> list[int]:
        """Sharer encoding of one receiver token: its text, or its bytes when it is partial UTF-8."""
        data = self._partial_bytes(token_id)
        if data is not None:
            # decoding would give U+FFFD; run the sharer's BPE on the same bytes instead
            raw = "".join(_BYTE_TO_CHAR[b] for b in data)
            return [tok.id for tok in self.sharer.backend_tokenizer.model.tokenize(raw)]
        text = self.receiver.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self.sharer.encode(text, add_special_tokens=False)

    def _sharer_length(self, sharer_id: int) -> int:
        """How many bytes of text a sharer token stands for (partial UTF-8 tokens counted by bytes)."""
        if self._byte_path:
            raw = self.sharer.convert_ids_to_tokens(sharer_id)
            if all(c in _CHAR_TO_BYTE for c in raw):
                return len(raw)
        text = self.sharer.decode([sharer_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return len(text.encode("utf-8"))

    def map_token(self, receiver_token_id: int) -> int:
        """The sharer token standing for one receiver message token (cached)."""
        if receiver_token_id in self._cache:
            return self._cache[receiver_token_id]
        if receiver_token_id in self._receiver_special:
            result = self._map_special(receiver_token_id)
        else:
            pieces = self._sharer_pieces(receiver_token_id)
            if not pieces:
                result = self._sharer_fallback()
            elif self.strategy == "first" or len(pieces) == 1:
                result = pieces[0]
            else:
                result = max(pieces, key=self._sharer_length)  # max keeps the first on ties
        self._cache[receiver_token_id] = result
        return result

    # -- whole prompts -------------------------------------------------------------------------

    def _encode(self, tokenizer, text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    def align_text(self, text: str) -> AlignedPrompt:
        """Plain text, no template: the whole text is one message span, fused everywhere."""
        if not text:
            raise ValueError("align_text: text is empty")
        receiver_ids = self._encode(self.receiver, text)  # (Nr,)
        if self.shared_vocabulary:
            sharer_ids = list(receiver_ids)  # same vocabulary: no alignment
        else:
            sharer_ids = [self.map_token(t) for t in receiver_ids]  # (Nr,)
        n = len(receiver_ids)
        return AlignedPrompt(receiver_ids, sharer_ids, list(range(n)), [True] * n)

    def align_chat(self, messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = False) -> AlignedPrompt:
        """A chat rendered with the receiver's template, aligned to the sharer.

        The receiver's ids are its tokenizer's encoding of the whole rendered text, so C2C with closed
        gates is exactly the receiver alone. A receiver token inside a message is fused, with one sharer
        token standing for it; the other receiver tokens are template (not fused), the sharer reads its
        own template text there. A token that spans a template/message border (e.g. the template's "\n"
        merged with a message's leading newlines) counts as template, and the sharer reads that part of
        the message as text of its own (encoded by its tokenizer, not fused). Same vocabulary: the
        sharer reads the receiver's ids, template included.
        """
        if not messages:
            raise ValueError("align_chat: messages is empty")
        contents = []
        for i, message in enumerate(messages):
            content = message.get("content")
            if not isinstance(content, str) or not content:
                raise ValueError(f"align_chat: message {i} has empty or non-text content {content!r}")
            contents.append(content)

        if self.shared_vocabulary:
            receiver_ids = self._encode(self.receiver, self._render(self.receiver, messages, add_generation_prompt,
                                                                    enable_thinking))
            n = len(receiver_ids)
            return AlignedPrompt(receiver_ids, list(receiver_ids), list(range(n)), [True] * n)

        render = (messages, add_generation_prompt, enable_thinking)
        receiver_templates = self._template_spans(self.receiver, *render, side="receiver")  # (M+1,) texts
        if self.sharer_template == "receiver":
            sharer_templates = receiver_templates
        elif not self.sharer.chat_template:
            raise ValueError('the sharer tokenizer has no chat template; use sharer_template="receiver" '
                             "to render its template spans from the receiver's template")
        else:
            sharer_templates = self._template_spans(self.sharer, *render, side="sharer")  # (M+1,) texts

        text = "".join(span + content for span, content in zip(receiver_templates, contents + [""]))
        receiver_ids, spans = self._receiver_tokens(text)  # (Nr,), each token's [start, end) in text
        bounds, position = [], 0  # [start, end) of each message in text
        for span, content in zip(receiver_templates, contents):
            position += len(span)
            bounds.append((position, position + len(content)))
            position += len(content)
        # segment of each receiver token: 2i + 1 = inside message i, 2k = template span k (a token
        # crossing a message's start belongs to the span before it, one crossing its end to the one after)
        segments = []
        for start, end in spans:
            inside = next((i for i, (s, e) in enumerate(bounds) if s <= start < end <= e), None)
            segments.append(2 * inside + 1 if inside is not None else 2 * sum(e < end for _, e in bounds))
        if segments != sorted(segments):
            raise ValueError("the receiver tokenizer's offsets are out of order; token alignment needs a tokenizer "
                             "whose offsets follow the text")

        sharer_ids, sharer_index, fuse_mask = [], [], []
        for segment in range(2 * len(contents) + 1):
            tokens = [t for t, s in enumerate(segments) if s == segment]  # receiver positions, in order
            i = segment // 2
            if segment % 2 == 0:  # template span i: the sharer's own template tokens, not fused
                s_tmpl = self._encode(self.sharer, sharer_templates[i])  # (len_s,)
                start = len(sharer_ids)
                sharer_ids += s_tmpl
                sharer_index += [start + min(j, len(s_tmpl) - 1) if s_tmpl else max(start - 1, 0)
                                 for j in range(len(tokens))]
                fuse_mask += [False] * len(tokens)
                continue
            # message i: text the receiver merged into template tokens, then one sharer token per
            # receiver token inside the message (fused), then merged text again
            s, e = bounds[i]
            head_end = spans[tokens[0]][0] if tokens else e
            tail_start = spans[tokens[-1]][1] if tokens else e
            sharer_ids += self._encode(self.sharer, text[s:head_end])
            sharer_index += range(len(sharer_ids), len(sharer_ids) + len(tokens))
            sharer_ids += [self.map_token(receiver_ids[t]) for t in tokens]
            sharer_ids += self._encode(self.sharer, text[tail_start:e])
            fuse_mask += [True] * len(tokens)
        return AlignedPrompt(receiver_ids, sharer_ids, sharer_index, fuse_mask)

    def _receiver_tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The receiver's encoding of the whole text, and each token's character span [start, end).

        The spans must cover the text without gaps (several byte-level tokens of one character share
        its span); a tokenizer that trims or drops characters from its offsets is refused.
        """
        if getattr(self.receiver, "backend_tokenizer", None) is None:
            raise ValueError("token alignment between different tokenizers needs a fast (tokenizers-backed) "
                             "receiver tokenizer: its offsets place message borders")
        encoding = self.receiver(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [tuple(span) for span in encoding["offset_mapping"]]
        covered = 0
        for start, end in spans:
            if start > covered or end < start:
                raise ValueError(f"the receiver tokenizer's offsets leave out characters {covered}-{start} of the "
                                 f"prompt ({text[covered:start]!r}; trimmed offsets?), so message borders cannot "
                                 "be placed on its tokens")
            covered = max(covered, end)
        if covered != len(text):
            raise ValueError(f"the receiver tokenizer's offsets end at character {covered} of {len(text)}")
        return encoding["input_ids"], spans

    @staticmethod
    def _render(tokenizer, messages, add_generation_prompt: bool, enable_thinking: bool) -> str:
        # enable_thinking is a template variable: templates that do not use it ignore it
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )

    def _template_spans(self, tokenizer, messages, add_generation_prompt: bool, enable_thinking: bool,
                        side: str) -> list[str]:
        """The M+1 template texts around the M message contents.

        Found by rendering the chat with a unique placeholder per message (so a content that also
        occurs in template text, e.g. a default system prompt, cannot be matched in the wrong place),
        then checked against the real rendering.
        """
        placeholders = [f"\x00c2c-message-{i}\x00" for i in range(len(messages))]
        marked = self._render(tokenizer, [{**m, "content": p} for m, p in zip(messages, placeholders)],
                              add_generation_prompt, enable_thinking)
        spans, rest = [], marked
        for i, placeholder in enumerate(placeholders):
            before, found, rest = rest.partition(placeholder)
            if not found:
                raise ValueError(f"message {i} does not appear in the {side}'s rendered chat template")
            spans.append(before)
        spans.append(rest)
        contents = [m["content"] for m in messages] + [""]
        if "".join(span + content for span, content in zip(spans, contents)) != self._render(
                tokenizer, messages, add_generation_prompt, enable_thinking):
            raise ValueError(f"the {side}'s chat template changes the message text (e.g. strips it), so message "
                             "spans cannot be aligned; pass the contents already in the form the template writes")
        return spans
