"""Next-token cross-entropy fused with the output projection, in chunks of rows.

The [N, V] logits (and their fp32 copy and gradient) are never materialised: each chunk of rows computes its
logits, its loss and, when gradients are wanted, its logit gradient (softmax - one-hot) at once, which goes straight
into the input and weight gradients. Backward then only scales those by the incoming gradient (the loss is a sum,
so that is a scalar). Rows whose target is IGNORE are skipped entirely. Same math as
`F.cross_entropy(x @ w.T, targets, reduction="sum")`: logits in the input dtype, softmax in fp32.
"""

from __future__ import annotations

import torch

from .. import kernels

IGNORE = -100  # the target of a row that has no loss (as F.cross_entropy's ignore_index)
CHUNK = 1024  # rows per chunk: a 1024 x 32000 fp32 slab is 131 MB


def _chunked(x_NC: torch.Tensor, w_VC: torch.Tensor, t_N: torch.Tensor, grads: bool):
    """-> (loss sum fp32 [], grad x [N, C] or None, grad w [V, C] fp32 or None)."""
    rows = (t_N != IGNORE).nonzero().flatten()
    loss = torch.zeros((), dtype=torch.float32, device=x_NC.device)
    gx_NC = torch.zeros_like(x_NC) if grads else None
    gw_VC = torch.zeros(w_VC.shape, dtype=torch.float32, device=w_VC.device) if grads else None
    for r in rows.split(CHUNK):
        x_nC, t_n = x_NC[r], t_N[r]
        logits_nV = x_nC @ w_VC.T
        loss_n = kernels.cross_entropy_rows(logits_nV, t_n, grads)  # bf16 on CPU: logits_nV becomes the gradient
        if loss_n is not None:
            g_nV = logits_nV
        else:
            logp_nV = torch.log_softmax(logits_nV, dim=-1, dtype=torch.float32)
            picked = torch.arange(len(r), device=r.device)
            loss_n = -logp_nV[picked, t_n]
            if grads:
                g_nV = logp_nV.exp_()  # softmax
                g_nV[picked, t_n] -= 1.0
                g_nV = g_nV.to(x_NC.dtype)
        loss += loss_n.sum()
        if grads:
            gx_NC[r] = g_nV @ w_VC
            gw_VC += g_nV.T @ x_nC  # accumulated in fp32
    return loss, gx_NC, gw_VC


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NC: torch.Tensor, w_VC: torch.Tensor, t_N: torch.Tensor) -> torch.Tensor:
        loss, gx_NC, gw_VC = _chunked(x_NC, w_VC, t_N, grads=True)
        ctx.save_for_backward(gx_NC, gw_VC)
        ctx.w_dtype = w_VC.dtype
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gx_NC, gw_VC = ctx.saved_tensors
        gx = (gx_NC * g).to(gx_NC.dtype) if ctx.needs_input_grad[0] else None
        gw = (gw_VC * g).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None


def cross_entropy_sum(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over rows of -log softmax(x @ weight.T)[target]; x [..., C], weight [V, C], targets [...] (IGNORE: no
    loss). Differentiable in x and weight; fp32 scalar."""
    x_NC, t_N = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _FusedCrossEntropy.apply(x_NC, weight, t_N)
    return _chunked(x_NC, weight, t_N, grads=False)[0]
