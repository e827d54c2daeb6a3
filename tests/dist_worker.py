"""Run under torchrun by test_distributed.py: one training micro-step with the given parallel layout; rank 0 saves
the loss and the full gradients (shards gathered) for comparison with a single process on the same batch."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from longmoe.model.moe import MoE
from longmoe.train.config import from_dict
from longmoe.train.loop import Trainer
from longmoe.train.parallel import all_reduce_sum, exit_worker


def step_grads(trainer: Trainer, route_to_first: bool) -> tuple[float, dict[str, torch.Tensor]]:
    if route_to_first:  # every token picks experts 0 and 1: with 2 ranks, rank 1's experts get zero tokens
        for m in trainer.model.modules():
            if isinstance(m, MoE):
                with torch.no_grad():
                    m.router.selection_bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
    cfg = trainer.cfg
    batch = trainer.data.next(cfg.batch_size, cfg.data.seq_len)
    loss, _ = trainer._loss(trainer._local(batch), float(batch["mask"].sum()))
    loss.backward()
    trainer.masters.grads_to_master()  # bf16: gradients move to the fp32 masters, as in Trainer.train
    trainer._after_backward()
    world = trainer.dist.world
    loss = loss / trainer.loss_scale
    expert_ids = {id(p) for p in trainer.expert_params}
    grads = {}
    for name, p in trainer.model.named_parameters():
        p = trainer.masters.master(p)
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        elif id(p) in expert_ids:
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous())
            g = torch.cat(parts)
        grads[name] = g.detach().clone()
    return all_reduce_sum(loss.detach(), world).item(), grads


if __name__ == "__main__":
    out, raw, route = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "route_to_first"
    trainer = Trainer(from_dict(raw), out, quiet=True)
    loss, grads = step_grads(trainer, route)
    if trainer.dist.main:
        torch.save({"loss": loss, "grads": grads}, out / "result.pt")
    trainer.close()
    exit_worker(0)
