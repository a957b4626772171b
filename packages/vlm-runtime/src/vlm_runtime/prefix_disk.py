"""The prefix cache's disk tier: one safetensors shard per block, under a folder with a size cap.

A restarted server finds what the previous process wrote, so a shard must never be half there or silently
wrong: it is written to a temporary file, fsynced and renamed into place (a reader sees the old state or the
new, never a part), on a thread of its own (the generation thread only hands over evaluated arrays), and
it carries a SHA-256 of its index and data (computed on the writer thread too). A shard that fails to parse or to match its checksum is removed
and counted, never loaded. Over the cap, the least recently used shards go first (reads touch a shard's
modification time, so the order survives restarts).

The shard is plain safetensors (``mx.load`` reads it); this module writes and reads it itself so that the
checksum covers exactly the bytes on disk and the writer thread needs no MLX.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .block_pool import Block

__all__ = ["DiskTier"]

_log = logging.getLogger("vlm_runtime.prefix_cache")

SUFFIX = ".safetensors"
STALE_TEMPORARY_S = 600.0
"""A temporary file older than this is a write that died with its process; a younger one may be another
process's write under way."""
_FORMAT = "vlm_runtime.prefix_block/1"
_DTYPES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.uint16: "U16",
    mx.uint32: "U32",
    mx.uint64: "U64",
    mx.int8: "I8",
    mx.int16: "I16",
    mx.int32: "I32",
    mx.int64: "I64",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.float32: "F32",
    mx.float64: "F64",
}
_FROM_NAME = {name: dtype for dtype, name in _DTYPES.items()}


class CorruptShard(ValueError):
    """A shard that does not parse or does not match its checksum."""


@dataclass
class _Pending:
    """A block on its way to disk: each array's dtype and shape, and its bytes as an evaluated uint8 view
    (the writer thread reads those through the buffer protocol: no MLX work off the generation thread)."""

    key: str
    kinds: tuple[tuple[str, str], ...]
    arrays: list[list[tuple[str, list[int], mx.array]]]

    @classmethod
    def of(cls, key: str, block: Block) -> _Pending:
        arrays = [[(_DTYPES[a.dtype], list(a.shape), a.view(mx.uint8)) for a in layer] for layer in block.layers]
        mx.eval([raw for layer in arrays for _, _, raw in layer])
        return cls(key, block.kinds, arrays)


def _encode(pending: _Pending) -> tuple[bytes, bytes]:
    """A block as (safetensors header, data)."""
    index: dict[str, dict[str, object]] = {}
    chunks: list[bytes] = []
    offset = 0
    for i, layer in enumerate(pending.arrays):
        for j, (dtype, shape, raw) in enumerate(layer):
            data = memoryview(raw).tobytes()
            index[f"layer.{i}.{j}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
            chunks.append(data)
            offset += len(data)
    data = b"".join(chunks)
    own = {
        "format": _FORMAT,
        "key": pending.key,
        "kinds": json.dumps(pending.kinds),
        "n_arrays": json.dumps([len(layer) for layer in pending.arrays]),
    }
    own["sha256"] = _checksum(own, index, data)
    header = json.dumps({**index, "__metadata__": own}, sort_keys=True).encode()
    return header, data


def _checksum(own: dict[str, str], index: dict[str, dict[str, object]], data: bytes) -> str:
    digest = hashlib.sha256(json.dumps([own["key"], own["kinds"], own["n_arrays"], index], sort_keys=True).encode())
    digest.update(data)
    return digest.hexdigest()


def _decode(key: str, raw: bytes) -> Block:
    try:
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        own = header.pop("__metadata__")
        data = raw[8 + length :]
        if own.get("format") != _FORMAT or own.get("key") != key:
            raise CorruptShard("not this block's shard")
        if own.get("sha256") != _checksum(own, header, data):
            raise CorruptShard("checksum mismatch")
        counts = json.loads(own["n_arrays"])
        kinds = tuple(tuple(kind) for kind in json.loads(own["kinds"]))
        layers = [[_array(header[f"layer.{i}.{j}"], data) for j in range(n)] for i, n in enumerate(counts)]
    except CorruptShard:
        raise
    except (ValueError, KeyError, TypeError, struct.error) as error:
        raise CorruptShard(f"unreadable ({type(error).__name__}: {error})") from error
    return Block(layers, kinds)  # type: ignore[arg-type]


def _array(entry: dict[str, object], data: bytes) -> mx.array:
    start, stop = entry["data_offsets"]  # type: ignore[misc]
    raw = np.frombuffer(data, np.uint8, count=stop - start, offset=start)
    return mx.array(raw).view(_FROM_NAME[entry["dtype"]]).reshape(entry["shape"])  # type: ignore[arg-type]


class DiskTier:
    """Shards under ``folder``, at most ``max_bytes`` of them. ``write`` queues a shard for the writer thread;
    ``read`` loads one on the caller's thread. Thread-safe."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"the disk tier's size cap must be positive, got {max_bytes} bytes")
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.writes = self.reads = self.corrupt = self.evictions = 0
        self._scan()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="vlm-prefix-disk", daemon=True)
        self._writer.start()

    def _scan(self) -> None:
        found = []
        stale = time.time() - STALE_TEMPORARY_S
        for path in self.folder.glob("*"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # renamed or removed meanwhile by another writer sharing the folder
                continue
            if path.name.startswith(".tmp-"):
                if stat.st_mtime < stale:  # a write a previous process never finished (not one under way)
                    path.unlink(missing_ok=True)
            elif path.suffix == SUFFIX:
                found.append((stat.st_mtime, path.stem, stat.st_size))
        for _, key, size in sorted(found):
            self._sizes[key] = size

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._sizes

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    def write(self, key: str, block: Block) -> None:
        """Queue ``block`` for writing; the writer thread hashes and writes it."""
        if key in self:
            return
        self._queue.put(_Pending.of(key, block))

    def read(self, key: str) -> Block | None:
        """The block stored under ``key``; None when there is none, or it was corrupt (then it is removed)."""
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except OSError:
            with self._lock:
                self._sizes.pop(key, None)  # another process evicted it
            return None
        try:
            block = _decode(key, raw)
        except CorruptShard as error:
            _log.warning("prefix cache: removed corrupt shard %s (%s)", path.name, error)
            self._remove(key)
            with self._lock:
                self.corrupt += 1
            return None
        try:
            os.utime(path)  # most recently used, for the next process's eviction order too
        except OSError:
            pass  # evicted meanwhile: the block read is whole all the same
        with self._lock:
            if key in self._sizes:
                self._sizes.move_to_end(key)
            self.reads += 1
        return block

    def flush(self) -> None:
        """Wait until every queued shard is on disk."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=30)

    def clear(self) -> int:
        """Remove every shard; how many."""
        self.flush()
        with self._lock:
            keys = list(self._sizes)
        for key in keys:
            self._remove(key)
        return len(keys)

    def _remove(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        with self._lock:
            self._sizes.pop(key, None)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(item.key, *_encode(item))
            except OSError as error:  # a full or read-only disk costs the tier, never the generation
                _log.warning("prefix cache: cannot write a shard to %s: %s", self.folder, error)
            finally:
                self._queue.task_done()

    def _write(self, key: str, header: bytes, data: bytes) -> None:
        final = self._path(key)
        temporary = self.folder / f".tmp-{key}-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(temporary, "wb") as file:
                file.write(struct.pack("<Q", len(header)))
                file.write(header)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, final)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_folder(self.folder)
        with self._lock:
            self._sizes[key] = 8 + len(header) + len(data)
            self._sizes.move_to_end(key)
            self.writes += 1
            victims = []
            total = sum(self._sizes.values())
            for old, size in self._sizes.items():
                if total <= self.max_bytes:
                    break
                victims.append(old)
                total -= size
        for old in victims:
            self._remove(old)
        with self._lock:
            self.evictions += len(victims)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX: the folder's entry)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
