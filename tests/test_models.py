"""Model loading: the offline tiny pair, local folders, hub ids without a hub, clear errors."""

import hashlib

import pytest
import torch

from c2c.align import shares_vocabulary
import c2c.models
from c2c.models import build_tiny_model, cpu_multiplies_bf16, load_model


def folder_digest(folder):  # hidden files are SHA-256 memos (c2c.fingerprint), not part of the build
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if not p.name.startswith(".")}


def test_tiny_pair_is_deterministic(tmp_path):
    for name in ("tiny-receiver", "tiny-sharer"):
        first = folder_digest(build_tiny_model(name, tmp_path / f"{name}-a"))
        second = folder_digest(build_tiny_model(name, tmp_path / f"{name}-b"))
        assert first == second and "model.safetensors" in first


def test_tiny_pair_has_real_architectures_and_different_tokenizers(tiny_receiver, tiny_sharer):
    (receiver, receiver_tokenizer), (sharer, sharer_tokenizer) = tiny_receiver, tiny_sharer
    assert receiver.config.model_type == "qwen3" and sharer.config.model_type == "llama"
    assert receiver.config.num_hidden_layers != sharer.config.num_hidden_layers
    assert not shares_vocabulary(receiver_tokenizer, sharer_tokenizer)
    text = "What is the capital of France?"
    assert receiver_tokenizer(text)["input_ids"] != sharer_tokenizer(text)["input_ids"]
    assert receiver_tokenizer.decode(receiver_tokenizer(text)["input_ids"]) == text
    chat = [{"role": "user", "content": text}]
    rendered = receiver_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not any(p.requires_grad for p in receiver.parameters()) and not receiver.training
    assert receiver_tokenizer.padding_side == "left"


def test_local_folder_loads(tiny_receiver, tmp_path):
    model, tokenizer = tiny_receiver
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    again, _ = load_model(tmp_path / "copy")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_missing_local_paths_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./missing-model.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_unreachable_hub_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; fails fast, no retries
    with pytest.raises(OSError, match="pass a local model folder or .gguf file"):
        load_model("Qwen/Qwen3-0.6B-not-cached")


def test_cpu_bf16_support_is_read_from_the_cpu_flags(tmp_path):
    def cpuinfo(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return path

    assert cpu_multiplies_bf16(cpuinfo("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")) is True
    assert cpu_multiplies_bf16(cpuinfo("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")) is True
    assert cpu_multiplies_bf16(cpuinfo("flags\t\t: fpu sse avx2 fma\n")) is False
    assert cpu_multiplies_bf16(cpuinfo("processor\t: 0\nFeatures\t: fp asimd bf16\n")) is None  # not x86: cannot tell
    assert cpu_multiplies_bf16(tmp_path / "missing") is None


@pytest.mark.parametrize("native, dtype, warned", [(False, torch.bfloat16, True), (True, torch.bfloat16, False),
                                                   (None, torch.bfloat16, False), (False, torch.float32, False)])
def test_bf16_on_a_cpu_without_bf16_products_warns_once(native, dtype, warned, monkeypatch, caplog):
    monkeypatch.setattr(c2c.models, "cpu_multiplies_bf16", lambda: native)
    monkeypatch.setattr(c2c.models, "_warned_slow_bf16", False)
    with caplog.at_level("WARNING", logger="c2c.models"):
        load_model("tiny-receiver", dtype=dtype)
        load_model("tiny-receiver", dtype=dtype)
    messages = [r.getMessage() for r in caplog.records if "bfloat16 on this CPU" in r.getMessage()]
    assert len(messages) == (1 if warned else 0)
