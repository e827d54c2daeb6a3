"""safetensors files, read memory-mapped and validated, written atomically.

The format is an 8-byte little-endian header length, a JSON header mapping names to dtype/shape/byte offsets, then the
data. Reading it directly lets us (a) hand out zero-copy tensors backed by the page cache and (b) check every offset
against the real file size, so a truncated download fails with the file's name instead of a crash later.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from ..errors import LongmoeError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(LongmoeError):
    """A checkpoint that cannot be read or does not match its config; the message names the file and the fix."""


class TensorRef:
    """One tensor in a safetensors file: its metadata now, its memory-mapped data on `load()`."""

    def __init__(self, file: SafetensorsFile, name: str, dtype: torch.dtype, shape: list[int], start: int, end: int):
        self.file, self.name, self.dtype, self.shape = file, name, dtype, shape
        self.start, self.end = start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def load(self) -> torch.Tensor:
        return self.file.tensor(self)

    def release(self) -> None:
        """Drop this tensor's mapped pages once a converted copy has been made, so the file's pages stop counting
        in the process's memory. Only whole pages inside the tensor: neighbours may still be in use as views."""
        m = self.file._mmap
        if m is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = -(-(self.file.data_start + self.start) // page) * page
        hi = (self.file.data_start + self.end) // page * page
        if hi > lo:
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._error(f"is {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise self._error(
                    f"declares a {n}-byte header but the file is {size} bytes (truncated or not safetensors)"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise self._error(f"has a corrupt header ({e})") from None
        if not isinstance(header, dict):
            raise self._error("has a corrupt header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors: dict[str, TensorRef] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = [int(s) for s in info["shape"]]
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._error(f"has a corrupt entry for tensor {name!r}: {info!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - start != numel * dtype.itemsize or start < 0:
                raise self._error(f"tensor {name!r}: byte range {start}..{end} does not fit shape {shape} {dtype}")
            if self.data_start + end > size:
                raise self._error(
                    f"is truncated: tensor {name!r} ends at byte {self.data_start + end} but the file has {size} bytes;"
                    " download or copy it again"
                )
            self.tensors[name] = TensorRef(self, name, dtype, shape, start, end)
        spans = sorted((r.start, r.end, r.name) for r in self.tensors.values() if r.nbytes)
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise self._error(f"has overlapping tensors: {a!r} and {b!r} share bytes (corrupt header)")

    def _error(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {msg}")

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """A zero-copy view into the mapped file (copy-on-write: writes never reach the file)."""
        if ref.nbytes == 0:
            return torch.empty(ref.shape, dtype=ref.dtype)
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(self._mmap, dtype=torch.uint8, count=ref.nbytes, offset=self.data_start + ref.start)
        return flat.view(ref.dtype).view(ref.shape)


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a transformers-style directory: via the index when there is one."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt index file ({e})") from None
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise CheckpointError(
                f"{directory} has only pickle weights (*.bin/*.pt); longmoe reads safetensors. Convert them with "
                "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)"
            )
        raise CheckpointError(f"{directory} contains no *.safetensors weights")
    return files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically: to a temporary name, fsync, then rename over the target."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep tensor data 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_sharded(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards plus the index when larger than one shard."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], directory / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, directory / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_bytes(directory / "model.safetensors.index.json", json.dumps(index, indent=2).encode())
