"""The prefix cache's disk tier: safetensors shards under a folder with a size cap, each holding a run of
neighbouring blocks of one prompt (up to ``SHARD_BLOCKS``; reading back hundreds of one-block files took longer
than prefilling their tokens again). A shard is named by its first block's key and lists its blocks' keys.

A restarted server finds what the previous process wrote, so a shard must never be half there or silently
wrong: it is written to a temporary file, fsynced and renamed into place (a reader sees the old state or the
new, never a part), on a thread of its own (the generation thread only hands over evaluated arrays), and
it carries a checksum of its index and data (computed on the writer thread too). A shard that fails to parse or to match its checksum is removed
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
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .block_pool import Block, Segment

__all__ = ["DiskTier"]

_log = logging.getLogger("vlm_runtime.prefix_cache")

SUFFIX = ".safetensors"
STALE_TEMPORARY_S = 600.0
"""A temporary file older than this is a write that died with its process; a younger one may be another
process's write under way."""
_FORMAT = "vlm_runtime.prefix_blocks/2"
CHECKSUM_CHUNK = 8 * 2**20
SHARD_BLOCKS = 64
"""Blocks per shard at most (fewer when the size cap is small: a shard must fit well within it)."""
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
    """A shard on its way to disk: its blocks' keys, each array's dtype and shape, and its bytes as an
    evaluated uint8 view (the writer thread reads those through the buffer protocol: no MLX work off the
    generation thread). ``block_tokens`` None: one block without a token axis (whole-state layers' arrays)."""

    keys: list[str]
    kinds: tuple[tuple[str, str], ...]
    block_tokens: int | None
    arrays: list[list[tuple[str, list[int], mx.array]]]

    @classmethod
    def of(cls, keys: list[str], arrays: list[list[mx.array]], kinds: tuple, block_tokens: int | None) -> _Pending:
        viewed = [
            [(_DTYPES[a.dtype], list(a.shape), mx.contiguous(a).view(mx.uint8)) for a in layer] for layer in arrays
        ]
        mx.eval([raw for layer in viewed for _, _, raw in layer])
        return cls(keys, kinds, block_tokens, viewed)


def _encode(pending: _Pending) -> tuple[bytes, bytes]:
    """A shard as (safetensors header, data)."""
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
        "keys": json.dumps(pending.keys),
        "block_tokens": json.dumps(pending.block_tokens),
        "kinds": json.dumps(pending.kinds),
        "n_arrays": json.dumps([len(layer) for layer in pending.arrays]),
    }
    own["checksum"] = _checksum(own, index, data)
    header = json.dumps({**index, "__metadata__": own}, sort_keys=True).encode()
    return header, data


def _checksum(own: dict[str, str], index: dict[str, dict[str, object]], data: bytes) -> str:
    """SHA-256 of the header's fields and of the data's CRC-32s, one per ``CHECKSUM_CHUNK`` bytes, computed on
    threads (zlib lets go of the GIL): a SHA-256 of a long prefix's hundreds of megabytes took longer than
    prefilling the prefix again on a GPU. A CRC catches what it must here: torn, truncated or flipped bytes."""
    fields = [own["keys"], own["block_tokens"], own["kinds"], own["n_arrays"], index]
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    view = memoryview(data)
    chunks = [view[i : i + CHECKSUM_CHUNK] for i in range(0, len(data), CHECKSUM_CHUNK)]
    if len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=min(8, len(chunks))) as pool:
            crcs = list(pool.map(zlib.crc32, chunks))
    else:
        crcs = [zlib.crc32(chunk) for chunk in chunks]
    digest.update(struct.pack(f"<Q{len(crcs)}I", len(data), *crcs))
    return digest.hexdigest()


def _header(raw: bytes) -> tuple[dict, dict, int]:
    """A shard's array index, its own metadata, and where its data starts."""
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    own = header.pop("__metadata__")
    if own.get("format") != _FORMAT:
        raise CorruptShard("not a prefix-cache shard of this version")
    return header, own, 8 + length


@dataclass
class _Shard:
    keys: list[str]
    block_tokens: int | None
    kinds: tuple[tuple[str, str], ...]
    segment: Segment

    def block(self, index: int) -> Block:
        if self.block_tokens is None:
            return Block(self.segment.arrays, self.kinds)
        start = index * self.block_tokens
        return Block(None, self.kinds, segment=self.segment, start=start, stop=start + self.block_tokens)


def _decode(stem: str, raw: bytes) -> _Shard:
    try:
        header, own, start = _header(raw)
        data = raw[start:]
        keys = json.loads(own["keys"])
        if not keys or keys[0] != stem:
            raise CorruptShard("not this shard's blocks")
        if own.get("checksum") != _checksum(own, header, data):
            raise CorruptShard("checksum mismatch")
        counts = json.loads(own["n_arrays"])
        kinds = tuple(tuple(kind) for kind in json.loads(own["kinds"]))
        arrays = [[_array(header[f"layer.{i}.{j}"], data) for j in range(n)] for i, n in enumerate(counts)]
        block_tokens = json.loads(own["block_tokens"])
    except CorruptShard:
        raise
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as error:
        raise CorruptShard(f"unreadable ({type(error).__name__}: {error})") from error
    return _Shard(keys, block_tokens, kinds, Segment(arrays))  # type: ignore[arg-type]


def _array(entry: dict[str, object], data: bytes) -> mx.array:
    start, stop = entry["data_offsets"]  # type: ignore[misc]
    raw = np.frombuffer(data, np.uint8, count=stop - start, offset=start)
    return mx.array(raw).view(_FROM_NAME[entry["dtype"]]).reshape(entry["shape"])  # type: ignore[arg-type]


class DiskTier:
    """Shards under ``folder``, at most ``max_bytes`` of them. ``write`` queues shards for the writer thread;
    ``read`` loads a block on the caller's thread (its shard is decoded once for a run of reads). Thread-safe."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"the disk tier's size cap must be positive, got {max_bytes} bytes")
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # shard stem -> bytes, least recently used first
        self._members: dict[str, list[str]] = {}  # shard stem -> its blocks' keys
        self._where: dict[str, tuple[str, int]] = {}  # block key -> (shard stem, index in it)
        self._queued: set[str] = set()
        self._decoded: tuple[str, _Shard] | None = None
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
                found.append((stat.st_mtime, path, stat.st_size))
        for _, path, size in sorted(found):
            try:
                keys = self._listed_keys(path)
            except (OSError, CorruptShard) as error:
                _log.warning("prefix cache: removed corrupt shard %s (%s)", path.name, error)
                path.unlink(missing_ok=True)
                self.corrupt += 1
                continue
            self._index(path.stem, keys, size)

    @staticmethod
    def _listed_keys(path: Path) -> list[str]:
        """The keys a shard's header lists (its data is checked when it is read)."""
        with open(path, "rb") as file:
            head = file.read(8)
            try:
                (length,) = struct.unpack("<Q", head)
                if length > 64 * 2**20:
                    raise CorruptShard("header too long")
                _, own, _ = _header(head + file.read(length))
                keys = json.loads(own["keys"])
            except CorruptShard:
                raise
            except (ValueError, KeyError, TypeError, struct.error) as error:
                raise CorruptShard(f"unreadable ({type(error).__name__}: {error})") from error
        if not isinstance(keys, list) or not keys or keys[0] != path.stem:
            raise CorruptShard("not this shard's blocks")
        return keys

    def _index(self, stem: str, keys: list[str], size: int) -> None:
        self._sizes[stem] = size
        self._sizes.move_to_end(stem)
        self._members[stem] = keys
        for i, key in enumerate(keys):
            self._where[key] = (stem, i)

    def _path(self, stem: str) -> Path:
        return self.folder / f"{stem}{SUFFIX}"

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._where

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def __len__(self) -> int:
        """Blocks on disk."""
        with self._lock:
            return len(self._where)

    def write(self, keys: list[str], part: Segment | Block, kinds: tuple, block_tokens: int) -> None:
        """Queue the blocks ``keys`` of ``part`` (a segment of ``block_tokens``-token blocks, or one block
        without a token axis) for writing, in shards of at most ``SHARD_BLOCKS`` blocks; the writer thread
        hashes and writes them. Blocks already on disk or queued are left out."""
        if isinstance(part, Block):
            with self._lock:
                if keys[0] in self._where or keys[0] in self._queued:
                    return
                self._queued.add(keys[0])
            self._queue.put(_Pending.of(keys[:1], part.layers, kinds, None))
            return
        per_block = part.nbytes // max(len(keys), 1)
        most = max(1, min(SHARD_BLOCKS, self.max_bytes // 8 // max(per_block, 1)))
        with self._lock:
            fresh = [i for i, key in enumerate(keys) if key not in self._where and key not in self._queued]
            self._queued.update(keys[i] for i in fresh)
        runs: list[list[int]] = []
        for i in fresh:
            if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < most:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            start, stop = run[0] * block_tokens, (run[-1] + 1) * block_tokens
            arrays = [[a[..., start:stop, :] for a in layer] for layer in part.arrays]
            self._queue.put(_Pending.of([keys[i] for i in run], arrays, kinds, block_tokens))

    def read(self, key: str) -> Block | None:
        """The block stored under ``key``; None when there is none, or its shard was corrupt (then it is
        removed). The shard read stays decoded for the next read of one of its blocks (until ``forget``)."""
        with self._lock:
            where = self._where.get(key)
            decoded = self._decoded
        if where is None:
            return None
        stem, index = where
        if decoded is not None and decoded[0] == stem:
            shard = decoded[1]
        else:
            shard = self._load(stem)
            if shard is None:
                return None
        with self._lock:
            self._decoded = (stem, shard)
            self.reads += 1
        return shard.block(index)

    def _load(self, stem: str) -> _Shard | None:
        path = self._path(stem)
        try:
            raw = path.read_bytes()
        except OSError:
            self._unindex(stem)  # another process evicted it
            return None
        try:
            shard = _decode(stem, raw)
        except CorruptShard as error:
            _log.warning("prefix cache: removed corrupt shard %s (%s)", path.name, error)
            self._remove(stem)
            with self._lock:
                self.corrupt += 1
            return None
        try:
            os.utime(path)  # most recently used, for the next process's eviction order too
        except OSError:
            pass  # evicted meanwhile: the shard read is whole all the same
        with self._lock:
            if stem in self._sizes:
                self._sizes.move_to_end(stem)
        return shard

    def forget(self) -> None:
        """Drop the shard kept decoded (its blocks are in the memory tier now, or not wanted)."""
        with self._lock:
            self._decoded = None

    def flush(self) -> None:
        """Wait until every queued shard is on disk."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=30)

    def clear(self) -> int:
        """Remove every shard; how many blocks they held."""
        self.flush()
        with self._lock:
            stems = list(self._sizes)
            blocks = len(self._where)
            self._decoded = None
        for stem in stems:
            self._remove(stem)
        return blocks

    def _unindex(self, stem: str) -> None:
        with self._lock:
            self._sizes.pop(stem, None)
            for key in self._members.pop(stem, []):
                if self._where.get(key, (None,))[0] == stem:
                    del self._where[key]
            if self._decoded is not None and self._decoded[0] == stem:
                self._decoded = None

    def _remove(self, stem: str) -> None:
        self._path(stem).unlink(missing_ok=True)
        self._unindex(stem)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(item.keys, *_encode(item))
            except OSError as error:  # a full or read-only disk costs the tier, never the generation
                _log.warning("prefix cache: cannot write a shard to %s: %s", self.folder, error)
            finally:
                if item is not None:
                    with self._lock:
                        self._queued.difference_update(item.keys)
                self._queue.task_done()

    def _write(self, keys: list[str], header: bytes, data: bytes) -> None:
        stem = keys[0]
        final = self._path(stem)
        temporary = self.folder / f".tmp-{stem}-{os.getpid()}-{threading.get_ident()}"
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
            self._index(stem, keys, 8 + len(header) + len(data))
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
            self.evictions += sum(1 for _ in victims)


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
