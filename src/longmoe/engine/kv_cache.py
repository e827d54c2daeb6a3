"""KV caches the model writes through `update(layer, k, v) -> (k_all, v_all, segments)`."""

from __future__ import annotations

import torch


class DenseCache:
    """Contiguous per-layer buffers for a batch of equally long sequences starting at position 0 (the simple
    generate loop). Capacity doubles as it fills, so appends are amortised O(1)."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.length: dict[int, int] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """k, v [B, heads, T, D] -> all keys/values so far [B, heads, S, D]; queries are their tail (segments None)."""
        n = self.length.get(layer, 0)
        T = k.shape[2]
        if layer not in self.k or n + T > self.k[layer].shape[2]:
            cap = max(2 * (n + T), 64)
            for store, new in ((self.k, k), (self.v, v)):
                buf = new.new_empty(*new.shape[:2], cap, new.shape[3])
                if n:
                    buf[:, :, :n] = store[layer][:, :, :n]
                store[layer] = buf
        self.k[layer][:, :, n : n + T] = k
        self.v[layer][:, :, n : n + T] = v
        self.length[layer] = n + T
        return self.k[layer][:, :, : n + T], self.v[layer][:, :, : n + T], None
