"""Prefix caches on disk: the keys and values a frozen model computes for a token sequence, kept for reuse.

Receiver and sharers are frozen, so the KV-cache of a prompt depends on the prompt alone. A fuser reads
the same prompts every epoch, and every fuser trained or evaluated on the same data (controls, ablations,
variants, more epochs) reads the same caches. Computed once and kept on disk, a training step then costs
only the fuser and the receiver's pass over the answer tokens, and an evaluation of a new fuser only the
fusion and the scored token.

One store holds one model's caches. Its folder is named by the model's fingerprint (config, weights,
dtype: `c2c.fingerprint.model_fingerprint`) and the torch / transformers versions and device type that
computed them, so a changed model or library never reads stale entries::

    <root>/<store key>/meta.json                  what computed the caches (model, dtype, shapes, versions)
    <root>/<store key>/index.jsonl                one line per stored sequence: {"key", "shard", "length"}
    <root>/<store key>/shard-<pid>-<n>.safetensors one tensor per sequence, (2L, H, N, D): K, V of every layer

A sequence's key is the SHA-256 of its token ids. Shards are written whole (temporary file, then
rename) before their index lines are appended, so a crash loses at most the batch in flight and a torn
last index line is dropped on the next open: filling resumes where it stopped.

`store.attach(model)` makes `c2c.fused.kv_cache` read that model's caches from the store (computing and
storing the rows it lacks), so training and evaluation run the same code with or without a store: the
exactness tests compare the two.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import DynamicCache

from c2c.fingerprint import model_fingerprint
from c2c.fused import PREFIX_STORE_ATTRIBUTE, decoder_cache, left_pad
from c2c.paths import cache_dir

log = logging.getLogger(__name__)

STORE_FORMAT = "c2c-prefixes/1"  # bump when what is stored changes
OPEN_SHARDS = 64  # shard files kept open (memory-mapped) at once


def sequence_key(ids: Sequence[int]) -> str:
    """The store key of a token sequence."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:32]


def unpad_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The token ids of each row of a left-padded batch; ValueError if a row is not left-padded."""
    rows = []
    for b, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        n = sum(mask)
        if mask != [0] * (len(mask) - n) + [1] * n:
            raise ValueError(f"row {b} of the batch is not left-padded (attention mask {mask}); prefix stores "
                             "hold whole sequences and rebuild left-padded batches only")
        rows.append(ids[len(ids) - n:])
    return rows


class PrefixStore:
    """The KV-caches of one frozen model for many token sequences, on disk (see the module docstring).

    model: the transformers causal LM whose caches are stored (its dtype is the store's);
    folder: default ``<cache_dir>/prefixes/<store key>``; batch_size: sequences per forward when filling.
    """

    def __init__(self, model, folder: str | os.PathLike | None = None, *, batch_size: int = 8,
                 progress: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.batch_size = batch_size
        self.progress = progress
        self.meta = {
            "format": STORE_FORMAT, "model": str(getattr(model.config, "name_or_path", "")),
            "model_fingerprint": model_fingerprint(model), "dtype": str(model.dtype).removeprefix("torch."),
            "device_type": model.device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "layers": model.config.num_hidden_layers,
        }
        key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(folder) if folder is not None else cache_dir() / "prefixes" / key
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "meta.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if old != self.meta:
                changed = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
                raise ValueError(f"{self.folder} holds the prefix caches of another model or library version "
                                 f"({', '.join(f'{k}: {old.get(k)!r} -> {self.meta.get(k)!r}' for k in changed)}); "
                                 "use another folder or delete it")
        else:
            meta_path.write_text(json.dumps(self.meta, indent=2) + "\n")
        self._index: dict[str, tuple[str, int]] = {}
        self._shards: OrderedDict[str, object] = OrderedDict()
        self._written = 0
        self.computed = 0  # sequences this object computed (not found in the store)
        self.reload()

    # ---- the index -----------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.folder / "index.jsonl"

    def reload(self) -> None:
        """Read the index again (another process may have added sequences); drop a torn last line."""
        if not self.index_path.exists():
            return
        data = self.index_path.read_bytes()
        if data and not data.endswith(b"\n"):
            log.warning("%s: dropping a torn last line left by an interrupted fill", self.index_path)
            data = data[:data.rfind(b"\n") + 1]
            with self._lock():
                with self.index_path.open("r+b") as f:
                    f.truncate(len(data))
        for lineno, line in enumerate(data.decode().splitlines(), 1):
            try:
                entry = json.loads(line)
                self._index.setdefault(entry["key"], (entry["shard"], int(entry["length"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{self.index_path}:{lineno}: corrupt index line ({e}); delete {self.folder} "
                                 "to recompute the store") from None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, ids: Sequence[int]) -> bool:
        return sequence_key(ids) in self._index

    @contextlib.contextmanager
    def _lock(self):
        """Exclusive while writing: processes filling the same store append whole shards one at a time."""
        with (self.folder / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- filling -------------------------------------------------------------------------------
    def fill(self, rows: Iterable[Sequence[int]], *, desc: str = "prefix caches", show_progress: bool = True) -> int:
        """Compute and store the caches of the rows the store lacks; returns how many were computed.

        Longest rows first, `batch_size` at a time, one shard per batch; a progress bar unless the store's
        `progress` or `show_progress` is off.
        """
        self.reload()
        pending: dict[str, list[int]] = {}
        for ids in rows:
            ids = [int(t) for t in ids]
            if not ids:
                raise ValueError("cannot store the cache of an empty sequence")
            key = sequence_key(ids)
            if key not in self._index:
                pending.setdefault(key, ids)
        if not pending:
            return 0
        order = sorted(pending.items(), key=lambda kv: -len(kv[1]))
        bar = tqdm(total=len(order), desc=desc, unit="seq", disable=not (self.progress and show_progress),
                   dynamic_ncols=True)
        try:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                self._write(batch, self._compute([ids for _, ids in batch]))
                bar.update(len(batch))
        finally:
            bar.close()
        self.computed += len(order)
        return len(order)

    def _compute(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Caches of the rows, each (2L, H, n, D) on the CPU, in the model's dtype."""
        model = self.model
        ids, mask = left_pad(rows, 0, model.device)
        cache = decoder_cache(model, ids, mask)  # every position of every layer
        kv = torch.stack([t for layer in cache.layers for t in (layer.keys, layer.values)])  # (2L, B, H, W, D)
        width = ids.shape[1]
        return [kv[:, b, :, width - len(row):].to("cpu").contiguous() for b, row in enumerate(rows)]

    def _write(self, batch: list[tuple[str, list[int]]], tensors: list[torch.Tensor]) -> None:
        with self._lock():
            name = f"shard-{os.getpid()}-{self._written:06d}-{os.urandom(3).hex()}.safetensors"
            tmp = self.folder / (name + ".tmp")
            save_file({key: t for (key, _), t in zip(batch, tensors)}, str(tmp))
            os.replace(tmp, self.folder / name)
            lines = "".join(json.dumps({"key": key, "shard": name, "length": len(ids)}) + "\n" for key, ids in batch)
            with self.index_path.open("a") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
            self._written += 1
        for key, ids in batch:
            self._index.setdefault(key, (name, len(ids)))

    # ---- reading -------------------------------------------------------------------------------
    def get(self, ids: Sequence[int]) -> torch.Tensor:
        """The stored cache of a sequence: (2L, H, n, D), K and V of every layer (K first), on the CPU."""
        key = sequence_key(ids)
        if key not in self._index:
            raise KeyError(f"sequence of {len(ids)} tokens is not in {self.folder}; fill() it first")
        shard, length = self._index[key]
        handle = self._shards.get(shard)
        if handle is None:
            path = self.folder / shard
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - re-raised with the file and the fix
                raise ValueError(f"cannot read prefix-cache shard {path} ({type(e).__name__}: {e}); delete "
                                 f"{self.folder} to recompute the store") from e
            self._shards[shard] = handle
            if len(self._shards) > OPEN_SHARDS:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(shard)
        tensor = handle.get_tensor(key)
        if tensor.shape[2] != length:
            raise ValueError(f"{self.folder / shard}: entry {key} holds {tensor.shape[2]} positions, the index says "
                             f"{length}; delete {self.folder} to recompute the store")
        return tensor

    def cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DynamicCache:
        """What `c2c.fused.kv_cache` returns for this left-padded batch, read from the store (missing rows are
        computed and stored first). Padding positions hold zeros (the attention mask hides them)."""
        rows = unpad_rows(input_ids, attention_mask)
        if any(row not in self for row in rows):
            self.fill(rows, show_progress=False)  # one batch: the caller's own bar shows progress
        B, width = input_ids.shape
        stored = [self.get(row) for row in rows]
        G, H, _, D = stored[0].shape
        device, dtype = self.model.device, self.model.dtype
        kv = torch.zeros(G, B, H, width, D, device=device, dtype=dtype)  # (2L, B, H, W, D)
        for b, tensor in enumerate(stored):
            kv[:, b, :, width - tensor.shape[2]:] = tensor.to(device=device, dtype=dtype)
        cache = DynamicCache()  # every position of every layer, as c2c.fused.decoder_cache computes it
        for layer in range(G // 2):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        return cache

    # ---- attaching -----------------------------------------------------------------------------
    def attach(self) -> "PrefixStore":
        """Make `c2c.fused.kv_cache(self.model, ...)` read from this store."""
        setattr(self.model, PREFIX_STORE_ATTRIBUTE, self)
        return self

    def detach(self) -> None:
        if getattr(self.model, PREFIX_STORE_ATTRIBUTE, None) is self:
            delattr(self.model, PREFIX_STORE_ATTRIBUTE)

    def describe(self) -> dict:
        """Provenance for logs and result files (repo-independent)."""
        return {**self.meta, "folder": self.folder.name, "sequences": len(self)}


def attached_store(model) -> PrefixStore | None:
    """The store attached to a model, if any."""
    return getattr(model, PREFIX_STORE_ATTRIBUTE, None)

