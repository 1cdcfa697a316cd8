"""The code paths only a CUDA device takes: bf16 numerics, the static cache, compiled decoding, no host
synchronisation in the fused prefill. Marked `cuda`: skipped (with the reason) without a CUDA device;
`make gpu-check` runs them (`pytest -m cuda`) on a machine lent a GPU.

Each check is a function of the device, so the same code runs on the CPU where it can (e.g. the static
cache) while the tests themselves run on CUDA only.
"""

import copy
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

from c2c.fused import C2CModel
from c2c.methods import C2C
from c2c.models import load_model
from conftest import make_fuser
from test_latent import bf16_training
from test_longbench import closed_gates_reproduce_the_receiver

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA device: run `make gpu-check` on a GPU machine")]

C2C_SOURCE = Path(__file__).resolve().parents[1] / "c2c"
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "How many legs does a spider have? Le café est très bon. 中文"}],
    [{"role": "user", "content": "Hi"}],
]
GREEDY = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
# bf16 against fp32 logits, in units of the fp32 logits' standard deviation: the tiny pair's bf16 error
# measured on the CPU (bf16 weights and activations, fp32 accumulation) is 0.013 (mean) and 0.09 (max)
BF16_MEAN_TOLERANCE = 0.03
BF16_MAX_TOLERANCE = 0.2


def fused_pair(device, shared_vocabulary: bool, dtype=torch.float32) -> C2CModel:
    """The tiny pair (or the receiver as its own sharer) on `device`, fused through open gates."""
    receiver, receiver_tokenizer = load_model("tiny-receiver", dtype=dtype, device=device)
    sharer, sharer_tokenizer = load_model("tiny-receiver" if shared_vocabulary else "tiny-sharer", dtype=dtype,
                                          device=device)
    fuser = make_fuser(receiver, sharer, seed=1, gate_logit=1.0).to(device=device, dtype=dtype)
    return C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [fuser])


def bf16_error(device, shared_vocabulary: bool) -> tuple[float, float]:
    """(mean, max) |bf16 - fp32| of the fused logits over the prompt's last token and a continuation,
    in units of the fp32 logits' standard deviation."""
    model = fused_pair(device, shared_vocabulary)
    inputs = model.prepare(PROMPTS).to(device)
    continuation = inputs.input_ids[:, -5:]
    with torch.no_grad():
        reference = model(inputs, continuation).float()  # (B, 6, V)
        low = copy.deepcopy(model).to(torch.bfloat16)
        assert next(low.receiver.parameters()).dtype == next(low.fusers.parameters()).dtype == torch.bfloat16
        logits = low(inputs, continuation).float()
    error, scale = (logits - reference).abs(), reference.std()
    return float(error.mean() / scale), float(error.max() / scale)


def decoded(model: C2CModel, inputs, **options):
    out = model.generate(inputs, **GREEDY, **options)
    return out.sequences, torch.stack(out.logits)  # (B, N + 12), (12, B, V)


def assert_same_tokens(expected, got, what: str) -> None:
    (tokens, logits), (other_tokens, other_logits) = expected, got
    assert tokens.shape == other_tokens.shape, f"{what}: {tuple(other_tokens.shape)} tokens, not {tuple(tokens.shape)}"
    if not torch.equal(tokens, other_tokens):
        step = int((tokens != other_tokens).any(0).nonzero()[0]) - (tokens.shape[1] - logits.shape[0])
        top2 = logits[step].topk(2, dim=-1).values
        raise AssertionError(f"{what}: greedy tokens differ from decoding step {step} on (top-2 logit gaps there: "
                             f"{(top2[:, 0] - top2[:, 1]).tolist()})")
    torch.testing.assert_close(other_logits, logits, rtol=0, atol=1e-3)


@pytest.mark.parametrize("shared_vocabulary", [False, True], ids=["different-tokenizers", "shared-vocabulary"])
def test_bf16_logits_are_fp32_within_the_stated_tolerance(shared_vocabulary):
    mean, worst = bf16_error("cuda", shared_vocabulary)
    assert 0 < mean <= BF16_MEAN_TOLERANCE and worst <= BF16_MAX_TOLERANCE, (mean, worst)


def test_static_cache_gives_the_dynamic_greedy_tokens():
    model = fused_pair("cuda", shared_vocabulary=False)
    inputs = model.prepare(PROMPTS).to("cuda")
    assert inputs.attention_mask.eq(0).any()  # padded rows
    dynamic = decoded(model, inputs, static_cache=False)
    assert_same_tokens(dynamic, decoded(model, inputs, static_cache=True, disable_compile=True), "static cache")
    assert_same_tokens(dynamic, decoded(model, inputs), "the default on CUDA (static cache, compiled)")


def test_methods_decode_the_same_answers_on_the_cuda_default_path(tmp_path):
    """Generate scoring exactly as an evaluation runs on CUDA (static cache sized from the generation
    config, compiled) against the dynamic cache."""
    from c2c.benchmarks import load_benchmark, write_tiny_fixtures

    items = list(load_benchmark("arc-challenge", write_tiny_fixtures(tmp_path)["arc-challenge"]))[:8]  # 2 batches
    model = fused_pair("cuda", shared_vocabulary=False)
    default = C2C(model, max_new_tokens=8).answer(items, batch_size=4)
    dynamic = C2C(model, max_new_tokens=8, static_cache=False).answer(items, batch_size=4)
    assert [(a.letter, a.text) for a in default] == [(a.letter, a.text) for a in dynamic]


def test_compiled_decoding_gives_the_eager_tokens():
    model = fused_pair("cuda", shared_vocabulary=True)
    inputs = model.prepare(PROMPTS).to("cuda")
    eager = decoded(model, inputs, static_cache=True, disable_compile=True)
    with mock.patch.object(model.receiver, "get_compiled_call", wraps=model.receiver.get_compiled_call) as compiled:
        result = decoded(model, inputs, static_cache=True)
    assert compiled.called  # transformers really decoded with the compiled forward
    assert_same_tokens(eager, result, "compiled decoding")


def host_syncs(fn) -> list[warnings.WarningMessage]:
    """The host synchronisations `fn()` causes on CUDA, as warnings (with the file that asked for each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [w for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("shared_vocabulary", [False, True], ids=["different-tokenizers", "shared-vocabulary"])
def test_no_host_sync_in_the_fused_prefill(shared_vocabulary):
    """The fused prefill (sharer caches, alignment gather, every fuser, the cache write-back) never waits
    for the GPU from our code. transformers' own attention-mask code may (it checks for padding)."""
    model = fused_pair("cuda", shared_vocabulary)
    inputs = model.prepare(PROMPTS).to("cuda")
    model.prefill(inputs)  # warm-up: lazy initialisation is not the prefill's
    assert host_syncs(lambda: torch.ones(1, device="cuda").item())  # the detector sees a sync
    ours = [f"{w.filename}:{w.lineno}" for w in host_syncs(lambda: model.prefill(inputs))
            if Path(w.filename).resolve().is_relative_to(C2C_SOURCE)]
    assert not ours, f"host synchronisations in c2c code: {ours}"


def test_longbench_and_the_latent_system_on_cuda(tmp_path):
    """LongBench's replies with the static cache (closed gates: the receiver's, token for token) and the latent
    system's joint training in bf16, on CUDA."""
    pair = [load_model(name, device="cuda") for name in ("tiny-receiver", "tiny-sharer")]
    closed_gates_reproduce_the_receiver(*pair, static_cache=True)
    bf16_training(tmp_path / "latent")
