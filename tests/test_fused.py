"""Fused generation: closed gates reproduce the receiver, batching, multi-sharer, transformers' generate."""

import copy
from unittest import mock

import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig
from transformers.generation.streamers import BaseStreamer

from c2c.fused import (STATIC_CACHE_MULTIPLE, C2CModel, FusedInputs, SharerInputs, generate_from_prefix, kv_cache,
                       position_ids, prefix_cache, requested_max_new_tokens, to_static_cache)
from c2c.prefixes import PrefixStore
from conftest import make_fuser

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "How many legs does a spider have? Le café est très bon. 中文"}],
    [{"role": "user", "content": "Hi"}],
]
GREEDY = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(params=["different-tokenizer", "shared-vocabulary"])
def pair(request, tiny_receiver, tiny_sharer):
    """(receiver, receiver tokenizer, sharer, sharer tokenizer): the tiny pair, or the receiver as its own sharer."""
    receiver, receiver_tokenizer = tiny_receiver
    sharer, sharer_tokenizer = tiny_sharer if request.param == "different-tokenizer" else tiny_receiver
    return receiver, receiver_tokenizer, sharer, sharer_tokenizer


def fused_model(pair, gate_logit, seed=0, **options):
    receiver, receiver_tokenizer, sharer, sharer_tokenizer = pair
    fuser = make_fuser(receiver, sharer, seed=seed, gate_logit=gate_logit)
    return C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [fuser], **options)


def test_closed_gates_reproduce_the_receiver_alone(pair):
    model = fused_model(pair, gate_logit=-1.0)
    inputs = model.prepare(PROMPTS)
    assert inputs.input_ids.shape[0] == 3 and (inputs.attention_mask == 0).any()  # really padded
    fused = model.generate(inputs, **GREEDY)
    receiver = pair[0]
    # the same engine (prefix cache + generate): identical tokens and bit-identical logits
    alone = generate_from_prefix(receiver, inputs.input_ids, inputs.attention_mask, **GREEDY)
    assert torch.equal(fused.sequences, alone.sequences)
    for step_fused, step_alone in zip(fused.logits, alone.logits):
        assert torch.equal(step_fused, step_alone)
    # plain HF generate prefills the whole prompt at once: same tokens, logits equal up to float32 rounding
    plain = receiver.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, **GREEDY)
    assert torch.equal(fused.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(fused.logits), torch.stack(plain.logits), rtol=0, atol=1e-5)


def test_static_cache_engine_gives_the_same_tokens(pair):
    """The static-cache path (compiled on CUDA) decodes the same greedy tokens as the dynamic cache."""
    model = fused_model(pair, gate_logit=1.0)
    inputs = model.prepare(PROMPTS)
    dynamic = model.generate(inputs, static_cache=False, **GREEDY)
    static = model.generate(inputs, static_cache=True, **GREEDY)
    assert torch.equal(dynamic.sequences, static.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=0, atol=1e-5)


def test_static_cache_length_follows_transformers_max_new_tokens_priority(tiny_receiver):
    """The argument, else the generation_config passed, else the model's own (transformers' order)."""
    receiver = tiny_receiver[0]
    passed = copy.deepcopy(receiver.generation_config)
    passed.max_new_tokens = 7
    own = copy.deepcopy(receiver.generation_config)
    own.max_new_tokens = 5
    assert requested_max_new_tokens(receiver, {"max_new_tokens": 3, "generation_config": passed}) == 3
    assert requested_max_new_tokens(receiver, {"generation_config": passed}) == 7
    assert requested_max_new_tokens(receiver, {}) is None
    with mock.patch.object(receiver, "generation_config", own):
        assert requested_max_new_tokens(receiver, {}) == 5
        assert requested_max_new_tokens(receiver, {"generation_config": passed}) == 7
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="static_cache=True needs max_new_tokens"):
        generate_from_prefix(receiver, ids, torch.ones_like(ids), static_cache=True)
    # the cache is rounded up to a multiple of STATIC_CACHE_MULTIPLE (few compiled shapes)
    with mock.patch("c2c.fused.to_static_cache", wraps=to_static_cache) as spy:
        generate_from_prefix(receiver, ids, torch.ones_like(ids), static_cache=True, generation_config=passed)
    assert spy.call_args.args[2] == STATIC_CACHE_MULTIPLE >= 4 + 7


def test_open_gates_change_the_answer(pair):
    model = fused_model(pair, gate_logit=1.0)
    inputs = model.prepare(PROMPTS)
    fused = model.generate(inputs, **GREEDY)
    alone = generate_from_prefix(pair[0], inputs.input_ids, inputs.attention_mask, **GREEDY)
    assert (fused.logits[0] - alone.logits[0]).abs().max() > 1e-3


def test_batch_gives_the_same_tokens_as_each_prompt_alone(pair):
    model = fused_model(pair, gate_logit=1.0)
    batched = model.generate(model.prepare(PROMPTS), **GREEDY)
    width = batched.sequences.shape[1] - GREEDY["max_new_tokens"]
    for b, prompt in enumerate(PROMPTS):
        single = model.generate(model.prepare([prompt]), **GREEDY)
        assert torch.equal(single.sequences[0, -12:], batched.sequences[b, width:])
        torch.testing.assert_close(single.logits[0][0], batched.logits[0][b], rtol=0, atol=1e-4)


def test_fused_cache_matches_a_per_layer_reference(tiny_receiver, tiny_sharer):
    """Prefill of one prompt against explicit per-layer code: receiver and sharer run alone, the
    sharer's KV picked by the aligned index and the layer map, one layer's K/V fused at a time."""
    receiver, receiver_tokenizer = tiny_receiver
    sharer, sharer_tokenizer = tiny_sharer
    fuser = make_fuser(receiver, sharer, seed=3, gate_logit=1.0)
    model = C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [fuser])
    aligned = model.aligners[0].align_chat(PROMPTS[1])
    cache = model.prefill(model.prepare([PROMPTS[1]]))

    n = len(aligned.receiver_ids) - 1
    with torch.no_grad():
        r = receiver(input_ids=torch.tensor([aligned.receiver_ids[:n]]), use_cache=True).cache
        s = sharer(input_ids=torch.tensor([aligned.sharer_ids]), use_cache=True).cache
    index = aligned.sharer_index[:n]
    mask = torch.tensor([aligned.fuse_mask[:n]])
    for t, layer in enumerate(cache.layers):
        source = s.layers[fuser.config.layer_map[t]]
        for kv, (fused, sharer_side, receiver_side) in enumerate(
                [(layer.keys, source.keys, r.layers[t].keys), (layer.values, source.values, r.layers[t].values)]):
            picked = torch.stack([sharer_side[:, :, j] for j in index], dim=2)  # (1, Hs, n, Ds)
            # the stacked fuser evaluates every group; feed this layer's K or V to all and keep group 2t+kv
            groups = 2 * len(cache.layers)
            delta = fuser.delta(picked.expand(groups, *picked.shape), receiver_side.expand(groups, *receiver_side.shape),
                                mask)
            expected = receiver_side + delta[2 * t + kv]
            torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    assert not all(aligned.fuse_mask) and any(aligned.fuse_mask)  # template positions really are left out


def test_multi_sharer_sequential_and_parallel(tiny_receiver, tiny_sharer):
    receiver, receiver_tokenizer = tiny_receiver
    sharer, sharer_tokenizer = tiny_sharer
    first = make_fuser(receiver, sharer, seed=1, gate_logit=1.0)
    second_closed = make_fuser(receiver, receiver, seed=2, gate_logit=-1.0)
    second_open = make_fuser(receiver, receiver, seed=2, gate_logit=1.0)
    sharers, tokenizers = [sharer, receiver], [sharer_tokenizer, receiver_tokenizer]

    def cache_kv(model, inputs):
        cache = model.prefill(inputs)
        return torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])

    single = C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [first])
    inputs_single = single.prepare(PROMPTS)
    reference = cache_kv(single, inputs_single)
    results = {}
    for mode in ("sequential", "parallel"):
        closed = C2CModel(receiver, receiver_tokenizer, sharers, tokenizers, [first, second_closed], multi_sharer=mode)
        inputs = closed.prepare(PROMPTS)
        assert torch.equal(cache_kv(closed, inputs), reference)  # a closed second sharer changes nothing
        both = C2CModel(receiver, receiver_tokenizer, sharers, tokenizers, [first, second_open], multi_sharer=mode)
        results[mode] = cache_kv(both, inputs)
    assert not torch.allclose(results["sequential"], results["parallel"])
    # parallel: each fuser reads the original receiver cache, deltas add up
    alone_second = C2CModel(receiver, receiver_tokenizer, [receiver], [receiver_tokenizer], [second_open])
    base = cache_kv(C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer],
                             [make_fuser(receiver, sharer, gate_logit=-1.0)]), inputs_single)
    expected = reference + cache_kv(alone_second, alone_second.prepare(PROMPTS)) - base
    torch.testing.assert_close(results["parallel"], expected, rtol=1e-5, atol=1e-5)


def test_transformers_generate_options_work(tiny_receiver, tiny_sharer):
    """Sampling, streaming and batching come from transformers' generate."""
    model = fused_model((*tiny_receiver, *tiny_sharer), gate_logit=1.0)
    inputs = model.prepare(PROMPTS[:1])

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    out = model.generate(inputs, max_new_tokens=5, do_sample=False, streamer=streamer)
    assert streamer.chunks[-1] == "end" and len(streamer.chunks) == 1 + 5 + 1  # prompt, 5 tokens, end
    torch.manual_seed(0)
    sample_a = model.generate(inputs, max_new_tokens=8, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    sample_b = model.generate(inputs, max_new_tokens=8, do_sample=True, temperature=1.5)
    assert torch.equal(sample_a, sample_b) and out.shape[1] == inputs.input_ids.shape[1] + 5


def test_forward_scores_a_continuation_like_generate(tiny_receiver, tiny_sharer):
    """forward() logits at the last prompt token and along a continuation equal generate's step logits."""
    model = fused_model((*tiny_receiver, *tiny_sharer), gate_logit=1.0)
    inputs = model.prepare(PROMPTS)
    generated = model.generate(inputs, **GREEDY)
    continuation = generated.sequences[:, inputs.input_ids.shape[1]:]  # (B, 12)
    with torch.no_grad():
        logits = model(inputs, continuation[:, :-1])  # (B, 12, V)
    torch.testing.assert_close(logits, torch.stack(generated.logits, dim=1), rtol=0, atol=1e-4)


def test_fusers_get_gradients_and_models_stay_frozen(tiny_receiver, tiny_sharer):
    receiver, sharer = tiny_receiver[0], tiny_sharer[0]
    model = fused_model((*tiny_receiver, *tiny_sharer), gate_logit=0.0).train()
    assert not receiver.training and not sharer.training and model.fusers[0].training
    inputs = model.prepare(PROMPTS)
    answer = torch.tensor([[5, 6, 7]] * 3)
    logits = model(inputs, answer[:, :-1], torch.ones(3, 2, dtype=torch.long))  # (B, 3, V)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), answer.flatten())
    loss.backward()
    assert model.fusers[0].input.weight.grad.abs().sum() > 0
    assert model.fusers[0].gate_logit.grad.abs().sum() > 0
    assert all(p.grad is None for p in receiver.parameters()) and all(p.grad is None for p in sharer.parameters())


def test_bad_inputs_raise_clear_errors(tiny_receiver, tiny_sharer):
    receiver, receiver_tokenizer = tiny_receiver
    sharer, sharer_tokenizer = tiny_sharer
    model = fused_model((*tiny_receiver, *tiny_sharer), gate_logit=1.0)
    with pytest.raises(ValueError, match="empty batch"):
        model.prepare([])
    with pytest.raises(ValueError, match="empty"):
        model.prepare([[]])
    with pytest.raises(ValueError, match="at least 2 receiver tokens"):
        model.generate(model.prepare(["a"], chat=False), max_new_tokens=2)
    long_prompt = [[{"role": "user", "content": "spider legs " * 600}]]
    with pytest.raises(ValueError, match="exceeds the receiver's context of 1024"):
        model.generate(model.prepare(long_prompt), max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the receiver's context"):
        model.generate(model.prepare(PROMPTS[:1]), max_new_tokens=2000)
    wrong = make_fuser(receiver, receiver)  # a fuser for (receiver, receiver) on the (receiver, sharer) pair
    with pytest.raises(ValueError, match="sharer num_key_value_heads: fuser expects 2, model has 3"):
        C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [wrong])
    with pytest.raises(ValueError, match="different tokenizer.*alignment is disabled"):
        C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [make_fuser(receiver, sharer)],
                 alignment=None)
    with pytest.raises(ValueError, match="one tokenizer and one fuser per sharer"):
        C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [])


@pytest.fixture(scope="module")
def sliding_sharer(tiny_receiver):
    """A tiny random Gemma-3 text model on the receiver's vocabulary whose first three layers attend to a 4-token
    window (Gemma-3-270M: 15 of 18 layers, window 512): transformers' own cache keeps only their last 3 positions."""
    config = Gemma3TextConfig(vocab_size=tiny_receiver[0].config.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              sliding_window=4, max_position_embeddings=128,
                              layer_types=["sliding_attention"] * 3 + ["full_attention"])
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def long_prompts(vocab: int, width: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts longer than the sliding window, the second left-padded by 3: ids and mask (2, width)."""
    ids = torch.randint(3, vocab, (2, width), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def test_a_sliding_window_sharers_cache_holds_every_position_of_every_layer(sliding_sharer):
    ids, mask = long_prompts(sliding_sharer.config.vocab_size)
    cache = kv_cache(sliding_sharer, ids, mask)
    assert {layer.keys.shape[2] for layer in cache.layers} == {ids.shape[1]}
    # reference: each position's K/V as the last entry of transformers' own (sliding) cache of the prompt up to it
    for t in range(3, ids.shape[1]):
        reference = DynamicCache(config=sliding_sharer.config)
        with torch.no_grad():
            sliding_sharer.get_decoder()(input_ids=ids[:, :t + 1], attention_mask=mask[:, :t + 1],
                                         position_ids=position_ids(mask[:, :t + 1]), cache=reference, use_cache=True)
        assert reference.layers[0].keys.shape[2] < t + 1  # the reference's sliding layers really drop positions
        for ours, theirs in zip(cache.layers, reference.layers):
            torch.testing.assert_close(ours.keys[:, :, t], theirs.keys[:, :, -1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours.values[:, :, t], theirs.values[:, :, -1], rtol=1e-5, atol=1e-6)


def test_a_sliding_window_sharer_fuses_prompts_longer_than_its_window(tiny_receiver, sliding_sharer, tmp_path):
    receiver = tiny_receiver[0]
    ids, mask = long_prompts(receiver.config.vocab_size)
    index = torch.arange(ids.shape[1]).expand(2, -1)
    inputs = FusedInputs(ids, mask, [SharerInputs(ids, mask, index, mask.bool())])
    closed = C2CModel(receiver, None, [sliding_sharer], None, [make_fuser(receiver, sliding_sharer, gate_logit=-1.0)])
    alone = generate_from_prefix(receiver, ids, mask, **GREEDY)
    assert torch.equal(closed.generate(inputs, **GREEDY).sequences, alone.sequences)
    opened = C2CModel(receiver, None, [sliding_sharer], None, [make_fuser(receiver, sliding_sharer, gate_logit=1.0)])
    online = opened.prefill(inputs)
    assert not torch.equal(online.layers[0].keys, prefix_cache(receiver, ids, mask).layers[0].keys)
    # the prefix store (cached-prompt training and evaluation) accepts the sharer and gives the same fused cache
    store = PrefixStore(sliding_sharer, tmp_path / "store", progress=False).attach()
    try:
        stored = opened.prefill(inputs)
    finally:
        store.detach()
    assert len(store) == 2
    for a, b in zip(online.layers, stored.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
