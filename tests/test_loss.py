"""The training loss: cross-entropy fused with the output projection, in chunks, equals
F.cross_entropy(x @ w.T, targets, reduction="sum") in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from longmoe import kernels
from longmoe.model import IGNORE, ModelConfig, Transformer, cross_entropy_sum
from longmoe.model import loss as loss_mod


def reference(x, w, t):
    x, w = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    loss = F.cross_entropy(x @ w.T, t, reduction="sum", ignore_index=IGNORE)
    (loss * 0.7).backward()
    return loss.detach(), x.grad, w.grad


def fused(x, w, t):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = cross_entropy_sum(x, w, t)
    (loss * 0.7).backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("chunk", [4096, 512, 333])  # one chunk, several, several not dividing the rows
def test_fp32_equals_cross_entropy_of_the_logits(monkeypatch, chunk):
    monkeypatch.setattr(loss_mod, "CHUNK", chunk)
    torch.manual_seed(0)
    x, w = torch.randn(2500, 64), torch.randn(1000, 64) * 0.1
    t = torch.randint(0, 1000, (2500,))
    t[::7] = IGNORE  # rows without a loss
    (l1, gx1, gw1), (l2, gx2, gw2) = fused(x, w, t), reference(x, w, t)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-5)
    assert gx1[::7].abs().max() == 0  # ignored rows get no gradient
    with torch.no_grad():
        assert torch.equal(cross_entropy_sum(x, w, t), l1)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_bf16_within_rounding_of_fp32(monkeypatch, use_kernel):
    """bf16 inputs (the kernel path on CPUs that have it, and the PyTorch path): loss within 1e-5 relative of the
    fp32 reference on the same inputs (logits are rounded to bf16 first); gradients within 2% of their scale."""
    if not use_kernel:
        monkeypatch.setattr(kernels, "cross_entropy_rows", lambda *a: None)
    monkeypatch.setattr(loss_mod, "CHUNK", 700)
    torch.manual_seed(1)
    x, w = torch.randn(2000, 128).bfloat16(), (torch.randn(3000, 128) * 0.1).bfloat16()
    t = torch.randint(0, 3000, (2000,))
    t[5:50] = IGNORE
    (l1, gx1, gw1), (l2, gx2, gw2) = fused(x, w, t), reference(x, w, t)
    assert gx1.dtype == torch.bfloat16 and gw1.dtype == torch.bfloat16
    assert abs(l1.item() - l2.item()) / l2.item() < 1e-4
    assert (gx1.float() - gx2).abs().max() < 0.02 * gx2.abs().max()
    assert (gw1.float() - gw2).abs().max() < 0.02 * gw2.abs().max()


def test_model_with_targets_returns_the_summed_loss_and_its_gradients():
    cfg = ModelConfig.from_dict(dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                     head_dim=16, intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=32), "model")  # fmt: skip
    torch.manual_seed(2)
    model = Transformer(cfg)
    model.init_weights(seed=2)
    ids = torch.randint(0, 300, (2, 40))
    targets = torch.randint(0, 300, (2, 40))
    targets[0, :10] = IGNORE
    out = model(ids, targets=targets)
    assert out.logits is None and len(out.router_logits) == 2
    out.loss_sum.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids).logits
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE)
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-6, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_model_rejects_targets_of_the_wrong_shape_or_with_a_cache():
    cfg = ModelConfig.from_dict(dict(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                     head_dim=16, intermediate_size=64), "model")  # fmt: skip
    model = Transformer(cfg)
    ids = torch.randint(0, 50, (2, 8))
    with pytest.raises(ValueError, match=r"targets must have the input's shape \[B, T\] = \[2, 8\], got \[2, 7\]"):
        model(ids, targets=ids[:, 1:])
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        model(ids, targets=ids, cache=object())
