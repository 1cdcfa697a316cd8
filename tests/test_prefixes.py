"""Prefix caches on disk: what is read back equals what the model computes, crash-safe filling, and
training / evaluation from stored caches equal the online computation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from c2c.data import collate_examples, load_conversations, tokenize_chats
from c2c.fused import C2CModel, decoder_cache, left_pad, sharer_prefix_length
from c2c.prefixes import PrefixStore, attached_store, sequence_key
from c2c.train import continuation_loss, train
from conftest import make_fuser
from test_train import tiny_run

ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]


def _kv(cache) -> torch.Tensor:
    return torch.stack([t for layer in cache.layers for t in (layer.keys, layer.values)])  # (2L, B, H, W, D)


def test_stored_caches_equal_the_computed_ones(tiny_receiver, tmp_path):
    model, _ = tiny_receiver
    store = PrefixStore(model, tmp_path / "store", batch_size=2, progress=False)
    assert store.fill(ROWS) == 3 and store.fill(ROWS) == 0 and len(store) == 3
    ids, mask = left_pad(ROWS, 0)
    expected = _kv(decoder_cache(model, ids, mask))
    got = _kv(store.cache(ids, mask))
    valid = mask.bool()[None, :, None, :, None].expand_as(expected)
    # stored rows were computed in other batches (other padding widths): equal up to float32 rounding
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert (got[~valid] == 0).all()  # padding positions hold zeros, hidden by the attention mask
    for row in ROWS:  # each stored alone: (2L, H, n, D)
        assert store.get(row).shape[2] == len(row)


def test_a_second_store_on_the_folder_resumes_and_a_torn_index_line_is_dropped(tiny_receiver, tmp_path):
    model, _ = tiny_receiver
    folder = tmp_path / "store"
    PrefixStore(model, folder, progress=False).fill(ROWS[:2])
    with (folder / "index.jsonl").open("a") as f:
        f.write('{"key": "abc", "sha')  # a crash mid-line
    store = PrefixStore(model, folder, progress=False)
    assert len(store) == 2 and ROWS[0] in store and ROWS[2] not in store
    assert store.fill(ROWS) == 1  # only the missing one
    lines = (folder / "index.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["key"] for line in lines)
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert sum(len(load_file(str(s))) for s in shards) == 3


def test_a_store_of_another_model_is_refused(tiny_receiver, tiny_sharer, tmp_path):
    PrefixStore(tiny_receiver[0], tmp_path / "store", progress=False)
    with pytest.raises(ValueError, match="another model or library version.*model_fingerprint"):
        PrefixStore(tiny_sharer[0], tmp_path / "store", progress=False)


def test_default_folders_are_keyed_by_the_model(tiny_receiver, tiny_sharer):
    a, b = PrefixStore(tiny_receiver[0], progress=False), PrefixStore(tiny_sharer[0], progress=False)
    assert a.folder != b.folder and a.folder.parent == b.folder.parent
    assert PrefixStore(tiny_receiver[0], progress=False).folder == a.folder


def test_corrupt_entries_name_the_folder(tiny_receiver, tmp_path):
    model, _ = tiny_receiver
    store = PrefixStore(model, tmp_path / "store", progress=False)
    store.fill(ROWS[:1])
    for shard in (tmp_path / "store").glob("shard-*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=r"cannot read prefix-cache shard .*delete .*store"):
        PrefixStore(model, tmp_path / "store", progress=False).get(ROWS[0])
    with pytest.raises(ValueError, match="not left-padded"):
        store.cache(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 1]]))
    with pytest.raises(KeyError, match="fill"):
        store.get([99, 98])
    assert sequence_key([1, 2]) != sequence_key([2, 1])


@pytest.fixture()
def batch_and_model(tiny_receiver, tiny_sharer):
    """An open-gate fuser on the tiny pair (different tokenizers) and a padded training batch."""
    (receiver, receiver_tok), (sharer, sharer_tok) = tiny_receiver, tiny_sharer
    data = tokenize_chats(load_conversations("synthetic:facts", 6), receiver_tok, [sharer_tok], progress=False,
                          answer_prefix=None)
    examples = [data[i] for i in range(6)]
    batch = collate_examples(examples, receiver_tok.pad_token_id, [sharer_tok.pad_token_id])
    fuser = make_fuser(receiver, sharer, seed=3, gate_logit=2.0).train()
    model = C2CModel(receiver, receiver_tok, [sharer], [sharer_tok], [fuser])
    return model, batch, examples


def test_loss_and_gradients_from_stored_caches_equal_the_online_ones(batch_and_model, tmp_path):
    model, batch, examples = batch_and_model
    fuser = model.fusers[0]

    def loss_and_grads():
        torch.manual_seed(0)  # the same gate noise and dropout in both runs
        fuser.zero_grad()
        loss = continuation_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in fuser.named_parameters()}

    online_loss, online_grads = loss_and_grads()
    stores = [PrefixStore(model.receiver, tmp_path / "r", progress=False),
              PrefixStore(model.sharers[0], tmp_path / "s", progress=False)]
    stores[0].fill([e.prompt_ids[:-1] for e in examples])
    stores[1].fill([e.prompt[0].sharer_ids[:sharer_prefix_length(e.prompt[0])] for e in examples])
    for store in stores:
        store.attach()
    try:
        assert attached_store(model.receiver) is stores[0]
        cached_loss, cached_grads = loss_and_grads()
    finally:
        for store in stores:
            store.detach()
    assert attached_store(model.receiver) is None
    assert stores[0].computed == stores[1].computed == 6  # every cache came from the fill, none on demand
    torch.testing.assert_close(cached_loss, online_loss, rtol=1e-6, atol=1e-6)
    for name, grad in online_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_training_from_stored_caches_ends_with_the_online_weights(tmp_path):
    finals = {}
    for cached in (False, True):
        folder = train(tiny_run(tmp_path, name=f"cached-{cached}", prefix_cache=cached, max_steps=4,
                                checkpoint_every=0))
        finals[cached] = load_file(str(folder / "model.safetensors"))
        stores = json.loads((folder.parent / "data_stats.json").read_text())["prefix_stores"]
        assert [s["sequences"] > 0 for s in stores] == ([True, True] if cached else [])
    for name, weight in finals[False].items():
        torch.testing.assert_close(finals[True][name], weight, rtol=1e-4, atol=1e-6, msg=name)
