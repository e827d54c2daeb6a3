"""Feed-forward layers: the SwiGLU MLP and the dropless token-choice mixture of experts.

MoE = Router -> Dispatch (stable sort of (token, slot) pairs by expert) -> GroupedExperts -> Combine (index_add).
Expert weights use the fused layout of transformers v5: gate_up_proj [E, 2I, H] (gate rows first), down_proj
[E, H, I]. Router scores are computed in fp32; the selection bias only picks experts, never weights them.

Shape suffixes: N tokens, H hidden, E experts, K experts per token, I expert width, M = N*K routed pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .config import ModelConfig


class Linear(nn.Linear):
    """nn.Linear that decodes (a few bf16 rows on CPU) through longmoe.kernels' streaming GEMV."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense FFN and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        h = kernels.silu_mul(gate, up)  # bf16 inference: one pass, same rounding
        return self.down_proj(F.silu(gate) * up if h is None else h)


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.router_bias:
            # Selection-only bias (DeepSeek-V3 `e_score_correction_bias`, aux-loss-free balancing). Kept in fp32.
            self.register_buffer("selection_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.selection_bias = None

    def forward(self, x_NH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> logits [N, E] fp32, weights [N, K] fp32, experts [N, K] int64."""
        c = self.config
        logits_NE = F.linear(x_NH.float(), self.weight.float())
        scores_NE = logits_NE.softmax(-1) if c.score_func == "softmax" else logits_NE.sigmoid()
        choice_NE = scores_NE if self.selection_bias is None else scores_NE + self.selection_bias
        if c.n_group > 1:
            groups = choice_NE.view(-1, c.n_group, c.num_experts // c.n_group)  # [N, G, E/G]
            if c.group_score == "top2_sum":
                group_scores = groups.topk(2, dim=-1).values.sum(-1)  # [N, G]
            else:
                group_scores = groups.amax(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(c.topk_group, dim=-1).indices, True)
            choice_NE = groups.masked_fill(~keep[..., None], float("-inf")).view_as(choice_NE)
        experts_NK = choice_NE.topk(c.num_experts_per_tok, dim=-1).indices
        weights_NK = scores_NE.gather(1, experts_NK)
        if c.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
        return logits_NE, weights_NK * c.routed_scaling_factor, experts_NK


SMALL_DISPATCH = 64  # routed (token, expert) pairs up to which the per-expert loop beats grouped_mm on CPU


def grouped_mm_supported(*dims: int) -> bool:
    # torch >= 2.9 has a CPU/SM80 fallback; the kernels need 16-byte aligned rows (8 bf16 / 4 fp32 elements).
    return hasattr(F, "grouped_mm") and all(d % 8 == 0 for d in dims)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.impl = "grouped" if grouped_mm_supported(hidden_size, intermediate_size) else "loop"

    def forward(self, x_MH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_MH: routed tokens sorted by expert, counts_E tokens per expert -> expert outputs [M, H]."""
        # Few routed tokens (decode): the loop touches only the experts in use; grouped_mm's CPU fallback pays for
        # every expert, empty or not.
        if self.impl == "loop" or (x_MH.device.type == "cpu" and x_MH.shape[0] <= SMALL_DISPATCH):
            return self.forward_loop(x_MH, counts_E)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(x_MH, self.gate_up_proj.transpose(-2, -1), offs=offs_E).chunk(2, dim=-1)
        h = kernels.silu_mul(gate, up)  # bf16 inference: one pass, same rounding
        return F.grouped_mm(F.silu(gate) * up if h is None else h, self.down_proj.transpose(-2, -1), offs=offs_E)

    def forward_loop(self, x_MH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The readable reference: one SwiGLU per expert over its contiguous slice of tokens."""
        out = torch.empty_like(x_MH)
        start = 0
        for e, n in enumerate(counts_E.tolist()):  # NOTE: host sync for the split sizes
            if n == 0:
                continue
            x = x_MH[start : start + n]
            gate, up = kernels.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            out[start : start + n] = kernels.linear(F.silu(gate) * up, self.down_proj[e])
            start += n
        return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = (
            MLP(config.hidden_size, config.shared_expert_intermediate_size)
            if config.shared_expert_intermediate_size
            else None
        )
        self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        # Tokens routed to each expert while training; read and reset by `update_selection_bias` (outside forward).
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts), persistent=False)
        # Seam for parallelism applied from outside: a callable(moe, x_NH, weights_NK, experts_NK) -> out_NH
        # replaces the local dispatch (expert parallel, longmoe.train.parallel).
        self.dispatcher = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (out [B, T, H], router logits [B*T, E] fp32, chosen experts [B*T, K])."""
        shape = x.shape
        x_NH = x.reshape(-1, shape[-1])
        logits_NE, weights_NK, experts_NK = self.router(x_NH)
        if self.training:
            E = self.config.num_experts
            self.tokens_per_expert += torch.histc(experts_NK.flatten().float(), bins=E, min=0, max=E)

        if self.dispatcher is not None:
            out_NH = self.dispatcher(self, x_NH, weights_NK, experts_NK)
        elif self.training or experts_NK.numel() > SMALL_DISPATCH or x.device.type != "cpu":
            out_NH = self._dispatch(x_NH, weights_NK, experts_NK)
        else:
            out_NH = self._few_tokens(x_NH, weights_NK, experts_NK)
        if self.shared_expert is not None:
            shared = self.shared_expert(x_NH)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x_NH)) * shared
            out_NH = out_NH + shared
        return out_NH.view(shape), logits_NE, experts_NK

    def _dispatch(self, x_NH: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        K, E = experts_NK.shape[1], self.config.num_experts
        # Dispatch: sort the N*K (token, slot) pairs by expert; stable, so tokens keep their order within an expert.
        experts_M = experts_NK.flatten()
        order_M = experts_M.argsort(stable=True)
        token_M = order_M // K
        counts_E = torch.histc(experts_M.float(), bins=E, min=0, max=E).to(torch.int64)  # no host sync
        weight_M1 = weights_NK.flatten()[order_M, None]  # fp32

        x_MH = x_NH[token_M]
        if self.config.weight_on_input:
            x_MH = (x_MH * weight_M1).to(x_NH.dtype)
        y_MH = self.experts(x_MH, counts_E)
        fused = kernels.moe_combine(y_MH, order_M, weights_NK, not self.config.weight_on_input)  # bf16 inference
        if fused is not None:
            return fused
        if not self.config.weight_on_input:
            y_MH = (y_MH * weight_M1).to(x_NH.dtype)
        # Combine: scatter each pair's output back onto its token (index_add_ is deterministic on CPU).
        return torch.zeros_like(x_NH).index_add_(0, token_M, y_MH)

    def _few_tokens(self, x_NH: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
        """Decode: a handful of (token, expert) pairs. Same arithmetic and summation order as `_dispatch` (experts in
        increasing id), without the sort/histogram/gather machinery whose fixed cost dominates at this size. bf16 on
        CPU runs it as one kernel call with the same rounding points; the loop below is the reference for it."""
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        fused = kernels.moe_decode(x_NH, weights_NK, experts_NK, gate_up, down, self.config.weight_on_input)
        if fused is not None:
            return fused
        pairs: dict[int, list[tuple[int, int]]] = {}
        for t, row in enumerate(experts_NK.tolist()):  # NOTE: host sync; fine at decode sizes on CPU
            for j, e in enumerate(row):
                pairs.setdefault(e, []).append((t, j))
        out_NH = torch.zeros_like(x_NH)
        for e in sorted(pairs):
            ts, js = zip(*pairs[e])
            w = weights_NK[ts, js][:, None]  # [n, 1] fp32
            x = x_NH[list(ts)]
            if self.config.weight_on_input:
                x = (x * w).to(x_NH.dtype)
            gate, up = kernels.linear(x, gate_up[e]).chunk(2, dim=-1)
            y = kernels.linear(F.silu(gate) * up, down[e])
            if not self.config.weight_on_input:
                y = (y * w).to(x_NH.dtype)
            if len(ts) == 1:
                out_NH[ts[0]] += y[0]
            else:
                out_NH.index_add_(0, torch.tensor(ts, device=y.device), y)
        return out_NH


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int, score_func: str = "softmax") -> torch.Tensor:
    """Switch-Transformer balance loss (eqs. 4-6) pooled over layers, as transformers' `load_balancing_loss_func`:
    E * sum_e f_e * P_e, with f_e = share of routed slots to expert e (sums to top_k) and P_e = mean router
    probability. Equals top_k at perfect balance. Scores come from the raw logits, so no double softmax."""
    E = router_logits[0].shape[-1]
    counts = torch.zeros(E, device=router_logits[0].device)
    prob_sum = torch.zeros(E, device=router_logits[0].device)
    rows = 0
    for logits in router_logits:
        probs = router_probs(logits, score_func)
        chosen = probs.topk(top_k, dim=-1).indices
        counts = counts + torch.histc(chosen.flatten().float(), bins=E, min=0, max=E)
        prob_sum = prob_sum + probs.sum(0)
        rows += probs.shape[0]
    return E * torch.sum((counts / rows) * (prob_sum / rows))


def router_probs(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "softmax":
        return logits.float().softmax(-1)
    s = logits.float().sigmoid()  # DeepSeek's balance terms use sigmoid scores normalised per token
    return s / s.sum(-1, keepdim=True)


def z_loss(router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    return torch.stack([torch.logsumexp(x.float(), dim=-1).square().mean() for x in router_logits]).mean()


@torch.no_grad()
def update_selection_bias(model: nn.Module, rate: float = 1e-3) -> None:
    """Aux-loss-free balancing (arXiv 2408.15664): nudge each expert's selection bias toward the mean load by a sign
    step, centred so the biases do not drift, then reset the counts. Call after the optimizer step (or from an
    optimizer pre-step hook) with counts all-reduced across data-parallel ranks."""
    for m in model.modules():
        if isinstance(m, MoE) and m.router.selection_bias is not None:
            c = m.tokens_per_expert
            if c.sum() == 0:
                continue
            delta = rate * torch.sign(c.mean() - c)
            m.router.selection_bias += delta - delta.mean()
            c.zero_()
