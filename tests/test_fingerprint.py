"""Content fingerprints: files (memoised by size + mtime), models, fusers, code, manifests, finite checks."""

import hashlib
import importlib
import os
import shutil
import sys

import pytest
import torch

from c2c import fingerprint as fp
from c2c.checkpoint import load_fuser
from c2c.fingerprint import (
    check_finite,
    code_version,
    file_sha256,
    fuser_fingerprint,
    model_fingerprint,
    paths_sha256,
    verify_manifest,
    write_manifest,
)
from c2c.models import load_model
from conftest import make_fuser


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("C2C_CACHE", str(tmp_path / "cache"))


def _no_hashing(monkeypatch):
    def refuse(*args):
        raise AssertionError("hashed again instead of using the memo")

    monkeypatch.setattr(fp, "sha256_of_file", refuse)
    monkeypatch.setattr(fp, "tensors_sha256", refuse)


def test_file_sha256_is_memoised_beside_the_file_and_redone_when_it_changes(tmp_path, monkeypatch, own_cache):
    path = tmp_path / "data.bin"
    path.write_bytes(b"abc" * 1000)
    written = path.stat().st_mtime_ns
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert (tmp_path / ".data.bin.c2c-sha256").is_file()
    path.write_bytes(b"abz" * 1000)  # rewritten within the same clock tick: same size, same mtime
    os.utime(path, ns=(written, written))
    assert file_sha256(path) == hashlib.sha256(b"abz" * 1000).hexdigest()  # a memo that young is not trusted
    old = written - 10 * 10**9
    os.utime(path, ns=(old, old))  # a file last written 10 s ago
    assert file_sha256(path) == hashlib.sha256(b"abz" * 1000).hexdigest()
    with monkeypatch.context() as m:
        _no_hashing(m)
        assert file_sha256(path) == hashlib.sha256(b"abz" * 1000).hexdigest()  # from the sidecar
    path.write_bytes(b"abd" * 1000)  # same size, other bytes, later mtime
    os.utime(path, ns=(old + 1_000_000, old + 1_000_000))
    assert file_sha256(path) == hashlib.sha256(b"abd" * 1000).hexdigest()


def test_file_sha256_keeps_its_memo_in_the_cache_folder_when_the_folder_is_read_only(tmp_path, monkeypatch,
                                                                                    own_cache):
    path = tmp_path / "data.bin"
    path.write_bytes(b"xyz")
    os.utime(path, ns=(path.stat().st_mtime_ns - 10 * 10**9,) * 2)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(fp, "_sidecar", lambda p: blocker / "sidecar")  # writing there fails (OSError)
    assert file_sha256(path) == hashlib.sha256(b"xyz").hexdigest()
    assert list((tmp_path / "cache" / "sha256").glob("*.json"))
    _no_hashing(monkeypatch)
    assert file_sha256(path) == hashlib.sha256(b"xyz").hexdigest()


def test_paths_sha256_covers_names_and_contents_and_skips_hidden_files(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.json").write_text("1")
    first = paths_sha256([folder])
    (folder / ".lock").write_text("123")  # hidden: locks and sidecars do not count
    assert paths_sha256([folder]) == first
    (folder / "a.json").write_text("2")
    assert paths_sha256([folder]) != first
    with pytest.raises(FileNotFoundError, match="no such file"):
        paths_sha256([tmp_path / "missing"])


def test_manifest_names_missing_and_changed_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    manifest = write_manifest(tmp_path)
    assert set(manifest) == {"config.json", "model.safetensors"} and verify_manifest(tmp_path, manifest) == []
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 32)
    (tmp_path / "config.json").unlink()
    problems = verify_manifest(tmp_path, manifest)
    assert any("config.json is missing" in p for p in problems)
    assert any("model.safetensors has changed" in p for p in problems)


def test_model_fingerprint_covers_weights_dtype_and_config_and_is_cheap_the_second_time(tiny_receiver, tmp_path,
                                                                                    monkeypatch):
    model, _ = tiny_receiver
    first = model_fingerprint(model)
    again, _ = load_model("tiny-receiver")
    assert model_fingerprint(again) == first  # same files, same dtype: hashed from the files' memo
    with monkeypatch.context() as m:
        _no_hashing(m)
        assert model_fingerprint(model) == first  # memoised per object
    assert model_fingerprint(load_model("tiny-receiver", dtype=torch.bfloat16)[0]) != first
    assert model_fingerprint(load_model("tiny-receiver")[0].to(torch.bfloat16)) != first  # cast after loading

    copy = tmp_path / "copy"
    shutil.copytree(model.name_or_path, copy)
    assert model_fingerprint(load_model(copy)[0]) == first  # content, not path
    config = (copy / "config.json").read_text()
    assert '"rms_norm_eps": 1e-06' in config
    (copy / "config.json").write_text(config.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert model_fingerprint(load_model(copy)[0]) != first

    with torch.no_grad():
        again.model.norm.weight.mul_(2)  # changed in place after loading: hashed from memory
    changed = model_fingerprint(again)
    assert changed != first and changed == model_fingerprint(again)
    with torch.no_grad():
        again.model.norm.weight.div_(2)
    assert model_fingerprint(again) not in (first, changed)  # memory hash of the original weights


def test_a_model_with_other_weight_files_has_another_fingerprint(tiny_sharer, tmp_path):
    model, tokenizer = tiny_sharer
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"][0, 0] += 1
    other, _ = load_model("tiny-sharer")
    other.load_state_dict(state)
    other.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert model_fingerprint(load_model(tmp_path)[0]) != model_fingerprint(model)


def test_fuser_fingerprint_follows_weights_and_config(tiny_receiver, tiny_sharer, tmp_path):
    receiver, sharer = tiny_receiver[0], tiny_sharer[0]
    fuser = make_fuser(receiver, sharer, seed=0)
    first = fuser_fingerprint(fuser)
    assert fuser_fingerprint(make_fuser(receiver, sharer, seed=0)) == first
    assert fuser_fingerprint(make_fuser(receiver, sharer, seed=1)) != first
    assert fuser_fingerprint(make_fuser(receiver, sharer, seed=0, dropout=0.2)) != first  # config only
    fuser.save_pretrained(tmp_path)
    assert fuser_fingerprint(load_fuser(tmp_path)) == first
    with torch.no_grad():
        fuser.gate_logit.add_(1.0)  # e.g. an optimizer step
    assert fuser_fingerprint(fuser) != first


def test_code_version_follows_code_not_comments(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    source = tmp_path / "fp_probe_module.py"

    def version(text):
        source.write_text(text)
        sys.modules.pop("fp_probe_module", None)
        importlib.invalidate_caches()
        return code_version("fp_probe_module")

    base = version('"""Doc."""\n\ndef f(x):\n    return x + 1\n')
    assert version('"""Other doc."""\n# a comment\n\ndef f(x):\n    """f."""\n    return x + 1\n') == base
    assert version('"""Doc."""\n\ndef f(x):\n    return x + 2\n') != base
    assert code_version("c2c.methods", "c2c.benchmarks") == code_version("c2c.benchmarks", "c2c.methods")
    assert code_version("c2c.methods") != code_version("c2c.benchmarks")


def test_check_finite_names_the_tensor():
    ok = torch.ones(3)
    assert check_finite(ok, "x") is ok
    with pytest.raises(FloatingPointError, match=r"fused cache of layer 2 holds 2 NaN/inf value\(s\) of 4; retry"):
        check_finite(torch.tensor([1.0, float("nan"), float("inf"), 0.0]), "fused cache of layer 2", "retry")
