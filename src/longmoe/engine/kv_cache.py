"""Paged KV cache: fixed-size blocks in one pool per attention kind, a block table per sequence, and a prefix cache
keyed by block content (parent hash + tokens, as vLLM's automatic prefix caching).

Layers of one kind share block tables. "full" layers keep every block; "sliding" and "chunked" layers release blocks
no future query can see, so their pools stay as small as their window. Storage is [layers, kv_heads, blocks*size,
head_dim], so a run of physically consecutive blocks is a plain view that attention reads without a copy; the
allocator hands a sequence consecutive blocks whenever it can.

KV dtypes: the model's own, or "fp8" (float8 e4m3 with one scale per layer and kv head, calibrated on the first write
with 2x headroom): half the bytes of bf16, a quarter of fp32.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..model.attention import attend_span, merge, sdpa
from ..model.config import ModelConfig

FP8 = torch.float8_e4m3fn
FP8_HEADROOM = 240.0  # calibrate so the first write's max maps to 240 of e4m3's 448
SPAN = 16384  # prefix keys read per attention call: bounds the transient memory of dequantising fp8 runs


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    """Allocation, reference counts and the content-addressed cache for one pool of blocks.

    A block is free (no content), cached (content hash known, no users: evictable, least recently used first) or in
    use (ref > 0). Pinned prefixes simply hold a reference."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free = list(range(num_blocks))  # min-heap: low ids first keeps sequences contiguous
        self.free_set = set(self.free)
        self.evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def available(self) -> int:
        return len(self.free_set) + len(self.evictable)

    def allocate(self, prefer: int | None = None) -> int:
        if prefer is not None and prefer in self.free_set:
            b = prefer
        else:
            b = None
            while self.free:
                cand = heapq.heappop(self.free)
                if cand in self.free_set:
                    b = cand
                    break
            if b is None:
                if not self.evictable:
                    raise OutOfBlocks("no free KV blocks")
                b, _ = self.evictable.popitem(last=False)
                del self.by_hash[self.hash_of[b]]
                self.hash_of[b] = None
        self.free_set.discard(b)
        self.ref[b] = 1
        return b

    def acquire(self, b: int) -> None:
        if self.ref[b] == 0:
            self.evictable.pop(b)
        self.ref[b] += 1

    def release(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.hash_of[b] is not None:
                self.evictable[b] = None
            else:
                self.free_set.add(b)
                heapq.heappush(self.free, b)

    def commit(self, b: int, h: bytes) -> None:
        """Record that block b now holds the full block with content hash h (first holder wins)."""
        if h not in self.by_hash and self.hash_of[b] is None:
            self.hash_of[b] = h
            self.by_hash[h] = b

    def lookup(self, h: bytes) -> int | None:
        return self.by_hash.get(h)


def block_hashes(tokens: list[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """Hash of every full block: sha256(parent hash, token ids), so equal hashes mean equal prefixes."""
    out = []
    for i in range(0, len(tokens) - block_size + 1, block_size):
        parent = hashlib.sha256(
            parent + torch.tensor(tokens[i : i + block_size], dtype=torch.int64).numpy().tobytes()
        ).digest()
        out.append(parent)
    return out


@dataclass
class Row:
    """One sequence's part of a forward step: its block tables and the positions [start, start + length) it adds."""

    tables: dict[str, list[int]]
    start: int
    length: int
    slots: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> flat slot index of each new token
    runs: list[tuple[int, int]] = field(default_factory=list)  # full-kind prefix as (first slot, tokens) runs
    first_slot: int | None = None  # when all full-kind keys [0, start + length) sit in consecutive slots: the first


class PagedKVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: dict[str, int],
        block_size: int,
        dtype: torch.dtype,
        kv_dtype: str = "auto",
        device: torch.device | str = "cpu",
    ):
        if kv_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_dtype {kv_dtype!r} is not one of auto, fp8")
        self.config, self.block_size, self.dtype, self.device = config, block_size, dtype, torch.device(device)
        self.storage_dtype = FP8 if kv_dtype == "fp8" else dtype
        self.kind_of = list(config.layer_types)
        self.index_in_kind = [self.kind_of[:i].count(k) for i, k in enumerate(self.kind_of)]
        self.pools = {kind: BlockPool(num_blocks[kind]) for kind in sorted(set(self.kind_of))}
        if config.is_mla:  # absorbed MLA caches [latent ; rope key] once; values are the latent part of it
            heads, kdim, vdim = 1, config.kv_lora_rank + config.qk_rope_head_dim, 0
        else:
            heads, kdim, vdim = config.num_kv_heads, config.head_dim, config.head_dim
        self.k, self.v, self.scale = {}, {}, {}
        for kind, pool in self.pools.items():
            n_layers = self.kind_of.count(kind)
            slots = pool.num_blocks * block_size
            # torch.empty: on CPU, pages are committed only when written, so memory use follows the tokens stored
            self.k[kind] = torch.empty(n_layers, heads, slots, kdim, dtype=self.storage_dtype, device=device)
            self.v[kind] = (
                torch.empty(n_layers, heads, slots, vdim, dtype=self.storage_dtype, device=device) if vdim else None
            )
            self.scale[kind] = torch.zeros(n_layers, 2, heads, 1, 1, device=device)  # fp8: (k, v) scale; 0 = unset
        self.rows: list[Row] = []

    def first_needed(self, kind: str, pos: int) -> int:
        """Earliest key position a query at `pos` (or later) can attend on layers of this kind."""
        if kind == "sliding":
            return max(0, pos - self.config.sliding_window + 1)
        if kind == "chunked":
            return pos // self.config.attention_chunk_size * self.config.attention_chunk_size
        return 0

    # --- per step ---
    def prepare(self, rows: list[Row]) -> None:
        """Called by the engine before each forward: slot indices for new tokens, prefix runs for full layers."""
        bs = self.block_size
        for r in rows:
            positions = range(r.start, r.start + r.length)
            for kind, table in r.tables.items():
                r.slots[kind] = torch.tensor(
                    [table[p // bs] * bs + p % bs for p in positions], dtype=torch.long, device=self.device
                )
            if "full" in r.tables:
                # Runs of keys every query sees in full: the cached prefix, plus the new token itself when there is
                # one (decode), which then needs no separate causal call.
                r.runs = []
                table = r.tables["full"]
                visible = r.start + (r.length == 1)
                n_blocks = -(-(r.start + r.length) // bs)  # prefill only: decode reads the runs
                consecutive = r.length > 1 and table[:n_blocks] == list(range(table[0], table[0] + n_blocks))
                r.first_slot = table[0] * bs if consecutive else None
                for p in range(0, visible, bs):  # consecutive physical blocks merge into one run
                    n = min(bs, visible - p)
                    slot = table[p // bs] * bs
                    if r.runs and r.runs[-1][0] + r.runs[-1][1] == slot and r.runs[-1][1] % bs == 0:
                        r.runs[-1] = (r.runs[-1][0], r.runs[-1][1] + n)
                    else:
                        r.runs.append((slot, n))
        self.rows = rows

    def zero_block(self, kind: str, block: int) -> None:
        """Clear a newly allocated block: decode reads whole blocks, and masked-out slots must not hold NaN/Inf."""
        sl = slice(block * self.block_size, (block + 1) * self.block_size)
        self.k[kind][:, :, sl] = 0
        if self.v[kind] is not None:
            self.v[kind][:, :, sl] = 0

    def _store(self, kind: str, li: int, which: int, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Write x [heads, T, D] into the slots of layer li's K (which=0) or V (which=1) storage."""
        store = (self.k if which == 0 else self.v)[kind][li]
        if self.storage_dtype == FP8:
            scale = self.scale[kind][li, which]
            if not scale.any():  # first write to this layer: calibrate per head
                scale.copy_(x.detach().float().abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-6) / FP8_HEADROOM)
            x = (x.float() / scale).clamp(-448.0, 448.0)
        store[:, slots] = x.to(self.storage_dtype)

    def _load(self, kind: str, li: int, which: int, sl: slice | torch.Tensor) -> torch.Tensor:
        """Keys (which=0) or values (1) at slots `sl` as [heads, n, D] in the compute dtype (a view when possible)."""
        store = (self.k if which == 0 else self.v)[kind][li]
        x = store[:, sl]
        if self.storage_dtype == FP8:
            x = (x.float() * self.scale[kind][li, which]).to(self.dtype)
        return x

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        window: int = 0,
        chunk: int = 0,
    ) -> torch.Tensor:
        """Store this step's keys/values for `layer` and attend each row's queries over everything it has cached.
        q [B, H, Tq, D]: the queries of the last Tq of this step's T tokens (Tq = 0: store only); k, v [B, Hkv, T, D]
        (v may be k itself: MLA values are part of the cached keys)."""
        kind, li = self.kind_of[layer], self.index_in_kind[layer]
        shared = v is k
        bs = self.block_size
        outs = []  # per row [1, H, Tq, Dv]
        for b, r in enumerate(self.rows):
            qb, kb, vb = q[b : b + 1], k[b], v[b]
            slots = r.slots[kind]
            self._store(kind, li, 0, slots, kb)
            if not shared:
                self._store(kind, li, 1, slots, vb)
            if q.shape[2] == 0:
                continue
            if kind == "full" and r.length > 1 and r.first_slot is not None and self.storage_dtype != FP8:
                # prefill over keys in consecutive slots: the prefix and this step's keys are one view, attended in
                # one call (bottom-right causal) instead of a causal call plus a merge per prefix span
                keys = slice(r.first_slot, r.first_slot + r.start + r.length)
                kk = self._load(kind, li, 0, keys)
                vv = kk if shared else self._load(kind, li, 1, keys)
                o, _ = attend_span(qb, kk[None], vv[None], end=r.start + r.length, scale=scale)
                outs.append(o)
            elif kind == "full":
                result = None
                if r.length > 1:  # this step's tokens, causally (queries are their tail)
                    result = attend_span(qb, kb[None], vb[None], end=r.length, scale=scale)
                for start, n in r.runs:  # cached prefix: every query sees all of it, merged span by span
                    for a in range(start, start + n, SPAN):
                        b_end = min(a + SPAN, start + n)
                        # Read whole blocks (shapes change once per block, not per token, so the matmul library's
                        # kernel cache hits during decode); the zeroed tail past the last token is masked out.
                        padded = min(b_end + (-b_end % bs), a + SPAN) if r.length == 1 else b_end
                        kk = self._load(kind, li, 0, slice(a, padded))
                        vv = kk if shared else self._load(kind, li, 1, slice(a, padded))
                        part = sdpa(qb, kk[None], vv[None], causal=False, scale=scale, valid=b_end - a)
                        result = part if result is None else merge(part, result)
                outs.append(result[0])
            else:  # local layers: the visible prefix is at most one window, gathered then attended with its mask
                lo = self.first_needed(kind, r.start)
                table = r.tables[kind]
                old = torch.tensor(
                    [table[p // bs] * bs + p % bs for p in range(lo, r.start)], dtype=torch.long, device=self.device
                )
                kk = torch.cat([self._load(kind, li, 0, old), kb], dim=1)
                vv = kk if shared else torch.cat([self._load(kind, li, 1, old), vb], dim=1)
                end = r.start + r.length
                outs.append(attend_span(qb, kk[None], vv[None], end=end, scale=scale, window=window, chunk=chunk)[0])
        if q.shape[2] == 0:
            return q.new_empty(*q.shape[:3], v.shape[-1])
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # one row (prefill): no copy
