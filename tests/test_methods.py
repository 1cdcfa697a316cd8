"""The four methods: one interface, batched == batch 1, the logit mode against a manual computation."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from c2c.benchmarks import (T2T_PROTOCOLS, extract_answer, load_benchmark, mc_prompt, t2t_receiver_messages,
                            write_tiny_fixtures)
from c2c.checkpoint import load_fuser
import c2c.fused
from c2c.fused import C2CModel, to_static_cache
from c2c.methods import (
    C2C,
    DEFAULT_ASSISTANT_PREFIX,
    Answer,
    ReceiverAlone,
    SharerAlone,
    TextToText,
    letter_scoring,
    render_ids,
)
from conftest import make_fuser

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
MODES = ["generate", "logits"]


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Tiny ARC (3-5 options) and C-Eval items: 12 prompts of different lengths."""
    folders = write_tiny_fixtures(tmp_path_factory.mktemp("fixtures"))
    return (list(load_benchmark("arc-challenge", folders["arc-challenge"]))
            + list(load_benchmark("ceval", folders["ceval"]))[:3])


def build(name, mode, tiny_receiver, tiny_sharer, gate_logit=1.0, shared_vocabulary=False, **options):
    (r, rt), (s, st) = tiny_receiver, (tiny_receiver if shared_vocabulary else tiny_sharer)
    options = dict(scoring=mode, max_new_tokens=8, **options)
    if name == "receiver":
        return ReceiverAlone(r, rt, **options)
    if name == "sharer":
        return SharerAlone(s, st, **options)
    if name == "t2t":
        return TextToText(r, rt, s, st, sharer_max_new_tokens=6, **options)
    return C2C.from_models(r, rt, s, st, make_fuser(r, s, seed=3, gate_logit=gate_logit), **options)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["receiver", "sharer", "t2t", "c2c"])
def test_batched_answers_equal_batch_one(name, mode, items, tiny_receiver, tiny_sharer):
    method = build(name, mode, tiny_receiver, tiny_sharer)
    batched = method.answer(items, batch_size=5)
    single = method.answer(items, batch_size=1)
    assert [a.item_id for a in batched] == [i.id for i in items]
    assert len({a.extra["prompt_tokens"] for a in batched}) > 3  # really padded batches
    for a, b in zip(batched, single):
        assert (a.item_id, a.letter, a.text) == (b.item_id, b.letter, b.text)
        assert a.extra.get("sharer_text") == b.extra.get("sharer_text")
        if mode == "logits":
            assert a.scores.keys() == b.scores.keys()
            torch.testing.assert_close(torch.tensor(list(a.scores.values())),
                                       torch.tensor(list(b.scores.values())), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["receiver", "sharer", "t2t", "c2c"])
def test_static_cache_decoding_gives_the_dynamic_tokens(name, items, tiny_receiver, tiny_sharer, monkeypatch):
    """The branch every CUDA run takes, forced on CPU exactly as the methods call it: a static cache sized
    from the generation_config `_greedy_kwargs` passes (the models' own configs set no max_new_tokens)."""
    assert tiny_receiver[0].generation_config.max_new_tokens is None
    assert tiny_sharer[0].generation_config.max_new_tokens is None
    sizes = []

    def spy(cache, config, max_cache_len):
        sizes.append((cache.get_seq_length(), max_cache_len))
        return to_static_cache(cache, config, max_cache_len)

    monkeypatch.setattr(c2c.fused, "to_static_cache", spy)
    monkeypatch.setattr(c2c.fused, "STATIC_CACHE_MULTIPLE", 1)  # exact lengths (no rounding up) to check the sizing
    dynamic = build(name, "generate", tiny_receiver, tiny_sharer, static_cache=False).answer(items, batch_size=5)
    assert sizes == []
    static = build(name, "generate", tiny_receiver, tiny_sharer, static_cache=True).answer(items, batch_size=5)
    batches = 3 * (2 if name == "t2t" else 1)  # 12 items in batches of 5; T2T decodes twice per batch
    assert len(sizes) == batches
    # prompt (cached prefix + last token) + the method's cap: 8 new tokens; T2T's sharer text first, 6
    assert [length - prefix - 1 for prefix, length in sizes] == ([6, 8] * 3 if name == "t2t" else [8] * 3)
    for d, s in zip(dynamic, static):
        assert (d.item_id, d.letter, d.text, d.extra["new_tokens"]) == (s.item_id, s.letter, s.text, s.extra["new_tokens"])
        assert d.extra.get("sharer_text") == s.extra.get("sharer_text")
    assert any(a.extra["new_tokens"] > 1 for a in static)  # really decoded several steps from the static cache


@pytest.mark.parametrize("name", ["receiver", "sharer", "t2t", "c2c"])
def test_answer_shape(name, items, tiny_receiver, tiny_sharer):
    generated = build(name, "generate", tiny_receiver, tiny_sharer).answer(items, batch_size=4)
    scored = build(name, "logits", tiny_receiver, tiny_sharer).answer(items, batch_size=4)
    for item, g, s in zip(items, generated, scored):
        assert isinstance(g, Answer) and g.scores is None
        assert g.letter == extract_answer(g.text, len(item.options))  # the regex cascade decides
        assert 1 <= g.extra["new_tokens"] <= 8
        assert list(s.scores) == list(item.letters)  # one score per option, in letter order
        assert s.letter in item.letters  # never a parse failure
        assert all(v <= 0 for v in s.scores.values())  # log-probabilities
        if name == "t2t":
            assert g.extra["sharer_tokens"] <= 6 and isinstance(g.extra["sharer_text"], str)


def _manual_scores(model, tokenizer, messages, item):
    """Letter log-probs by a plain forward over the whole prompt (no cache, no batching)."""
    scoring = letter_scoring(tokenizer)
    ids = render_ids(tokenizer, messages, scoring.prefix)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    logprobs = torch.log_softmax(logits.float(), -1)
    return {letter: float(logprobs[scoring.token_ids[letter]]) for letter in item.letters}


def _check_against(answers, manual):
    for answer, expected in zip(answers, manual):
        torch.testing.assert_close(torch.tensor(list(answer.scores.values())),
                                   torch.tensor(list(expected.values())), rtol=0, atol=1e-4)
        assert answer.letter == max(expected, key=expected.get)


def test_logits_mode_matches_a_manual_forward(items, tiny_receiver, tiny_sharer):
    (r, rt), (s, st) = tiny_receiver, tiny_sharer
    chat = lambda item: [{"role": "user", "content": mc_prompt(item)}]  # noqa: E731
    _check_against(ReceiverAlone(r, rt, scoring="logits").answer(items, 5),
                   [_manual_scores(r, rt, chat(i), i) for i in items])
    _check_against(SharerAlone(s, st, scoring="logits").answer(items, 5),
                   [_manual_scores(s, st, chat(i), i) for i in items])
    for protocol in T2T_PROTOCOLS:  # the receiver reads exactly the chat of its protocol, with the sharer's text
        t2t = TextToText(r, rt, s, st, scoring="logits", sharer_max_new_tokens=5, protocol=protocol)
        assert t2t.describe()["protocol"] == protocol
        answers = t2t.answer(items, 5)
        _check_against(answers, [_manual_scores(r, rt, t2t_receiver_messages(i, a.extra["sharer_text"], protocol), i)
                                 for i, a in zip(items, answers)])
    with pytest.raises(ValueError, match="unknown T2T protocol"):
        TextToText(r, rt, s, st, protocol="v3")


def test_c2c_logits_score_the_token_right_after_the_fused_prefix(items, tiny_receiver, tiny_sharer):
    (r, rt), (s, st) = tiny_receiver, tiny_sharer
    method = C2C.from_models(r, rt, s, st, make_fuser(r, s, seed=1, gate_logit=1.0), scoring="logits")
    answers = method.answer(items, batch_size=5)
    scoring = letter_scoring(rt)
    for item, answer in zip(items, answers):
        messages = [{"role": "user", "content": mc_prompt(item)}]
        inputs = method.prepare([messages], scoring.prefix)
        # the fused prompt is the receiver's own prompt, ending with the assistant prefix
        assert inputs.input_ids[0].tolist() == render_ids(rt, messages, scoring.prefix)
        assert inputs.input_ids[0, -len(rt.encode(scoring.prefix)):].tolist() == rt.encode(scoring.prefix)
        # the prefix tokens are fused like message text (all but the last prompt token are fused)
        assert bool(inputs.sharers[0].fuse_mask[0, -2])
        with torch.no_grad():
            logprobs = torch.log_softmax(method.model(inputs)[0, 0].float(), -1)
        expected = {L: float(logprobs[scoring.token_ids[L]]) for L in item.letters}
        _check_against([answer], [expected])
        plain = _manual_scores(r, rt, messages, item)  # the open gates really change the scores
        assert max(abs(expected[L] - plain[L]) for L in item.letters) > 1e-3


@pytest.mark.parametrize("shared_vocabulary", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_c2c_with_closed_gates_is_the_receiver_alone(mode, shared_vocabulary, items, tiny_receiver, tiny_sharer):
    c2c = build("c2c", mode, tiny_receiver, tiny_sharer, gate_logit=-1.0, shared_vocabulary=shared_vocabulary)
    alone = build("receiver", mode, tiny_receiver, tiny_sharer)
    for a, b in zip(c2c.answer(items, 5), alone.answer(items, 5)):
        assert (a.letter, a.text, a.scores, a.extra) == (b.letter, b.text, b.scores, b.extra)


def test_letter_scoring_placement(tiny_receiver, tiny_sharer):
    # real BPE tokenizers have " A" ... " J" tokens: the prompt ends with the prefix itself
    for name in ("qwen3", "qwen2.5", "smollm2"):
        tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS / name))
        scoring = letter_scoring(tokenizer)
        assert scoring.prefix == DEFAULT_ASSISTANT_PREFIX
        for letter, token in scoring.token_ids.items():
            assert tokenizer.decode([token]) == " " + letter
            assert tokenizer.encode(f"{DEFAULT_ASSISTANT_PREFIX} {letter}")[-1] == token
    # the tiny tokenizers lack some " L" tokens: a trailing space, then the bare letter
    for _, tokenizer in (tiny_receiver, tiny_sharer):
        scoring = letter_scoring(tokenizer)
        assert scoring.prefix == DEFAULT_ASSISTANT_PREFIX + " "
        assert [tokenizer.decode([t]) for t in scoring.token_ids.values()] == list("ABCDEFGHIJ")
    assert letter_scoring(tiny_receiver[1], "").prefix == ""


def test_letter_scoring_refuses_multi_token_letters():
    class TwoTokensPerCharacter:
        def encode(self, text, add_special_tokens=False):
            return [t for c in text for t in (ord(c), 0)]

    with pytest.raises(ValueError, match="cannot score option letters"):
        letter_scoring(TwoTokensPerCharacter())


def test_bad_arguments(items, tiny_receiver, tiny_sharer, tmp_path):
    r, rt = tiny_receiver
    with pytest.raises(ValueError, match="scoring"):
        ReceiverAlone(r, rt, scoring="vote")
    with pytest.raises(ValueError, match="max_new_tokens"):
        ReceiverAlone(r, rt, max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        ReceiverAlone(r, rt).answer(items, batch_size=0)
    with pytest.raises(TypeError, match="C2CModel"):
        C2C(r)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fuser(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither fuser_config.json"):
        load_fuser(tmp_path)


def test_c2c_from_our_checkpoint(items, tiny_receiver, tiny_sharer, tmp_path):
    (r, rt), (s, st) = tiny_receiver, tiny_sharer
    fuser = make_fuser(r, s, seed=5, gate_logit=1.0)
    fuser.save_pretrained(tmp_path / "fuser")
    loaded = C2C.from_models(r, rt, s, st, tmp_path / "fuser", scoring="logits")
    direct = C2C(C2CModel(r, rt, [s], [st], [fuser]), scoring="logits")
    assert loaded.describe()["fuser"] == str(tmp_path / "fuser")
    assert [a.scores for a in loaded.answer(items[:4])] == [a.scores for a in direct.answer(items[:4])]


def test_c2c_aligns_tokens_as_its_fuser_was_trained(tiny_receiver, tiny_sharer, tmp_path):
    (r, rt), (s, st) = tiny_receiver, tiny_sharer
    for trained, other in (("first", "longest"), ("longest", "first")):
        fuser = make_fuser(r, s, seed=2, alignment=trained)
        fuser.save_pretrained(tmp_path / trained)
        assert C2C.from_models(r, rt, s, st, tmp_path / trained).describe()["alignment"] == [trained]  # the default
        assert C2C.from_models(r, rt, s, st, fuser, alignment=trained).describe()["alignment"] == [trained]
        with pytest.raises(ValueError, match=f"trained with token alignment '{trained}', not '{other}': pass "
                                             f"alignment='{trained}'"):
            C2C.from_models(r, rt, s, st, tmp_path / trained, alignment=other)
        with pytest.raises(ValueError, match=f"trained with token alignment '{trained}'"):
            C2CModel(r, rt, [s], [st], [fuser], alignment=other)
    # a fuser that records none (untrained, or a published checkpoint): the default strategy
    assert C2C.from_models(r, rt, s, st, make_fuser(r, s)).describe()["alignment"] == ["longest"]
    # a shared vocabulary aligns nothing: any recorded strategy fits
    assert C2C.from_models(r, rt, r, rt, make_fuser(r, r, alignment="first"), alignment="longest")


def _write_published(fuser, folder):
    """Write a fuser in the published per-layer layout (inverse of c2c.checkpoint.import_published)."""
    import json

    from c2c.checkpoint import published_key_map

    folder.mkdir()
    c, stacked = fuser.config, fuser.state_dict()
    layout = {"0": {"1": {str(t): [[c.layer_map[t], t]] for t in range(c.receiver_layers)}}}
    (folder / "projector_config.json").write_text(json.dumps(layout))
    for t in range(c.receiver_layers):
        state = {"gate_temperature": stacked["gate_temperature"].clone()}
        for path_index, p in enumerate(("key", "value")):
            for theirs, ours in published_key_map(c.num_layers).items():
                tensor = stacked[ours][2 * t + path_index].clone()
                if ours.endswith("weight") and tensor.dim() == 2:
                    tensor = tensor.t().contiguous()
                state[f"{p}_{theirs}"] = tensor
        torch.save(state, folder / f"projector_{t}.pt")
        args = dict(source_dim=c.sharer_head_dim, target_dim=c.receiver_head_dim, source_num_heads=c.sharer_kv_heads,
                    target_num_heads=c.receiver_kv_heads, intermediate_dim=c.intermediate_dim, hidden_dim=c.hidden_dim,
                    num_layers=c.num_layers, dropout=c.dropout, initial_temperature=c.initial_temperature,
                    final_temperature=c.final_temperature, anneal_steps=c.anneal_steps)
        (folder / f"projector_{t}.json").write_text(json.dumps({"class": "C2CProjector", "init_args": args}))


def test_c2c_from_a_published_checkpoint(items, tiny_receiver, tiny_sharer, tmp_path):
    (r, rt), (s, st) = tiny_receiver, tiny_sharer
    fuser = make_fuser(r, s, seed=6, gate_logit=1.0)
    _write_published(fuser, tmp_path / "final")
    loaded = C2C.from_models(r, rt, s, st, tmp_path / "final", scoring="logits")
    direct = C2C(C2CModel(r, rt, [s], [st], [fuser]), scoring="logits")
    assert [a.scores for a in loaded.answer(items[:4])] == [a.scores for a in direct.answer(items[:4])]
