"""bf16 training with fp32 master weights.

The model's parameters are bf16, so every matmul, forward and backward, runs at this CPU's bf16 rate (about twice
fp32) with no per-op casts. The optimizer never sees them: it updates fp32 copies (the masters), which are rounded
back into the model after each step. Without masters, an update smaller than half a bf16 ulp of its weight (~0.4% of
it) would round away every step; with them it accumulates. Gradients move to the masters after every backward, so
accumulation over micro-batches is in fp32 too.
"""

from __future__ import annotations

import torch
from torch import nn


class MasterWeights:
    def __init__(self, named: dict[str, nn.Parameter], dtype: torch.dtype = torch.bfloat16):
        """Cast these parameters to `dtype` in place (same Parameter objects, so modules and hooks keep them)
        and keep an fp32 master copy of each."""
        self.pairs: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        with torch.no_grad():
            for name, p in named.items():
                master = p.detach().float().clone()
                p.data = p.data.to(dtype)
                self.pairs[name] = (p, master)
        self._by_id = {id(p): m for p, m in self.pairs.values()}

    def master(self, p: nn.Parameter) -> torch.Tensor:
        """The tensor the optimizer updates for model parameter p (p itself when it has no master)."""
        return self._by_id.get(id(p), p)

    def grads_to_master(self) -> None:
        """Add each model gradient into its master's fp32 gradient and free it. Call after every backward."""
        for p, m in self.pairs.values():
            if p.grad is not None:
                g = p.grad.float()
                m.grad = g if m.grad is None else m.grad.add_(g)
                p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the masters into the model. Call after every optimizer step (and after loading masters)."""
        for p, m in self.pairs.values():
            p.copy_(m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: m for name, (_, m) in self.pairs.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, (_, m) in self.pairs.items():
            m.copy_(state[name])
        self.copy_to_model()
