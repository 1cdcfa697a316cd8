"""Training data: templating and label masking, system removal, length filter, split, sources, batches."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from c2c.align import TokenAligner
from c2c.data import (
    IGNORE_INDEX,
    TokenizedChats,
    batch_order,
    build_example,
    collate_examples,
    continuation_text,
    fact_conversations,
    load_conversations,
    load_tokenized,
    natural_instruction_conversations,
    read_natural_instructions,
    source_fingerprint,
    split_indices,
    synthetic_facts,
    tokenize_chats,
    write_jsonl,
)

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"  # real tokenizers, offline
CHAT = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
]



@pytest.fixture(scope="module")
def tokenizers(tiny_receiver, tiny_sharer):
    return tiny_receiver[1], tiny_sharer[1]


def test_labels_cover_exactly_the_last_assistant_turn_and_its_end_tokens(tokenizers):
    receiver_tok, sharer_tok = tokenizers
    aligner = TokenAligner(receiver_tok, sharer_tok)
    example, reason = build_example(CHAT, receiver_tok, [aligner])
    assert reason is None
    # instruction: every message but the last (system removed), generation prompt, thinking disabled
    instruction = receiver_tok.apply_chat_template(CHAT[1:-1], tokenize=False, add_generation_prompt=True,
                                                   enable_thinking=False)
    assert instruction.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert example.prompt_ids == receiver_tok.encode(instruction, add_special_tokens=False)
    # continuation: exactly the last answer and the template's end tokens
    assert receiver_tok.decode(example.continuation_ids) == "The capital of Italy is Rome.<|im_end|>\n"
    assert receiver_tok.convert_ids_to_tokens(example.continuation_ids[-2:]) == ["<|im_end|>", "Ċ"]
    # labels in the transformers convention: -100 on the whole instruction (earlier answers included)
    assert example.input_ids == example.prompt_ids + example.continuation_ids
    labels = example.labels
    assert len(labels) == len(example.input_ids)
    scored = [t for t in labels if t != IGNORE_INDEX]
    assert labels[:len(example.prompt_ids)] == [IGNORE_INDEX] * len(example.prompt_ids)
    assert scored == example.continuation_ids
    assert "Paris" in receiver_tok.decode(example.prompt_ids) and "Paris" not in receiver_tok.decode(scored)
    # the sharer's own template ends its turns differently: the end tokens follow the template
    assert continuation_text(sharer_tok, CHAT) == "The capital of Italy is Rome.<|eot_id|>"


def test_the_papers_pair_on_real_tokenizers():
    """Qwen3-0.6B <- Qwen2.5-0.5B: the real Qwen3 template (empty think block in the instruction, answers of
    earlier turns kept, a leading newline of the last answer as rendered), identity alignment (shared vocab)."""
    from transformers import AutoTokenizer

    qwen3 = AutoTokenizer.from_pretrained(str(TOKENIZERS / "qwen3"))
    qwen25 = AutoTokenizer.from_pretrained(str(TOKENIZERS / "qwen2.5"))
    smollm2 = AutoTokenizer.from_pretrained(str(TOKENIZERS / "smollm2"))
    chat = CHAT[:-1] + [{"role": "assistant", "content": "\nThe capital of Italy is Rome."}]
    example, reason = build_example(chat, qwen3, [TokenAligner(qwen3, qwen25), TokenAligner(qwen3, smollm2)])
    assert reason is None
    prompt = qwen3.decode(example.prompt_ids)
    assert prompt.startswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.endswith("<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "pirate" not in prompt and "Paris" in prompt
    # Qwen3 renders the last answer without its leading newline: the continuation is what the template renders
    assert qwen3.decode(example.continuation_ids) == "The capital of Italy is Rome.<|im_end|>\n"
    full = qwen3.apply_chat_template(chat[1:], tokenize=False, enable_thinking=False)
    assert qwen3.decode(example.prompt_ids + example.continuation_ids) == full
    shared, other = example.prompt
    assert shared.sharer_ids == example.prompt_ids and all(shared.fuse_mask)  # same vocabulary: no alignment
    assert other.sharer_ids != example.prompt_ids and not all(other.fuse_mask)  # SmolLM2: template not fused


def test_system_turns_are_removed(tokenizers):
    receiver_tok, sharer_tok = tokenizers
    example, _ = build_example(CHAT, receiver_tok, [TokenAligner(receiver_tok, sharer_tok)])
    without, _ = build_example(CHAT[1:], receiver_tok, [TokenAligner(receiver_tok, sharer_tok)])
    assert "pirate" not in receiver_tok.decode(example.prompt_ids)
    assert "pirate" not in sharer_tok.decode(example.prompt[0].sharer_ids)
    assert example.prompt_ids == without.prompt_ids and example.continuation_ids == without.continuation_ids
    assert example.prompt[0].sharer_ids == without.prompt[0].sharer_ids


def test_length_filter_counts_instruction_and_answer(tokenizers):
    receiver_tok, sharer_tok = tokenizers
    aligners = [TokenAligner(receiver_tok, sharer_tok)]
    full, _ = build_example(CHAT, receiver_tok, aligners)
    n = len(full.prompt_ids) + len(full.continuation_ids)
    assert build_example(CHAT, receiver_tok, aligners, max_length=n)[0] is not None
    assert build_example(CHAT, receiver_tok, aligners, max_length=n - 1) == (None, "too_long")
    data = tokenize_chats([CHAT, CHAT[:3], CHAT[:2], CHAT[:1]], receiver_tok, [sharer_tok], max_length=n - 1,
                          progress=False)
    assert len(data) == 1 and data[0].source_index == 1  # CHAT[:3] is short enough
    assert data.stats["dropped"]["too_long"] == 1
    assert data.stats["dropped"]["no_assistant_answer"] == 2  # ends with a user turn / only a system turn
    assert (data.lengths <= n - 1).all()


def test_unusable_conversations_are_dropped_and_counted(tokenizers):
    receiver_tok, sharer_tok = tokenizers
    chats = [
        [{"role": "assistant", "content": "Hello"}],  # nothing to answer
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "   "}],  # empty answer
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ]
    data = tokenize_chats(chats, receiver_tok, [sharer_tok], progress=False)
    assert len(data) == 1
    assert data.stats["dropped"]["no_instruction"] == 1 and data.stats["dropped"]["empty_message"] == 1


def test_split_is_deterministic_disjoint_and_one_percent():
    train_a, eval_a = split_indices(1000, 0.01, seed=42)
    train_b, eval_b = split_indices(1000, 0.01, seed=42)
    assert np.array_equal(train_a, train_b) and np.array_equal(eval_a, eval_b)
    assert len(eval_a) == 10 and len(train_a) == 990
    assert not set(train_a) & set(eval_a) and set(train_a) | set(eval_a) == set(range(1000))
    _, eval_c = split_indices(1000, 0.01, seed=43)
    assert not np.array_equal(eval_a, eval_c)
    assert eval_a.tolist() == [127, 147, 260, 608, 810, 856, 859, 916, 933, 978]  # pinned: numpy's PCG64 is stable
    assert len(split_indices(50, 0.01, seed=0)[1]) == 1  # at least one eval example
    assert len(split_indices(50, 0.0, seed=0)[1]) == 0


def test_local_files_in_both_schemas(tmp_path):
    sharegpt = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello!"}]}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sharegpt))
    expected = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello!"}]]
    assert load_conversations(tmp_path / "a.jsonl") == expected
    write_jsonl(expected * 3, tmp_path / "b.jsonl")
    assert load_conversations(tmp_path / "b.jsonl", max_examples=2) == expected * 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": expected[0]}] * 2), tmp_path / "c.parquet")
    assert load_conversations(tmp_path / "c.parquet") == expected * 2
    (tmp_path / "d.json").write_text(json.dumps(sharegpt))
    assert load_conversations(tmp_path / "d.json") == expected


def test_missing_fields_name_the_field_and_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no conversation here"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, record 0: missing field 'conversations'.*'messages'"):
        load_conversations(bad)
    bad.write_text(json.dumps({"conversations": [{"from": "human", "text": "Hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, record 0: turn 0 is missing field 'value'"):
        load_conversations(bad)
    bad.write_text(json.dumps({"messages": [{"role": "wizard", "content": "Hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*unknown role 'wizard'"):
        load_conversations(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_conversations(tmp_path / "missing.jsonl")


def test_unreachable_hub_points_to_local_files(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"teknium/OpenHermes-2.5.*pass a local file"):
        load_conversations("teknium/OpenHermes-2.5", max_examples=10)


def test_hub_datasets_are_read_in_order_up_to_max_examples(monkeypatch):
    import datasets

    rows = [{"conversations": [{"from": "human", "value": f"q{i}", "weight": None},
                               {"from": "gpt", "value": f"a{i}", "weight": 1.0}], "source": "x"} for i in range(5)]
    calls = []

    def fake(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    chats = load_conversations("teknium/OpenHermes-2.5", max_examples=3)
    assert calls == [("teknium/OpenHermes-2.5", "train")]
    assert chats == [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
                     for i in range(3)]
    assert len(load_conversations("teknium/OpenHermes-2.5")) == 5


def _bigbench_sdist(path: Path, tasks: dict) -> Path:
    """A bigbench-like sdist: natural_instructions/<subtask>/task.json files plus the top-level task.json."""
    import io
    import tarfile

    root = "bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions"
    with tarfile.open(path, "w:gz") as tar:
        files = {f"{root}/task.json": {"name": "natural_instructions", "description": "all of them"},
                 **{f"{root}/{name}/task.json": task for name, task in tasks.items()},
                 "bigbench-1.0.0/bigbench/benchmark_tasks/other/task.json": {"name": "other", "examples": []}}
        for member, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_natural_instructions_from_the_bigbench_sdist(tmp_path):
    tasks = {
        "subtask002_b": {"name": "subtask002_b", "task_prefix": " Definition: add. ",
                         "examples": [{"input": "1+1 ", "target": ["2", "two"]}, {"input": "2+2", "target": ["4"]},
                                      {"input": "3+3", "target": "6"}]},
        "subtask001_a": {"name": "subtask001_a", "task_prefix": "Definition: copy.",
                         "examples": [{"input": "x", "target": ["x"]}, {"input": "y", "target": []}]},
    }
    read = read_natural_instructions(_bigbench_sdist(tmp_path / "bigbench-1.0.0.tar.gz", tasks))
    assert sorted(read) == ["subtask001_a", "subtask002_b"]  # neither the top-level task.json nor other tasks
    chats = list(natural_instruction_conversations(read))
    pairs = [(chat[0]["content"], chat[1]["content"]) for chat in chats]
    # interleaved by subtask name; the first answer of a list; examples without answers left out
    assert pairs == [("Definition: copy.\n\nx", "x"), ("Definition: add.\n\n1+1", "2"),
                     ("Definition: add.\n\n2+2", "4"), ("Definition: add.\n\n3+3", "6")]
    assert all([m["role"] for m in chat] == ["user", "assistant"] for chat in chats)
    path = write_jsonl(chats, tmp_path / "ni.jsonl")
    assert load_conversations(path, 3) == chats[:3]


def test_unknown_offline_training_source_lists_the_known_ones():
    with pytest.raises(ValueError, match="offline:natural-instructions"):
        load_conversations("offline:openhermes")


def test_tokenized_data_round_trips_through_its_cache(tmp_path, tokenizers):
    receiver_tok, sharer_tok = tokenizers
    first = load_tokenized("synthetic:facts", receiver_tok, [sharer_tok, receiver_tok], max_examples=40,
                           cache_folder=tmp_path, progress=False)
    (folder,) = list(tmp_path.iterdir())
    assert (folder / "meta.json").exists() and not (folder / "sharer1_ids.npy").exists()  # shared vocab: no copy
    again = load_tokenized("synthetic:facts", receiver_tok, [sharer_tok, receiver_tok], max_examples=40,
                           cache_folder=tmp_path, progress=False)
    direct = tokenize_chats(load_conversations("synthetic:facts", 40), receiver_tok, [sharer_tok, receiver_tok],
                            progress=False)
    assert len(first) == len(again) == len(direct) == 40
    assert again.fingerprint() == direct.fingerprint()
    for i in (0, 17, 39):
        assert again[i] == direct[i]
        assert again[i].prompt[1].sharer_ids == again[i].prompt_ids  # identity alignment for the shared vocabulary
    assert TokenizedChats.load(folder, mmap=False)[5] == direct[5]
    other = load_tokenized("synthetic:facts", receiver_tok, [sharer_tok], max_examples=40, max_length=30,
                           cache_folder=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2 and len(other) < 40  # another key, another cache entry


def test_first_answer_tokens_keeps_prompts_and_cuts_each_answer(tokenizers):
    receiver_tok, sharer_tok = tokenizers
    full = tokenize_chats(load_conversations("synthetic:facts", 12), receiver_tok, [sharer_tok], progress=False)
    assert min(full.continuation_lengths) > 2  # so a cut to 1 and to 2 tokens changes every example
    for n in (1, 2):
        cut = full.first_answer_tokens(n)
        assert len(cut) == len(full) and cut.meta["answer_tokens"] == n and cut.fingerprint() != full.fingerprint()
        for i in range(len(full)):
            assert cut[i].prompt == full[i].prompt and cut[i].source_index == full[i].source_index
            assert cut[i].continuation_ids == full[i].continuation_ids[:n]
        assert list(cut.lengths) == list(full.prompt_lengths + n)
    whole = full.first_answer_tokens(10_000)
    assert [whole[i] for i in range(len(full))] == [full[i] for i in range(len(full))]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            full.first_answer_tokens(bad)


def test_the_tokenized_cache_key_follows_the_file_content_not_its_name_size_or_time(tmp_path):
    path = tmp_path / "chats.jsonl"
    write_jsonl(CHATS_A := [CHAT[1:3]], path)
    before, stat = source_fingerprint(path), path.stat()
    text = path.read_text()
    path.write_text(text.replace("Paris", "Lyon!"))  # same length, other content, same times
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and source_fingerprint(path) != before
    write_jsonl(CHATS_A, tmp_path / "elsewhere.jsonl")  # the same content under another name and time
    assert source_fingerprint(tmp_path / "elsewhere.jsonl") == before
    assert source_fingerprint("synthetic:facts") == "synthetic:facts"


def test_parallel_tokenization_matches_serial(tokenizers):
    receiver_tok, sharer_tok = tokenizers
    chats = load_conversations("synthetic:facts", 300)
    serial = tokenize_chats(chats, receiver_tok, [sharer_tok], progress=False)
    parallel = tokenize_chats(chats, receiver_tok, [sharer_tok], progress=False, num_proc=2)
    assert serial.fingerprint() == parallel.fingerprint()


def test_batch_order_is_deterministic_per_epoch_and_buckets_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=200)
    indices = np.arange(3, 200)
    a = batch_order(indices, lengths, 8, seed=1, epoch=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in batch_order(indices, lengths, 8, seed=1, epoch=0)]
    b = batch_order(indices, lengths, 8, seed=1, epoch=1)
    assert [x.tolist() for x in a] != [x.tolist() for x in b]
    assert len(a) == len(indices) // 8 and all(len(x) == 8 for x in a)  # drop_last
    assert set(np.concatenate(a)) <= set(indices)
    bucketed = batch_order(indices, lengths, 8, seed=1, epoch=0, length_bucketing=True, bucket_batches=4)
    padding = lambda batches: sum(int(lengths[x].max() * len(x) - lengths[x].sum()) for x in batches)  # noqa: E731
    assert padding(bucketed) < padding(a) / 2
    assert sorted(np.concatenate(bucketed).tolist()) == sorted(np.concatenate(a).tolist())


def test_collate_pads_prompts_left_and_answers_right(tokenizers):
    receiver_tok, sharer_tok = tokenizers
    data = tokenize_chats([CHAT, CHAT[1:3]], receiver_tok, [sharer_tok], progress=False)
    batch = collate_examples([data[0], data[1]], receiver_tok.pad_token_id, [sharer_tok.pad_token_id])
    short, long = sorted([data[0], data[1]], key=lambda e: len(e.prompt_ids))
    assert batch.inputs.input_ids.shape[1] == max(len(data[0].prompt_ids), len(data[1].prompt_ids))
    for b in range(2):
        example = data[b]
        n, r = len(example.prompt_ids), len(example.continuation_ids)
        assert batch.inputs.input_ids[b, -n:].tolist() == example.prompt_ids  # left padding
        assert batch.continuation_ids[b, :r].tolist() == example.continuation_ids  # right padding
        assert batch.labels[b, :r].tolist() == example.continuation_ids
        assert (batch.labels[b, r:] == IGNORE_INDEX).all() and (batch.continuation_mask[b, r:] == 0).all()
    assert batch.num_label_tokens == sum(len(e.continuation_ids) for e in (data[0], data[1]))
    flat = batch.labels.flatten()
    assert torch.equal(flat[batch.label_positions], flat[flat != IGNORE_INDEX])
    assert batch.num_input_tokens == len(data[0]) + len(data[1])
    assert short is not long


def test_synthetic_facts_are_deterministic_and_disjoint():
    facts = synthetic_facts(300)
    assert facts == synthetic_facts(300) and facts[:50] == synthetic_facts(50)
    assert len({f.name for f in facts}) == 300 and len({f.colour for f in facts}) == 8
    other = {f.name for f in synthetic_facts(300, seed=1, syllables=(4,))}
    assert not other & {f.name for f in facts}
    chats = fact_conversations(facts[:8])
    assert chats[3][0]["role"] == "system" and chats[0][-1] == {"role": "assistant", "content": facts[0].colour}
    assert load_conversations("synthetic:facts", 8) == chats
    with pytest.raises(ValueError, match="unknown synthetic dataset"):
        load_conversations("synthetic:nope")
