"""The four methods of the paper's main table, one interface, one decode engine.

Every method answers a list of ``MCItem`` in batches and returns one ``Answer`` per item:

* ``ReceiverAlone`` / ``SharerAlone``: one model answers the zero-shot prompt (``mc_prompt``);
* ``TextToText`` (T2T): the sharer first writes background for ``t2t_sharer_prompt`` (greedy, up
  to ``sharer_max_new_tokens``, the paper's 256), then the receiver answers ``t2t_receiver_messages``
  (protocol "sentence", the paper's v2: one sentence joined to the question; "chat": the reference code's
  chat with the sharer's text as an assistant turn before the MC prompt);
* ``C2C``: the receiver answers from its cache fused with the sharer's (a ``C2CModel``).

All prompts are one user turn rendered with the model's chat template, thinking disabled
(``enable_thinking=False``), left-padded into batches. Every method decodes on the same engine:
all prompt tokens but the last are prefilled into a cache (``c2c.fused.prefix_cache``, or the fused
prefill for C2C), then the last prompt token runs on the receiver alone, attending to that cache,
and transformers' ``generate`` continues (``generate_from_prefix`` / ``C2CModel.generate``).

Two scoring modes:

``"generate"`` (the paper's): greedy decoding of ``max_new_tokens`` (64) tokens, then the regex
    cascade ``extract_answer``; ``Answer.letter`` is None when nothing parses (counted wrong).
``"logits"``: the reply is pre-filled with an assistant prefix (default "The correct answer is")
    appended after the generation prompt, and the next-token log-probabilities of the option
    letters are compared; ``Answer.scores`` holds them (log-softmax over the full vocabulary) and
    ``Answer.letter`` is their argmax (first letter on ties), never None. Placement of the letter:
    if the tokenizer has a single token for " A" ... " J" (space + letter, what a BPE model writes
    after "is"; true for Qwen and Llama-3 tokenizers), the prompt ends with the prefix and those
    tokens are scored; otherwise, if "A" ... "J" are single tokens, the prompt ends with the prefix
    plus a space and the bare letters are scored; otherwise it is an error. ``letter_scoring``
    gives the choice. For C2C the prefix is part of the fused prompt (fused like message text),
    so the fused prefix still ends right before the last prompt token, whose logits score the
    letters: the scored token directly follows the prompt in every method.

The prompt token ids are the same across methods: the encoding (no added special tokens) of the
rendered chat template, followed by the encoding of the assistant prefix if any. A C2C model whose
gates are all closed therefore reproduces ``ReceiverAlone`` exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from c2c.align import DEFAULT_ALIGNMENT
from c2c.benchmarks import (
    DEFAULT_T2T_PROTOCOL,
    LETTERS,
    MCItem,
    extract_answer,
    mc_prompt,
    check_t2t_protocol,
    t2t_receiver_messages,
    t2t_sharer_prompt,
)
from c2c.checkpoint import load_fuser
from c2c.fingerprint import check_finite, fuser_fingerprint, model_fingerprint, tokenizer_fingerprint
from c2c.fused import (C2CModel, FusedInputs, check_context, collate, generate_from_prefix, left_pad, pad_token_id,
                       position_ids, prefix_cache)

SCORING_MODES = ("generate", "logits")
DEFAULT_ASSISTANT_PREFIX = "The correct answer is"
DEFAULT_MAX_NEW_TOKENS = 64  # the paper's
DEFAULT_T2T_MAX_NEW_TOKENS = 256  # the paper's (v2) cap on the sharer's background text
NON_FINITE_HINT = ("the model's weights may be damaged (a corrupt model.safetensors in its folder: delete that "
                   "folder and fetch or rebuild it) or the dtype overflows (try dtype float32)")


@dataclass
class Answer:
    """One method's answer to one item.

    letter: the chosen option letter; None = the reply could not be parsed (count it wrong).
    text: the generated reply ("generate") or the most likely next token ("logits").
    scores: "logits" mode only: option letter -> log-probability of its token.
    extra: method details (T2T: the sharer's text and its length; logits: top token, letter mass).
    """

    item_id: str
    letter: str | None
    text: str
    scores: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- prompts and letters


def chat_messages(item: MCItem) -> list[dict[str, str]]:
    """The zero-shot chat: one user turn holding ``mc_prompt(item)``."""
    return [{"role": "user", "content": mc_prompt(item)}]


def render_ids(tokenizer, messages: list[dict], assistant_prefix: str = "") -> list[int]:
    """Token ids of a chat with the generation prompt (thinking disabled), then the assistant prefix."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if assistant_prefix:
        ids += tokenizer.encode(assistant_prefix, add_special_tokens=False)
    return ids


@dataclass(frozen=True)
class LetterScoring:
    """Where the scored letter sits: the prompt ends with ``prefix``; ``token_ids[L]`` is scored."""

    prefix: str
    token_ids: dict[str, int]


_LETTER_SCORING_CACHE: dict[tuple[int, str], tuple[Any, LetterScoring]] = {}  # holds the tokenizer: ids stay unique


def letter_scoring(tokenizer, assistant_prefix: str = DEFAULT_ASSISTANT_PREFIX) -> LetterScoring:
    """How to score option letters with this tokenizer after ``assistant_prefix`` (module docstring).

    Tries, in order, (prefix, " L"): every " L" (A-J) one token, and the tokenizer writes it so
    after the prefix; then (prefix + " ", "L"): every bare letter one token. The second is a
    token-level placement (the prompt ends with a lone space token) that the tokenizer would not
    produce for "... is A"; it exists for small tokenizers without " L" tokens (the tiny pair).
    """
    key = (id(tokenizer), assistant_prefix)
    if key in _LETTER_SCORING_CACHE and _LETTER_SCORING_CACHE[key][0] is tokenizer:
        return _LETTER_SCORING_CACHE[key][1]

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    tried = []
    if assistant_prefix:
        candidates = [(assistant_prefix, " "), (assistant_prefix + " ", "")]
    else:  # score the first token of the reply: the letter without a space
        candidates = [("", "")]
    for prefix, sep in candidates:
        base = encode(prefix) if prefix else []
        ids = {}
        for letter in LETTERS:
            piece = encode(sep + letter)
            if len(piece) != 1:
                break
            if sep and encode(prefix + sep + letter) != base + piece:
                break  # " L" must be how the tokenizer itself writes the letter after the prefix
            ids[letter] = piece[0]
        else:
            if len(set(ids.values())) == len(LETTERS):
                result = LetterScoring(prefix, ids)
                _LETTER_SCORING_CACHE[key] = (tokenizer, result)
                return result
        tried.append(repr(sep + "X"))
    raise ValueError(f"cannot score option letters with this tokenizer after {assistant_prefix!r}: "
                     f"neither {' nor '.join(tried)} is a single token for every letter A-J; "
                     "use scoring='generate'")


class FiniteLogits(LogitsProcessor):
    """Counts NaN/inf logits over the decoding steps (greedy argmax would pick a token anyway); ``check()``
    after ``generate`` raises if there were any. The count stays on the device: no host sync per step, so
    transformers' deferred stop check keeps the GPU busy."""

    def __init__(self, what: str):
        self.what = what
        self.non_finite: torch.Tensor | None = None  # () int64, on the logits' device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        count = (~torch.isfinite(scores)).sum()
        self.non_finite = count if self.non_finite is None else self.non_finite + count
        return scores

    def check(self) -> None:
        if self.non_finite is not None and int(self.non_finite):
            raise FloatingPointError(f"{self.what} held {int(self.non_finite)} NaN/inf value(s) over the decoding "
                                     f"steps; {NON_FINITE_HINT}")


def _greedy_kwargs(model, tokenizer, max_new_tokens: int) -> dict:
    """Greedy decoding (NaN/inf logits counted: ``_check_decoding`` after generate); the model's own sampling
    defaults are switched off, not just overridden."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(config, name):
            setattr(config, name, None)
    config.max_new_tokens = max_new_tokens
    config.pad_token_id = pad_token_id(tokenizer)
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return {"generation_config": config,
            "logits_processor": LogitsProcessorList([FiniteLogits(f"decoding logits of {_model_name(model)}")])}


def _check_decoding(greedy_kwargs: dict) -> None:
    """Raise if the generate call that took these ``_greedy_kwargs`` saw NaN/inf logits (one host sync)."""
    for processor in greedy_kwargs["logits_processor"]:
        processor.check()


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return set(eos)


def _decode_new(tokenizer, new_tokens: torch.Tensor, eos: set[int]) -> tuple[list[str], list[int]]:
    """Texts of generated rows (cut at the first eos) and their token counts (eos included)."""
    texts, counts = [], []
    for row in new_tokens.tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
        counts.append(n)
    return texts, counts


def _letter_answers(items: Sequence[MCItem], logits: torch.Tensor, scoring: LetterScoring,
                    tokenizer, who: str) -> list[Answer]:
    """Answers from next-token logits (B, V) at the scored position (NaN/inf logits of ``who`` raise)."""
    check_finite(logits, f"next-token logits of {who}", NON_FINITE_HINT)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    answers = []
    for b, item in enumerate(items):
        ids = [scoring.token_ids[L] for L in item.letters]
        values = logprobs[b, ids].tolist()
        scores = dict(zip(item.letters, values))
        letter = item.letters[max(range(len(values)), key=values.__getitem__)]  # first on ties
        top = int(logprobs[b].argmax())
        answers.append(Answer(item.id, letter, tokenizer.decode([top]), scores,
                              {"top_token": tokenizer.decode([top]),
                               "letter_mass": float(sum(math.exp(v) for v in values))}))
    return answers


# --------------------------------------------------------------------------- the methods


class Method:
    """A way to answer multiple-choice items. Subclasses implement ``_answer_batch``.

    scoring: "generate" (greedy, ``max_new_tokens``, regex cascade) or "logits" (option letters'
    next-token log-probabilities after ``assistant_prefix``).
    static_cache: decode "generate" answers with a preallocated static cache (what CUDA compiles);
    None = only on CUDA. The tokens are the same either way, so it is not part of ``describe()``.
    """

    name = "method"  # registry key (``METHODS``)

    def __init__(self, *, scoring: str = "generate", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 assistant_prefix: str = DEFAULT_ASSISTANT_PREFIX, label: str | None = None,
                 static_cache: bool | None = None):
        if scoring not in SCORING_MODES:
            raise ValueError(f"scoring must be one of {SCORING_MODES}, got {scoring!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if static_cache not in (None, True, False):
            raise ValueError(f"static_cache must be None (CUDA only), True or False, got {static_cache!r}")
        self.scoring = scoring
        self.static_cache = static_cache
        self.max_new_tokens = max_new_tokens
        self.assistant_prefix = assistant_prefix or ""
        self.label = label or self.default_label()

    def default_label(self) -> str:
        return self.name

    def describe(self) -> dict[str, Any]:
        """What determines this method's answers (the evaluator refuses to mix runs that differ)."""
        out = {"method": self.name, "scoring": self.scoring}
        if self.scoring == "generate":
            out["max_new_tokens"] = self.max_new_tokens
        else:
            out["assistant_prefix"] = self.assistant_prefix
        return out

    def answer(self, items: Sequence[MCItem], batch_size: int = 8) -> list[Answer]:
        """One ``Answer`` per item, in item order; items run ``batch_size`` at a time, longest first."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        items = list(items)
        for item in items:
            if not isinstance(item, MCItem):
                raise TypeError(f"expected MCItem, got {type(item).__name__}")
        # longest prompts first (less padding per batch, memory errors early); answers in item order
        order = sorted(range(len(items)), key=lambda i: -len(mc_prompt(items[i])))
        out: list[Answer | None] = [None] * len(items)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            answers = self._answer_batch([items[i] for i in rows])
            if len(answers) != len(rows):
                raise RuntimeError(f"{self.name} returned {len(answers)} answers for {len(rows)} items")
            for i, answer in zip(rows, answers):
                out[i] = answer
        return out

    def _answer_batch(self, items: list[MCItem]) -> list[Answer]:
        raise NotImplementedError

    def fingerprints(self) -> dict[str, Any]:
        """Content fingerprints of what this method computes with (models, tokenizers, fusers); the
        evaluator reuses cached answers only under the same ones (``c2c.fingerprint``)."""
        return {}

    # shared by the single-model methods (receiver/sharer alone, T2T's receiver step)
    def _answer_with(self, model, tokenizer, items: list[MCItem], chats: list[list[dict]],
                     extras: list[dict] | None = None, *, who: str) -> list[Answer]:
        """who: the model's role, for errors ("the receiver")."""
        extras = extras or [{} for _ in items]
        if self.scoring == "logits":
            scoring = letter_scoring(tokenizer, self.assistant_prefix)
            rows = [render_ids(tokenizer, chat, scoring.prefix) for chat in chats]
            check_context(model.config, max(map(len, rows)), 0, who)
            ids, mask = left_pad(rows, pad_token_id(tokenizer))
            ids, mask = ids.to(model.device), mask.to(model.device)
            logits = next_token_logits(model, ids, mask)
            answers = _letter_answers(items, logits, scoring, tokenizer, f"{who} ({_model_name(model)})")
        else:
            rows = [render_ids(tokenizer, chat) for chat in chats]
            check_context(model.config, max(map(len, rows)), self.max_new_tokens, who)
            ids, mask = left_pad(rows, pad_token_id(tokenizer))
            ids, mask = ids.to(model.device), mask.to(model.device)
            greedy = _greedy_kwargs(model, tokenizer, self.max_new_tokens)
            sequences = generate_from_prefix(model, ids, mask, static_cache=self.static_cache, **greedy)
            _check_decoding(greedy)
            texts, counts = _decode_new(tokenizer, sequences[:, ids.shape[1]:], _eos_ids(model, tokenizer))
            answers = [Answer(item.id, extract_answer(text, len(item.options)), text, None,
                              {"new_tokens": n}) for item, text, n in zip(items, texts, counts)]
        for answer, row, extra in zip(answers, rows, extras):
            answer.extra = {**extra, **answer.extra, "prompt_tokens": len(row)}
        return answers


@torch.no_grad()
def next_token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) after the last prompt token, on the shared engine: prefix cache, then the last token."""
    cache = prefix_cache(model, input_ids, attention_mask)
    out = model(input_ids=input_ids[:, -1:], attention_mask=attention_mask,
                position_ids=position_ids(attention_mask)[:, -1:], cache=cache, use_cache=True)
    return out.logits[:, -1]


def _model_name(model) -> str:
    return str(getattr(model.config, "name_or_path", "") or type(model).__name__)


class ReceiverAlone(Method):
    """The receiver answers alone."""

    name = "receiver"

    def __init__(self, model, tokenizer, *, model_name: str | None = None, **options):
        self.model, self.tokenizer = model, tokenizer
        self.model_name = model_name or _model_name(model)
        super().__init__(**options)

    def default_label(self) -> str:
        return f"{'Receiver' if self.name == 'receiver' else 'Sharer'} alone ({Path(self.model_name).name})"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.model_name}

    def fingerprints(self) -> dict[str, Any]:
        return {"model": model_fingerprint(self.model), "tokenizer": tokenizer_fingerprint(self.tokenizer)}

    def _answer_batch(self, items):
        return self._answer_with(self.model, self.tokenizer, items, [chat_messages(i) for i in items],
                                 who=f"the {self.name}")


class SharerAlone(ReceiverAlone):
    """The sharer answers alone (same code as the receiver; its own chat template)."""

    name = "sharer"


class TextToText(Method):
    """T2T: the sharer writes background (options withheld), the receiver answers after reading it
    (``protocol``: one of ``c2c.benchmarks.T2T_PROTOCOLS``)."""

    name = "t2t"

    def __init__(self, receiver, receiver_tokenizer, sharer, sharer_tokenizer, *,
                 sharer_max_new_tokens: int = DEFAULT_T2T_MAX_NEW_TOKENS, protocol: str = DEFAULT_T2T_PROTOCOL,
                 receiver_name: str | None = None, sharer_name: str | None = None, **options):
        if not isinstance(sharer_max_new_tokens, int) or sharer_max_new_tokens < 1:
            raise ValueError(f"sharer_max_new_tokens must be a positive int, got {sharer_max_new_tokens!r}")
        self.receiver, self.receiver_tokenizer = receiver, receiver_tokenizer
        self.sharer, self.sharer_tokenizer = sharer, sharer_tokenizer
        self.sharer_max_new_tokens = sharer_max_new_tokens
        self.protocol = check_t2t_protocol(protocol)
        self.receiver_name = receiver_name or _model_name(receiver)
        self.sharer_name = sharer_name or _model_name(sharer)
        super().__init__(**options)

    def default_label(self) -> str:
        return "T2T"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "receiver": self.receiver_name, "sharer": self.sharer_name,
                "sharer_max_new_tokens": self.sharer_max_new_tokens, "protocol": self.protocol}

    def fingerprints(self) -> dict[str, Any]:
        return {"receiver": model_fingerprint(self.receiver),
                "receiver_tokenizer": tokenizer_fingerprint(self.receiver_tokenizer),
                "sharer": model_fingerprint(self.sharer),
                "sharer_tokenizer": tokenizer_fingerprint(self.sharer_tokenizer)}

    def sharer_texts(self, items: list[MCItem]) -> tuple[list[str], list[int]]:
        """The sharer's background texts (greedy) and their lengths in sharer tokens."""
        rows = [render_ids(self.sharer_tokenizer, [{"role": "user", "content": t2t_sharer_prompt(i, self.protocol)}])
                for i in items]
        check_context(self.sharer.config, max(map(len, rows)), self.sharer_max_new_tokens,
                      "the sharer (T2T background)")
        ids, mask = left_pad(rows, pad_token_id(self.sharer_tokenizer))
        ids, mask = ids.to(self.sharer.device), mask.to(self.sharer.device)
        greedy = _greedy_kwargs(self.sharer, self.sharer_tokenizer, self.sharer_max_new_tokens)
        sequences = generate_from_prefix(self.sharer, ids, mask, static_cache=self.static_cache, **greedy)
        _check_decoding(greedy)
        return _decode_new(self.sharer_tokenizer, sequences[:, ids.shape[1]:],
                           _eos_ids(self.sharer, self.sharer_tokenizer))

    def _answer_batch(self, items):
        texts, counts = self.sharer_texts(items)
        extras = [{"sharer_text": t, "sharer_tokens": n, "sharer_truncated": n >= self.sharer_max_new_tokens}
                  for t, n in zip(texts, counts)]
        chats = [t2t_receiver_messages(item, text, self.protocol) for item, text in zip(items, texts)]
        return self._answer_with(self.receiver, self.receiver_tokenizer, items, chats, extras,
                                 who="the receiver (T2T answer)")


class C2C(Method):
    """The receiver answers from its cache fused with the sharer's (``c2c.fused.C2CModel``)."""

    name = "c2c"

    def __init__(self, model: C2CModel, *, fuser_name: str | None = None, receiver_name: str | None = None,
                 sharer_names: Sequence[str] | None = None, **options):
        if not isinstance(model, C2CModel):
            raise TypeError(f"C2C needs a c2c.fused.C2CModel, got {type(model).__name__}")
        self.model = model
        self.receiver_name = receiver_name or _model_name(model.receiver)
        self.sharer_names = list(sharer_names or [_model_name(s) for s in model.sharers])
        self.fuser_name = fuser_name or "fuser(checksum=%.6g)" % _checksum(model.fusers)
        super().__init__(**options)

    @classmethod
    def from_models(cls, receiver, receiver_tokenizer, sharer, sharer_tokenizer, fuser, *,
                    alignment: str | None = None, **options) -> "C2C":
        """One receiver, one sharer, one fuser (an instance, or a checkpoint folder: see ``load_fuser``).

        alignment: token alignment for a sharer with another tokenizer; None = the strategy the fuser was
        trained with (its config's ``alignment``), else ``DEFAULT_ALIGNMENT``. Another explicit choice than
        the fuser's is refused (``C2CModel``).
        """
        if isinstance(fuser, (str, Path)):
            options.setdefault("fuser_name", str(fuser))
            fuser = load_fuser(fuser, receiver.config, sharer.config)
        fuser = fuser.to(device=receiver.device, dtype=receiver.dtype).eval()
        alignment = alignment or fuser.config.alignment or DEFAULT_ALIGNMENT
        model = C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [fuser], alignment=alignment)
        return cls(model, **options)

    def default_label(self) -> str:
        return "C2C"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "receiver": self.receiver_name, "sharers": self.sharer_names,
                "fuser": self.fuser_name, "alignment": [a.strategy for a in self.model.aligners],
                "multi_sharer": self.model.multi_sharer}

    def fingerprints(self) -> dict[str, Any]:
        m = self.model
        return {"receiver": model_fingerprint(m.receiver), "sharers": [model_fingerprint(s) for s in m.sharers],
                "fusers": [fuser_fingerprint(f) for f in m.fusers],
                "receiver_tokenizer": tokenizer_fingerprint(m.receiver_tokenizer),
                "sharer_tokenizers": [tokenizer_fingerprint(t) for t in m.sharer_tokenizers]}

    def prepare(self, chats: list[list[dict]], assistant_prefix: str = "") -> FusedInputs:
        """Fused inputs of chats (generation prompt, thinking off), then ``assistant_prefix`` as message text."""
        m = self.model
        if not assistant_prefix:
            return m.prepare(chats, add_generation_prompt=True, enable_thinking=False)
        aligned = [[aligner.align_chat(chat, add_generation_prompt=True, enable_thinking=False)
                    .extended(aligner.align_text(assistant_prefix)) for aligner in m.aligners] for chat in chats]
        return collate(aligned, pad_token_id(m.receiver_tokenizer), [pad_token_id(t) for t in m.sharer_tokenizers])

    @torch.no_grad()
    def _answer_batch(self, items):
        m = self.model
        tokenizer = m.receiver_tokenizer
        chats = [chat_messages(i) for i in items]
        device = m.receiver.device
        if self.scoring == "logits":
            scoring = letter_scoring(tokenizer, self.assistant_prefix)
            inputs = self.prepare(chats, scoring.prefix).to(device)
            m.check_lengths(inputs)  # the prompt must fit the context
            logits = m(inputs)[:, 0]
            answers = _letter_answers(items, logits, scoring, tokenizer,
                                      f"C2C ({self.receiver_name}, {self.fuser_name})")
        else:
            inputs = self.prepare(chats).to(device)
            m.check_lengths(inputs, self.max_new_tokens)  # prompt + answer must fit the context
            greedy = _greedy_kwargs(m.receiver, tokenizer, self.max_new_tokens)
            sequences = m.generate(inputs, static_cache=self.static_cache, **greedy)
            _check_decoding(greedy)
            texts, counts = _decode_new(tokenizer, sequences[:, inputs.input_ids.shape[1]:],
                                        _eos_ids(m.receiver, tokenizer))
            answers = [Answer(item.id, extract_answer(text, len(item.options)), text, None, {"new_tokens": n})
                       for item, text, n in zip(items, texts, counts)]
        lengths = inputs.attention_mask.sum(-1).tolist()
        for answer, n in zip(answers, lengths):
            answer.extra["prompt_tokens"] = int(n)
        return answers


def _checksum(modules) -> float:
    return float(sum(p.detach().double().abs().sum() for p in modules.parameters()))


METHODS = {cls.name: cls for cls in (ReceiverAlone, SharerAlone, TextToText, C2C)}
