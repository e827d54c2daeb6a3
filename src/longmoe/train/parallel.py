"""Parallelism, applied to the single-device model from outside (as torchtitan's parallelize):

- data parallel: FSDP2 `fully_shard` per block and at the root (or plain replication with summed gradients);
- expert parallel: each rank keeps E / world experts; routed tokens travel to their expert's rank and back with
  `all_to_all_single` (autograd-aware). Every rank issues the same collectives, also with zero tokens to send;
- context parallel: each sequence is cut into 2 x world chunks and rank r holds chunks r and 2w-1-r (head and
  tail, balancing the causal triangle); ring attention passes key/value chunks around the ranks and merges partial
  results through their log-sum-exp; its backward sends the key/value gradients around the ring back to owners.

Gradients are summed over ranks (the loss is normalised by the global token count), so a parallel step equals a
single-process step on the same global batch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from ..model.attention import merge
from ..model.config import ConfigError
from ..model.moe import MoE
from ..model.transformer import Attention, Transformer


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """From torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); gloo on CPU, NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    return Dist(rank, world, device)


def exit_worker(code: int = 0) -> NoReturn:
    """End a torchrun worker whose process group is already destroyed without interpreter finalization: once
    torch._dynamo is loaded (torch.optim imports it), finalizing a process that used gloo aborts with SIGABRT
    ("terminate called without an active exception") in ~10% of runs here, and torchrun then reports the finished
    job as failed. Everything the run writes is closed by then; only stdio needs flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


# ------------------------------------------------------------------------------------------------------------------
# data parallel


def apply_fsdp(model: Transformer, ignored: set[nn.Parameter], compute_dtype: torch.dtype | None = None) -> None:
    """fully_shard each block, then the root. FSDP averages gradients over ranks (gloo has no pre-multiplied sum),
    so the trainer scales the loss by the world size to get sums. With a compute dtype (bf16), the fp32 shards are
    the master weights: FSDP gathers them in that dtype for compute and reduces gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
    kw = {"mp_policy": mp} if mp else {}
    for block in model.layers:
        fully_shard(block, ignored_params=ignored & set(block.parameters()) or None, **kw)
    fully_shard(model, ignored_params=ignored or None, **kw)


def sync_replicated_grads(params: list[nn.Parameter], world: int) -> None:
    """Sum the gradients of replicated (not sharded) parameters over all ranks."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


# ------------------------------------------------------------------------------------------------------------------
# expert parallel


class ExpertParallel:
    """MoE dispatcher: routed tokens go to the rank holding their expert and come back, via all_to_all_single."""

    def __init__(self, world: int, num_experts: int):
        self.world, self.local = world, num_experts // world

    def __call__(self, moe: MoE, x_NH: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor):
        K, W, El = experts_NK.shape[1], self.world, self.local
        experts_M = experts_NK.flatten()
        order_M = experts_M.argsort(stable=True)  # by global expert id = by destination rank, then local expert
        token_M = order_M // K
        weight_M1 = weights_NK.flatten()[order_M, None]
        counts_E = torch.bincount(experts_M, minlength=W * El)
        x_MH = x_NH[token_M]
        if moe.config.weight_on_input:
            x_MH = (x_MH * weight_M1).to(x_NH.dtype)

        # 1. tell every rank how many tokens it gets for each of its experts
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E)  # [src rank * El + local expert]
        recv_WE = recv_counts.view(W, El)
        send_splits = counts_E.view(W, El).sum(1).tolist()  # NOTE: host sync, needed for the split sizes
        recv_splits = recv_WE.sum(1).tolist()
        # 2. the tokens themselves (autograd-aware: gradients take the reverse trip)
        x_recv = x_MH.new_empty(sum(recv_splits), x_MH.shape[1])
        x_recv = dist_fn.all_to_all_single(x_recv, x_MH, recv_splits, send_splits)
        # 3. rank-major -> expert-major for the local grouped GEMM
        offsets = torch.cat([recv_WE.new_zeros(1), recv_WE.flatten().cumsum(0)[:-1]]).view(W, El)
        perm = torch.cat(
            [torch.arange(offsets[s, e], offsets[s, e] + recv_WE[s, e]) for e in range(El) for s in range(W)]
            + [torch.zeros(0, dtype=torch.long)]
        )
        y_local = moe.experts(x_recv[perm], recv_WE.sum(0))
        if y_local.grad_fn is None and x_recv.requires_grad:
            # No tokens reached this rank's experts. Keep the output attached to the graph anyway, so backward
            # still runs both all_to_all's here: the other ranks' backward waits for them.
            y_local = y_local + 0 * x_recv.sum()
        y_recv = torch.empty_like(y_local).index_copy(0, perm, y_local) if len(perm) else y_local
        # 4. back to the tokens' ranks, weight, and combine
        y_MH = x_MH.new_empty(x_MH.shape[0], y_recv.shape[1])
        y_MH = dist_fn.all_to_all_single(y_MH, y_recv, send_splits, recv_splits)
        if not moe.config.weight_on_input:
            y_MH = (y_MH * weight_M1).to(x_NH.dtype)
        return torch.zeros_like(x_NH).index_add(0, token_M, y_MH)


def apply_expert_parallel(model: Transformer, rank: int, world: int) -> list[nn.Parameter]:
    """Keep this rank's slice of every expert tensor; returns the (now rank-local) expert parameters."""
    local = []
    for m in model.modules():
        if isinstance(m, MoE):
            El = m.config.num_experts // world
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(m.experts, name)
                shard = nn.Parameter(p.detach()[rank * El : (rank + 1) * El].clone())
                setattr(m.experts, name, shard)
                local.append(shard)
            m.dispatcher = ExpertParallel(world, m.config.num_experts)
    return local


# ------------------------------------------------------------------------------------------------------------------
# context parallel


def cp_shard(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """Head-tail sharding: cut `dim` into 2*world chunks, keep chunks rank and 2*world-1-rank."""
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def _sendrecv(tensors: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    """Pass tensors to rank+1, receive rank-1's."""
    out = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), (rank + 1) % world) for t in tensors]
    ops += [dist.P2POp(dist.irecv, o, (rank - 1) % world) for o in out]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def _pairs(rank: int, src: int, world: int) -> list[tuple[int, int, bool]]:
    """(my q chunk slot, src kv chunk slot, causal) for the chunk pairs that see each other."""
    mine, theirs = (rank, 2 * world - 1 - rank), (src, 2 * world - 1 - src)
    out = []
    for i, a in enumerate(mine):
        for j, b in enumerate(theirs):
            if b < a:
                out.append((i, j, False))
            elif b == a:
                out.append((i, j, True))
    return out


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, rank: int, world: int):
        """q, k, v [B, H(kv), 2c, D]: this rank's head and tail chunks."""
        qs = q.chunk(2, dim=2)
        acc: list = [None, None]
        kv = [k, v]
        for step in range(world):
            src = (rank - step) % world
            kc, vc = kv[0].chunk(2, dim=2), kv[1].chunk(2, dim=2)
            for i, j, causal in _pairs(rank, src, world):
                o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    qs[i], kc[j], vc[j], 0.0, causal, scale=scale
                )
                acc[i] = (o, lse) if acc[i] is None else merge(acc[i], (o, lse))
            if step < world - 1:
                kv = _sendrecv(kv, rank, world)
        out = torch.cat([acc[0][0], acc[1][0]], dim=2)
        lse = torch.cat([acc[0][1], acc[1][1]], dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.rank, ctx.world = scale, rank, world
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, rank, world = ctx.scale, ctx.rank, ctx.world
        qs, outs, lses, douts = q.chunk(2, 2), out.chunk(2, 2), lse.chunk(2, 2), dout.contiguous().chunk(2, 2)
        dq = [torch.zeros_like(x, dtype=torch.float32) for x in qs]
        kv = [k, v]
        dkv = [torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
        for step in range(world):
            src = (rank - step) % world
            kc, vc = kv[0].chunk(2, dim=2), kv[1].chunk(2, dim=2)
            dk, dv = dkv[0].chunk(2, dim=2), dkv[1].chunk(2, dim=2)
            for i, j, causal in _pairs(rank, src, world):
                gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    douts[i], qs[i].contiguous(), kc[j].contiguous(), vc[j].contiguous(), outs[i].contiguous(),
                    lses[i].contiguous(), 0.0, causal, scale=scale,
                )  # fmt: skip
                dq[i] += gq
                dk[j].add_(gk)
                dv[j].add_(gv)
            # the kv chunks and the gradients accumulated for them travel on together; after `world` hops the
            # gradients are back with the rank that owns those chunks
            if step < world - 1:
                kv = _sendrecv(kv, rank, world)
            dkv = _sendrecv(dkv, rank, world)
        dq = torch.cat(dq, dim=2).to(q.dtype)
        return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


class ContextParallelAttention:
    """Attention function for `Attention.attend_fn`: ring attention over the context-parallel ranks."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, q, k, v, plan, *, scale: float, window: int = 0, chunk: int = 0):
        # `plan` is ignored: a shard's positions jump (head + tail chunk) by design; rows are single sequences
        # (data.document_masking = false), which the config check enforces.
        if window or chunk:
            raise NotImplementedError("context parallel supports full causal attention layers only")
        return RingAttention.apply(q, k, v, scale, self.rank, self.world)


def apply_context_parallel(model: Transformer, rank: int, world: int) -> None:
    if model.config.is_mla:  # MLA attends through its own path: patching Attention alone would leave it local-only
        raise ConfigError("parallel.cp > 1 is not implemented for MLA attention (DeepSeek-style kv_lora_rank > 0); "
                          "use parallel.cp = 1")  # fmt: skip
    for m in model.modules():
        if isinstance(m, Attention):
            m.attend_fn = ContextParallelAttention(rank, world)
