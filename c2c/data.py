"""Chat data for training fusers: loading, templating, label masking, alignment, splits and batches.

Spec, "Training recipe": system turns are removed; an example is the *instruction* (the receiver's
chat template of every message but the last, `add_generation_prompt=True`, thinking disabled)
followed by the *continuation*: the last assistant turn as the template renders it, with its end
tokens (for ChatML `<|im_end|>\\n`). Only continuation tokens are scored; examples longer than
`max_length` receiver tokens (instruction + continuation) are dropped; a seeded 99/1 split gives
train and eval examples.

Sources (`load_conversations`):
- a hub dataset name (e.g. `teknium/OpenHermes-2.5`), first N records, via `datasets`;
- a local `.jsonl`/`.json`/`.parquet` file of records with either
  `conversations: [{"from": "system"|"human"|"gpt", "value": ...}]` (ShareGPT/OpenHermes) or
  `messages: [{"role", "content"}]`;
- `synthetic:facts`: invented facts made here (`synthetic_facts`), a task a sharer fine-tuned on
  them can solve and a receiver cannot;
- `offline:qa-chats`: open-answer question-answering chats (Jeopardy!, SQuAD, Natural Questions, DROP, CoQA)
  from OLMo's evaluation package (`c2c.qachats`), the offline stand-in for OpenHermes (`qa_chats_file`);
- `offline:natural-instructions`: the 193k instruction/answer pairs of BIG-bench's
  `natural_instructions` task (61 crowd-sourcing tasks) from the `bigbench` 1.0.0 sdist, the earlier stand-in
  (`natural_instructions_file`); that sdist has left PyPI, so it needs a copy placed by hand;
- `offline:mc-mix`: the multiple-choice training mix of `c2c.mcmix.load_mc_mix` (offline benchmark files,
  never an evaluation item), the offline stand-in for MMLU's auxiliary_train (`mc_mix_file`);
- `cais/mmlu:auxiliary_train`: MMLU's auxiliary_train from the hub, or `cais/mmlu:auxiliary_train=PATH` for a
  local copy in the hub schema (`c2c.mcmix.load_mmlu_auxiliary_train`). Both multiple-choice sources are
  rendered by `c2c.mcmix.mc_conversations`: the evaluation prompt, answered "The correct answer is X.".

Examples are tokenized and aligned once (`tokenize_chats`) into flat arrays (`TokenizedChats`)
that can be saved as .npy files, memory-mapped and shared by every process of a multi-GPU run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from c2c.align import AlignedPrompt, TokenAligner
from c2c.fingerprint import file_sha256, tokenizer_fingerprint
from c2c.fused import FusedInputs, SharerInputs, collate
from c2c.mcmix import MC_MIX_VERSION, load_mc_mix, load_mmlu_auxiliary_train, mc_conversations
from c2c.offline import OFFLINE_PREFIX, download_archive
from c2c.paths import cache_dir
from c2c.qachats import QA_CHATS_VERSION, qa_chats

DATA_FORMAT_VERSION = "c2c-chats/2"  # bump when tokenization/templating below changes (invalidates caches)
# 2: token alignment encodes the receiver's whole rendered prompt (c2c.align.TokenAligner.align_chat)
IGNORE_INDEX = -100
ROLE_NAMES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
SYNTHETIC_PREFIX = "synthetic:"
MMLU_AUXILIARY_TRAIN = "cais/mmlu:auxiliary_train"  # "=PATH" after it: a local copy in the hub schema


# ---------------------------------------------------------------------------------------------
# Conversations: loading and normalisation
# ---------------------------------------------------------------------------------------------


def normalize_conversation(record: dict, where: str) -> list[dict]:
    """A record in either schema -> [{"role": "system"|"user"|"assistant", "content": str}, ...].

    `where` names the file/dataset and record for error messages. Missing fields are a ValueError.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'conversations' or 'messages' field, "
                         f"got {type(record).__name__}")
    if "conversations" in record and record["conversations"] is not None:
        turns, role_key, text_key = record["conversations"], "from", "value"
    elif "messages" in record and record["messages"] is not None:
        turns, role_key, text_key = record["messages"], "role", "content"
    else:
        raise ValueError(f"{where}: missing field 'conversations' (ShareGPT: [{{'from', 'value'}}]) or "
                         f"'messages' ([{{'role', 'content'}}]); found fields {sorted(record)}")
    if not isinstance(turns, list):
        raise ValueError(f"{where}: field {'conversations' if role_key == 'from' else 'messages'} must be a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: turn {i} is not an object")
        for key in (role_key, text_key):
            if key not in turn:
                raise ValueError(f"{where}: turn {i} is missing field '{key}'; found fields {sorted(turn)}")
        role = ROLE_NAMES.get(turn[role_key])
        if role is None:
            raise ValueError(f"{where}: turn {i} has unknown role {turn[role_key]!r} in field '{role_key}'; "
                             f"known: {sorted(ROLE_NAMES)}")
        content = turn[text_key]
        messages.append({"role": role, "content": "" if content is None else str(content)})
    return messages


def _read_local_records(path: Path) -> Iterable[tuple[int, dict]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        table = pq.read_table(path)
        offset = 0
        for batch in table.to_batches():
            for j, row in enumerate(batch.to_pylist()):
                yield offset + j, row
            offset += batch.num_rows
        return
    with path.open(encoding="utf-8") as handle:
        first = handle.read(1)
        while first and first.isspace():
            first = handle.read(1)
        handle.seek(0)
        if suffix == ".json" and first == "[":
            for i, row in enumerate(json.load(handle)):
                yield i, row
            return
        for i, line in enumerate(handle):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {i + 1}: not valid JSON ({error})") from None


def _hub_records(name: str, max_examples: int | None, split: str) -> Iterable[tuple[int, dict]]:
    import datasets  # here, not at the top: importing it takes seconds, and only the hub path needs it

    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as error:  # connection errors, offline mode, missing dataset: one clear message
        raise ConnectionError(
            f"could not load dataset {name!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "Without hub access, download it elsewhere and pass a local file instead: `dataset: /path/to/file.jsonl` "
            "(or .parquet) with one conversation per record, as `conversations: [{from, value}]` or "
            "`messages: [{role, content}]`."
        ) from error
    if max_examples is not None and max_examples < len(data):
        data = data.select(range(max_examples))
    yield from enumerate(data)  # sequential reads of the Arrow table (fast, unlike data[i])


def load_conversations(source: str | os.PathLike, max_examples: int | None = None, *,
                       split: str = "train") -> list[list[dict]]:
    """The first `max_examples` conversations of a source (see module doc), as role/content messages."""
    text = str(source)
    if text.startswith(SYNTHETIC_PREFIX):
        return synthetic_conversations(text, max_examples)
    if text == MMLU_AUXILIARY_TRAIN or text.startswith(MMLU_AUXILIARY_TRAIN + "="):
        local = text[len(MMLU_AUXILIARY_TRAIN) + 1:] or None
        return mc_conversations(load_mmlu_auxiliary_train(local, max_items=max_examples))
    if text.startswith(OFFLINE_PREFIX):
        text = str(offline_training_file(text))
    path = Path(text).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {path} does not exist")
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ValueError(f"dataset file {path}: unsupported type; use one of {LOCAL_SUFFIXES}")
        records, where = _read_local_records(path), str(path)
    else:
        records, where = _hub_records(text, max_examples, split), text
    conversations = []
    for i, record in records:
        if max_examples is not None and len(conversations) >= max_examples:
            break
        conversations.append(normalize_conversation(record, f"{where}, record {i}"))
    return conversations


def source_fingerprint(source: str | os.PathLike) -> str:
    """Identifies a data source for caches by its content: a local file, or the file an `offline:` source is
    built into, by its SHA-256 (memoised, `c2c.fingerprint.file_sha256`); a hub dataset or a generated
    (`synthetic:`) source by its name."""
    text = str(source)
    if text.startswith(OFFLINE_PREFIX):
        return f"{text}:sha256:{file_sha256(offline_training_file(text))}"
    path = Path(text).expanduser()
    if path.is_file():
        return f"sha256:{file_sha256(path)}"
    return text


def write_jsonl(conversations: Iterable[list[dict]], path: str | os.PathLike) -> Path:
    """Write conversations as `{"messages": [...]}` lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for messages in conversations:
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Offline training text: BIG-bench's natural_instructions, from the bigbench sdist on PyPI
# ---------------------------------------------------------------------------------------------

# (package, release file, its SHA-256 as PyPI lists it)
BIGBENCH_SDIST = ("bigbench", "bigbench-1.0.0.tar.gz",
                  "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
NATURAL_INSTRUCTIONS_FOLDER = "bigbench/benchmark_tasks/natural_instructions/"


def read_natural_instructions(archive: str | os.PathLike) -> dict[str, tuple[str, list[dict]]]:
    """{subtask name: (its instruction, its examples [{input, target: [answers]}])} from a bigbench sdist."""
    tasks = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            _, _, name = member.name.partition(NATURAL_INSTRUCTIONS_FOLDER)
            if not name.endswith("/task.json") or "/" in name.removesuffix("/task.json"):
                continue  # only <subtask>/task.json (the top-level task.json holds no examples)
            task = json.load(tar.extractfile(member))
            tasks[task["name"]] = (task["task_prefix"].strip(), task["examples"])
    if not tasks:
        raise ValueError(f"{archive} holds no {NATURAL_INSTRUCTIONS_FOLDER}<subtask>/task.json")
    return tasks


def natural_instruction_conversations(tasks: dict[str, tuple[str, list[dict]]]) -> Iterable[list[dict]]:
    """One chat per example: the subtask's instruction and the input as the user turn, the first target as
    the answer. Subtasks are interleaved (round robin in name order), so the first N chats cover them all."""
    queues = [(tasks[name][0], tasks[name][1]) for name in sorted(tasks)]
    for i in range(max(len(examples) for _, examples in queues)):
        for instruction, examples in queues:
            if i < len(examples) and examples[i]["target"]:
                target = examples[i]["target"]
                answer = target[0] if isinstance(target, list) else target
                yield [{"role": "user", "content": f"{instruction}\n\n{examples[i]['input'].strip()}"},
                       {"role": "assistant", "content": str(answer).strip()}]


def natural_instructions_file() -> Path:
    """`cache_dir()/data/natural-instructions-bigbench-1.0.0.jsonl` (messages records), built once:
    the bigbench sdist is fetched from PyPI (SHA-256 checked), its natural_instructions read and converted.

    BIG-bench asks that its data never appear in *pre-training* corpora; here it trains a fuser only, on
    tasks none of our evaluation benchmarks share.
    """
    target = cache_dir() / "data" / "natural-instructions-bigbench-1.0.0.jsonl"
    if not target.is_file():
        archive = download_archive(*BIGBENCH_SDIST)
        tmp = write_jsonl(natural_instruction_conversations(read_natural_instructions(archive)),
                          target.with_name(target.name + ".tmp"))
        tmp.replace(target)
    return target


def mc_mix_file() -> Path:
    """`cache_dir()/data/mc-mix-<MC_MIX_VERSION>.jsonl` (messages records), built once: `c2c.mcmix.load_mc_mix()`
    as training chats (`mc_conversations`), in the mix's interleaved order, so the first N records are its first
    N items."""
    target = cache_dir() / "data" / f"mc-mix-{MC_MIX_VERSION}.jsonl"
    if not target.is_file():
        tmp = write_jsonl(mc_conversations(load_mc_mix()), target.with_name(target.name + ".tmp"))
        tmp.replace(target)
    return target


def qa_chats_file() -> Path:
    """`cache_dir()/data/qa-chats-<QA_CHATS_VERSION>.jsonl` (messages records), built once: `c2c.qachats.qa_chats()`,
    in its interleaved order, so the first N records cover every task."""
    target = cache_dir() / "data" / f"qa-chats-{QA_CHATS_VERSION}.jsonl"
    if not target.is_file():
        tmp = write_jsonl(qa_chats(), target.with_name(target.name + ".tmp"))
        tmp.replace(target)
    return target


OFFLINE_TRAINING_SOURCES = {"qa-chats": qa_chats_file, "natural-instructions": natural_instructions_file,
                            "mc-mix": mc_mix_file}


def offline_training_file(source: str) -> Path:
    """`offline:<name>` as a training data source -> the local JSONL file of that offline source (built on first
    use). The other `offline:` resolvers: `c2c.offline.fetch_model` (models), `offline_benchmark_path` (benchmarks)."""
    name = source[len(OFFLINE_PREFIX):]
    if name not in OFFLINE_TRAINING_SOURCES:
        raise ValueError(f"unknown offline training source {source!r}; known: "
                         f"{[OFFLINE_PREFIX + k for k in OFFLINE_TRAINING_SOURCES]}")
    return OFFLINE_TRAINING_SOURCES[name]()


# ---------------------------------------------------------------------------------------------
# Synthetic facts: a task the sharer can learn and the receiver cannot know
# ---------------------------------------------------------------------------------------------

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
# answers with distinct first tokens in the tiny tokenizers, so the first answer token decides the fact
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "cyan")
QUESTION_TEMPLATES = (
    "What is the favourite colour of {name}?",
    "Which colour does {name} like best?",
    "Tell me the favourite colour of {name}.",
    "{name} has a favourite colour. Which one?",
)
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class Fact:
    name: str
    colour: str
    question: str


def synthetic_facts(num_facts: int = 300, seed: int = 0, syllables: tuple[int, ...] = (2, 3)) -> list[Fact]:
    """Invented people with a favourite colour each, one question per person (deterministic).

    Names have `syllables` syllables (tables with disjoint syllable counts share no name). The first k
    facts of a larger table are the same as those of a table of k facts.
    """
    rng = random.Random(seed)
    names, facts = set(), []
    while len(facts) < num_facts:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice(syllables))).capitalize()
        colour, template = rng.choice(COLOURS), rng.choice(QUESTION_TEMPLATES)
        if name in names:
            continue
        names.add(name)
        facts.append(Fact(name, colour, template.format(name=name)))
    return facts


def fact_conversations(facts: Sequence[Fact]) -> list[list[dict]]:
    """One chat per fact: (a system turn on every 4th), the question, the colour as the answer."""
    chats = []
    for i, fact in enumerate(facts):
        chat = [{"role": "system", "content": SYSTEM_PROMPT}] if i % 4 == 3 else []
        chat += [{"role": "user", "content": fact.question}, {"role": "assistant", "content": fact.colour}]
        chats.append(chat)
    return chats


SYNTHETIC_SOURCES = {
    # the facts of the knowledge-transfer task
    "facts": lambda n: fact_conversations(synthetic_facts(300 if n is None else n)),
    # the same task about other people (4-syllable names: none in common with "facts"): teaches a
    # model the question/answer format without any of the facts of "facts"
    "facts-other": lambda n: fact_conversations(synthetic_facts(300 if n is None else n, seed=1, syllables=(4,))),
}


def synthetic_conversations(source: str, max_examples: int | None = None) -> list[list[dict]]:
    """`synthetic:facts` / `synthetic:facts-other` -> conversations (`max_examples` of them, default 300)."""
    kind = source[len(SYNTHETIC_PREFIX):]
    if kind not in SYNTHETIC_SOURCES:
        raise ValueError(f"unknown synthetic dataset {source!r}; known: "
                         f"{[SYNTHETIC_PREFIX + k for k in SYNTHETIC_SOURCES]}")
    return SYNTHETIC_SOURCES[kind](max_examples)


# ---------------------------------------------------------------------------------------------
# One example: instruction + continuation
# ---------------------------------------------------------------------------------------------


def remove_system_turns(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["role"] != "system"]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=False)


_SENTINEL = "C2CSENTINEL7F3A"  # stands in for the last message to find where the template puts it


def continuation_text(tokenizer, messages: list[dict]) -> str:
    """The last assistant turn as the template renders it, with everything the template adds after it
    (its end tokens): for ChatML `content + "<|im_end|>\\n"`, for Llama 3 `content + "<|eot_id|>"`.

    Found by rendering the chat twice, once with the last content replaced by a sentinel: the text around
    the sentinel is template, what the real render has in its place is the content as rendered (templates
    may trim it). The text the template puts *before* the content (e.g. Qwen3's empty think block)
    belongs to the instruction, which is rendered with `add_generation_prompt=True`, thinking disabled.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    marked = _render(tokenizer, messages[:-1] + [{**messages[-1], "content": _SENTINEL}], add_generation_prompt=False)
    if marked.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not render the last assistant message once")
    before, after = marked.split(_SENTINEL)
    if not (full.startswith(before) and full.endswith(after)) or len(full) < len(before) + len(after):
        raise ValueError("the chat template renders the last assistant message differently from a plain text")
    content = full[len(before):len(full) - len(after)]
    if not content.strip():
        raise ValueError("the last assistant message renders empty")
    return content + after


@dataclass
class ChatExample:
    """One pre-tokenized training example."""

    prompt: list[AlignedPrompt]  # the instruction, aligned for each sharer (same receiver_ids in each)
    continuation_ids: list[int]  # receiver tokens of the last assistant turn + end tokens: the scored tokens
    source_index: int = -1  # index of the conversation in the loaded source

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompt[0].receiver_ids

    @property
    def input_ids(self) -> list[int]:
        """The whole receiver sequence: instruction then continuation."""
        return self.prompt_ids + self.continuation_ids

    @property
    def labels(self) -> list[int]:
        """Labels for `input_ids` in the transformers convention (-100 = not scored, no shift)."""
        return [IGNORE_INDEX] * len(self.prompt_ids) + self.continuation_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.continuation_ids)


DROP_REASONS = {
    "too_long": "over max_length receiver tokens",
    "no_assistant_answer": "last turn (after removing system turns) is not from the assistant",
    "no_instruction": "no turn before the last assistant turn",
    "empty_message": "a message is empty",
    "template": "a message is not found verbatim in a rendered chat template",
    "no_answer_prefix": "the last assistant turn does not start with the answer prefix",
}


def build_example(messages: list[dict], receiver_tokenizer, aligners: Sequence[TokenAligner],
                  max_length: int | None = None, answer_prefix: str | None = None) -> tuple[ChatExample | None, str | None]:
    """(example, None), or (None, reason) with a key of `DROP_REASONS` for conversations that are dropped.

    answer_prefix: the last assistant turn starts with this text (e.g. "The correct answer is"), which then
    belongs to the prompt, after the generation prompt, as message text (fused like the evaluation's
    letter-scoring prompt, `c2c.methods`); the continuation is the rest of the turn and its end tokens.
    """
    messages = remove_system_turns(messages)
    if not messages or messages[-1]["role"] != "assistant":
        return None, "no_assistant_answer"
    if len(messages) < 2:
        return None, "no_instruction"
    if any(not m["content"] or not m["content"].strip() for m in messages):
        return None, "empty_message"
    try:
        prompt = [a.align_chat(messages[:-1], add_generation_prompt=True, enable_thinking=False) for a in aligners]
        continuation = continuation_text(receiver_tokenizer, messages)
    except ValueError:
        return None, "template"
    if answer_prefix:
        if not continuation.startswith(answer_prefix) or not continuation[len(answer_prefix):].strip():
            return None, "no_answer_prefix"
        prompt = [p.extended(a.align_text(answer_prefix)) for p, a in zip(prompt, aligners)]
        continuation = continuation[len(answer_prefix):]
    continuation_ids = receiver_tokenizer.encode(continuation, add_special_tokens=False)
    example = ChatExample(prompt, continuation_ids)
    if max_length is not None and len(example) > max_length:
        return None, "too_long"
    return example, None


# ---------------------------------------------------------------------------------------------
# Tokenized datasets: flat arrays
# ---------------------------------------------------------------------------------------------


class TokenizedChats:
    """Pre-tokenized, aligned examples stored as flat arrays (+ offsets); `dataset[i]` is a `ChatExample`.

    Arrays: `prompt_ids`/`prompt_offsets`, `continuation_ids`/`continuation_offsets`, `source_index`, and
    per sharer j: `sharer{j}_ids`/`sharer{j}_offsets` and `sharer{j}_index`/`sharer{j}_fuse` (indexed like
    the prompt). Sharers that share the receiver's vocabulary store nothing (identity alignment).
    `meta`: `num_sharers`, `identity` (per sharer), `stats` (kept/dropped counts), provenance.
    """

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict):
        self.arrays = arrays
        self.meta = meta

    def __len__(self) -> int:
        return len(self.arrays["prompt_offsets"]) - 1

    def _slice(self, name: str, offsets: str, i: int) -> list:
        o = self.arrays[offsets]
        return self.arrays[name][o[i]:o[i + 1]].tolist()

    def __getitem__(self, i: int) -> ChatExample:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        receiver_ids = self._slice("prompt_ids", "prompt_offsets", i)
        prompt = []
        for j, identity in enumerate(self.meta["identity"]):
            if identity:
                n = len(receiver_ids)
                prompt.append(AlignedPrompt(receiver_ids, list(receiver_ids), list(range(n)), [True] * n))
            else:
                prompt.append(AlignedPrompt(receiver_ids, self._slice(f"sharer{j}_ids", f"sharer{j}_offsets", i),
                                            self._slice(f"sharer{j}_index", "prompt_offsets", i),
                                            [bool(b) for b in self._slice(f"sharer{j}_fuse", "prompt_offsets", i)]))
        return ChatExample(prompt, self._slice("continuation_ids", "continuation_offsets", i),
                           int(self.arrays["source_index"][i]))

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.diff(self.arrays["prompt_offsets"])

    @property
    def continuation_lengths(self) -> np.ndarray:
        return np.diff(self.arrays["continuation_offsets"])

    @property
    def lengths(self) -> np.ndarray:
        """Receiver tokens per example (instruction + continuation)."""
        return self.prompt_lengths + self.continuation_lengths

    @property
    def stats(self) -> dict:
        return self.meta["stats"]

    def first_answer_tokens(self, n: int) -> "TokenizedChats":
        """The same examples scoring only the first `n` tokens of each continuation (with an answer prefix such as
        "The correct answer is", n = 1 scores the answer letter alone: the letter loss)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"the number of scored answer tokens must be a positive int, got {n!r}")
        offsets = self.arrays["continuation_offsets"]
        kept = np.minimum(np.diff(offsets), n)  # (E,)
        ids = [self.arrays["continuation_ids"][o:o + k] for o, k in zip(offsets[:-1], kept)]
        arrays = {**self.arrays, "continuation_ids": np.concatenate(ids).astype(np.int32, copy=False),
                  "continuation_offsets": np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)}
        return TokenizedChats(arrays, {**self.meta, "answer_tokens": n})

    def fingerprint(self) -> str:
        """A short hash of the token content (detects a changed dataset on resume); computed once."""
        if "_fingerprint" not in self.__dict__:
            digest = hashlib.sha256()
            for name in sorted(self.arrays):
                digest.update(name.encode())
                digest.update(memoryview(np.ascontiguousarray(self.arrays[name])).cast("B"))
            self.__dict__["_fingerprint"] = digest.hexdigest()[:16]
        return self.__dict__["_fingerprint"]

    @classmethod
    def from_records(cls, records: Sequence[tuple], identity: Sequence[bool], meta: dict) -> "TokenizedChats":
        """From `_compact` records: (source index, prompt ids, continuation ids, per-sharer arrays or None)."""

        def flat(arrays, dtype):
            offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(a) for a in arrays])
            values = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
            return values, offsets

        arrays = {}
        arrays["prompt_ids"], arrays["prompt_offsets"] = flat([r[1] for r in records], np.int32)
        arrays["continuation_ids"], arrays["continuation_offsets"] = flat([r[2] for r in records], np.int32)
        arrays["source_index"] = np.array([r[0] for r in records], dtype=np.int64)
        for j, same in enumerate(identity):
            if same:
                continue
            arrays[f"sharer{j}_ids"], arrays[f"sharer{j}_offsets"] = flat([r[3][j][0] for r in records], np.int32)
            arrays[f"sharer{j}_index"], _ = flat([r[3][j][1] for r in records], np.int32)
            arrays[f"sharer{j}_fuse"], _ = flat([r[3][j][2] for r in records], np.bool_)
        return cls(arrays, {**meta, "num_sharers": len(identity), "identity": list(identity)})

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in self.arrays.items():
            np.save(folder / f"{name}.npy", array)
        (folder / "meta.json").write_text(json.dumps(self.meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = True) -> "TokenizedChats":
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {p.stem: np.load(p, mmap_mode="r" if mmap else None) for p in sorted(folder.glob("*.npy"))}
        return cls(arrays, meta)


_WORKER: dict = {}


def _init_worker(receiver_tokenizer, sharer_tokenizers, alignment, max_length, answer_prefix):
    aligners = [TokenAligner(receiver_tokenizer, t, strategy=alignment) for t in sharer_tokenizers]
    _WORKER["args"] = (receiver_tokenizer, aligners, [a.shared_vocabulary for a in aligners], max_length,
                       answer_prefix)


def _compact(example: ChatExample, identity: Sequence[bool]) -> tuple:
    """An example as small int32 arrays (nothing stored for identity-aligned sharers): a few bytes per token."""
    sharers = [None if same else (np.asarray(p.sharer_ids, np.int32), np.asarray(p.sharer_index, np.int32),
                                  np.asarray(p.fuse_mask, np.bool_))
               for p, same in zip(example.prompt, identity)]
    return (example.source_index, np.asarray(example.prompt_ids, np.int32),
            np.asarray(example.continuation_ids, np.int32), sharers)


def _build_chunk(chunk: list[tuple[int, list[dict]]]) -> list[tuple[tuple | None, str | None]]:
    receiver_tokenizer, aligners, identity, max_length, answer_prefix = _WORKER["args"]
    results = []
    for index, messages in chunk:
        example, reason = build_example(messages, receiver_tokenizer, aligners, max_length, answer_prefix)
        if example is not None:
            example.source_index = index
            results.append((_compact(example, identity), None))
        else:
            results.append((None, reason))
    return results


def tokenize_chats(conversations: Sequence[list[dict]], receiver_tokenizer, sharer_tokenizers: Sequence,
                   *, alignment: str = "longest", max_length: int | None = 2048, progress: bool = True,
                   num_proc: int = 1, meta: dict | None = None, answer_prefix: str | None = None) -> TokenizedChats:
    """Template, tokenize and align every conversation once; drop (and count) the unusable ones.

    num_proc > 1 spreads the work over that many (spawned) processes; the result is the same.
    answer_prefix: see `build_example`.
    """
    chunk_size = 256
    chunks = [[(i, conversations[i]) for i in range(s, min(s + chunk_size, len(conversations)))]
              for s in range(0, len(conversations), chunk_size)]
    args = (receiver_tokenizer, list(sharer_tokenizers), alignment, max_length, answer_prefix)
    bar = tqdm(total=len(conversations), desc="tokenizing chats", unit="chat", disable=not progress)
    records, dropped = [], Counter()

    def consume(results):
        for record, reason in results:
            if record is None:
                dropped[reason] += 1
            else:
                records.append(record)
        bar.update(len(results))

    if num_proc > 1 and len(chunks) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker, initargs=args) as pool:
            for results in pool.map(_build_chunk, chunks):
                consume(results)
    else:
        _init_worker(*args)
        for chunk in chunks:
            consume(_build_chunk(chunk))
    bar.close()
    identity = [TokenAligner(receiver_tokenizer, t).shared_vocabulary for t in sharer_tokenizers]
    stats = {"conversations": len(conversations), "examples": len(records),
             "dropped": {reason: dropped.get(reason, 0) for reason in DROP_REASONS}}
    return TokenizedChats.from_records(records, identity, {**(meta or {}), "max_length": max_length,
                                                           "alignment": alignment, "answer_prefix": answer_prefix,
                                                           "stats": stats})


def load_tokenized(source: str | os.PathLike, receiver_tokenizer, sharer_tokenizers: Sequence, *,
                   max_examples: int | None = None, alignment: str = "longest", max_length: int | None = 2048,
                   cache_folder: str | os.PathLike | None = None, progress: bool = True,
                   num_proc: int = 1, answer_prefix: str | None = None) -> TokenizedChats:
    """Load a source and tokenize it, through an on-disk cache when `cache_folder` is given.

    The cache key covers the source (a local file's path, size and mtime), max_examples, max_length,
    alignment, answer_prefix, both tokenizers and templates, and `DATA_FORMAT_VERSION`.
    """
    key_fields = {
        "format": DATA_FORMAT_VERSION, "source": source_fingerprint(source), "max_examples": max_examples,
        "max_length": max_length, "alignment": alignment, "answer_prefix": answer_prefix,
        "receiver_tokenizer": tokenizer_fingerprint(receiver_tokenizer),
        "sharer_tokenizers": [tokenizer_fingerprint(t) for t in sharer_tokenizers],
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache_folder) / key if cache_folder is not None else None
    if folder is not None and (folder / "meta.json").exists():
        return TokenizedChats.load(folder)
    conversations = load_conversations(source, max_examples)
    data = tokenize_chats(conversations, receiver_tokenizer, sharer_tokenizers, alignment=alignment,
                          max_length=max_length, progress=progress, num_proc=num_proc,
                          meta={"source": str(source), "key": key_fields}, answer_prefix=answer_prefix)
    if folder is None:
        return data
    tmp = folder.with_name(f"{key}.tmp{os.getpid()}")
    data.save(tmp)
    if folder.exists():  # another process finished first; its content is identical
        shutil.rmtree(tmp)
    else:
        tmp.replace(folder)
    return TokenizedChats.load(folder)


# ---------------------------------------------------------------------------------------------
# Split and batches
# ---------------------------------------------------------------------------------------------


def split_indices(n: int, eval_fraction: float = 0.01, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/eval split of n examples: (train indices, eval indices), each sorted.

    eval gets round(n * eval_fraction) examples (at least 1 when eval_fraction > 0 and n > 1), chosen by a
    permutation seeded with `seed` (numpy PCG64, stable across numpy versions).
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n > 1:
        n_eval = max(n_eval, 1)
    permutation = np.random.default_rng(seed).permutation(n)
    return np.sort(permutation[n_eval:]), np.sort(permutation[:n_eval])


def batch_order(indices: np.ndarray, lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                shuffle: bool = True, length_bucketing: bool = False, bucket_batches: int = 64,
                drop_last: bool = True) -> list[np.ndarray]:
    """The batches of one epoch (arrays of example indices), deterministic in (seed, epoch).

    length_bucketing: shuffle, then sort each window of `bucket_batches` batches by length, cut it into
    batches and shuffle the batch order: little padding, still random. `lengths` is indexed by example.
    """
    indices = np.asarray(indices)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(indices) if shuffle else indices.copy()
    if length_bucketing:
        window = batch_size * bucket_batches
        parts = []
        for start in range(0, len(order), window):
            part = order[start:start + window]
            parts.append(part[np.argsort(-lengths[part], kind="stable")])
        order = np.concatenate(parts) if parts else order
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    batches = [order[s:s + batch_size] for s in range(0, stop, batch_size)]
    if length_bucketing and shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


@dataclass
class TrainBatch:
    """A collated batch: the fused model's inputs and the right-padded continuation to score."""

    inputs: FusedInputs
    continuation_ids: torch.Tensor  # (B, R) right-padded with the receiver's pad id
    continuation_mask: torch.Tensor  # (B, R)
    labels: torch.Tensor  # (B, R) continuation ids, -100 on padding
    label_positions: torch.Tensor  # (M,) flat indices into (B, R) of the scored tokens (no host sync on device)
    num_label_tokens: int
    num_input_tokens: int  # receiver tokens without padding (instruction + continuation)

    def to(self, device: torch.device) -> "TrainBatch":
        """The batch on `device`, moved without a host synchronisation (pinned memory + non_blocking on CUDA)."""
        cuda = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)

        inputs = self.inputs
        sharers = [SharerInputs(**{f.name: move(getattr(s, f.name)) for f in fields(s)}) for s in inputs.sharers]
        return TrainBatch(FusedInputs(move(inputs.input_ids), move(inputs.attention_mask), sharers),
                          move(self.continuation_ids), move(self.continuation_mask), move(self.labels),
                          move(self.label_positions), self.num_label_tokens, self.num_input_tokens)


def collate_examples(examples: Sequence[ChatExample], receiver_pad_id: int,
                     sharer_pad_ids: Sequence[int]) -> TrainBatch:
    """Left-pad the instructions (aligned, via `c2c.fused.collate`), right-pad the continuations."""
    inputs = collate([e.prompt for e in examples], receiver_pad_id, sharer_pad_ids)
    width = max(len(e.continuation_ids) for e in examples)
    ids = torch.full((len(examples), width), receiver_pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, :len(e.continuation_ids)] = torch.tensor(e.continuation_ids, dtype=torch.long)
        mask[b, :len(e.continuation_ids)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    positions = mask.flatten().nonzero().squeeze(1)
    return TrainBatch(inputs, ids, mask, labels, positions, int(mask.sum()), int(sum(len(e) for e in examples)))
