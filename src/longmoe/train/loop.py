"""The training loop: AdamW with warmup + cosine, clipping, accumulation, bf16 with fp32 master weights, activation
checkpointing, MoE balancing terms, a context-length schedule; metrics to JSONL and TensorBoard; atomic, exactly
resumable checkpoints; an export the engine loads. One process, or many under torchrun (see parallel.py)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from ..checkpoint import load as load_checkpoint
from ..checkpoint import native, save
from ..checkpoint.safetensors_io import atomic_write_bytes
from ..errors import TrainError
from ..model.config import ModelConfig
from ..model.loss import IGNORE
from ..model.moe import MoE, router_probs, update_selection_bias
from ..model.rope import RotaryEmbedding
from ..model.transformer import Transformer
from ..progress import Progress
from .config import Stage, TrainConfig, stages, to_dict, validate
from .data import Batches, eos_id, make_tokenizer
from .parallel import (
    Dist,
    all_reduce_sum,
    apply_context_parallel,
    apply_expert_parallel,
    apply_fsdp,
    cp_shard,
    init_distributed,
    sync_replicated_grads,
)
from .precision import MasterWeights
from .tb import EventWriter


def measured_peak_flops(dtype: torch.dtype) -> float:
    """FLOP/s of a large matmul in the training dtype on this machine: the MFU denominator."""
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * 2048**3 / (time.perf_counter() - t)


def flops_per_token(config: ModelConfig, active: int, seq_len: int, outputs: int | None = None) -> float:
    """Training FLOPs per row position: 6 x active non-embedding parameters + causal attention (6 x seq_len x heads
    x qk dim per layer; a sliding or chunked layer sees only its window). With `outputs` (long synthetic rows), the
    last layer and the output projection run on the last `outputs` positions only, and are counted only there."""
    L, V, H = config.num_layers, config.vocab_size, config.hidden_size
    per_layer = (active - V * H * (1 if config.tie_word_embeddings else 2)) / L
    tail = 1.0 if outputs is None else outputs / seq_len  # the share of positions that run the last layer
    total = 6 * V * H * tail  # the output projection is a real matmul
    for i, kind in enumerate(config.layer_types):
        span = {"sliding": config.sliding_window, "chunked": config.attention_chunk_size}.get(kind, seq_len)
        share = tail if i == L - 1 else 1.0
        total += share * 6 * (per_layer + min(span, seq_len) * config.num_heads * config.qk_head_dim)
    return total


def lr_at(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


RUN_FILES = ("checkpoints", "metrics.jsonl", "export", "tb", "config.json")  # what a run writes
RUN_EVIDENCE = ("checkpoints", "metrics.jsonl", "export")  # what makes a directory hold a run worth keeping


def check_run_directory(out: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Before anything is written: never train over an earlier run by accident, never resume a different model."""
    existing = [n for n in RUN_EVIDENCE if (out / n).exists()] if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; give a directory")
    if resume:
        if overwrite:
            raise TrainError("--resume and --overwrite contradict each other: pick one")
        if latest_checkpoint(out / "checkpoints") is None:
            raise TrainError(f"--resume: no complete checkpoint under {out / 'checkpoints'}; start without --resume")
        saved = _saved_config(out)
        changed = _changed_settings(saved, to_dict(cfg)) if saved is not None else []
        if changed:
            raise TrainError(
                f"--resume: {out} was trained with different {', '.join(changed)}; a checkpoint only resumes the "
                "model it was written for. Use the run's own settings, or a new --out"
            )
    elif existing and not overwrite:
        raise TrainError(
            f"--out {out} already holds a training run ({', '.join(existing)}): continue it with --resume, train "
            "into a new --out, or pass --overwrite to discard it"
        )


def _changed_settings(saved: dict, now: dict) -> list[str]:
    """What a checkpoint cannot be resumed under: the model's shape, its initialisation, dtype and tokenizer."""
    before, after = saved.get("model") or {}, now.get("model") or {}
    out = [f"model.{k}" for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    out += [k for k in ("init", "dtype") if saved.get(k) != now.get(k)]
    if (saved.get("data") or {}).get("tokenizer") != now["data"]["tokenizer"]:
        out.append("data.tokenizer")
    return out


def _saved_config(out: Path) -> dict | None:
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


class Trainer:
    def __init__(
        self, cfg: TrainConfig, out: str | Path, *, resume: bool = False, quiet: bool = False, overwrite: bool = False
    ):
        self.cfg, self.out, self.quiet = cfg, Path(out), quiet
        self.dist: Dist = init_distributed()
        validate(cfg, self.dist.world)
        d, p = self.dist, cfg.parallel
        self.ep = p.ep if d.world > 1 else 1
        self.cp = p.cp if d.world > 1 else 1
        self.dp = d.world // self.cp  # ranks that see different rows
        if d.main:
            check_run_directory(self.out, cfg, resume, overwrite)
            if overwrite and not resume:
                for name in RUN_FILES:
                    target = self.out / name
                    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                (self.out / "tokenizer.json").unlink(missing_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.out / "config.json", json.dumps(to_dict(cfg), indent=2).encode())
        self._barrier()
        torch.manual_seed(cfg.seed)

        # tokenizer and model
        if cfg.init and (Path(cfg.init) / "tokenizer.json").exists() and not Path(cfg.data.tokenizer).is_file():
            cfg.data.tokenizer = str(Path(cfg.init) / "tokenizer.json")  # an imported model keeps its tokenizer
        self.tokenizer = make_tokenizer(cfg.data, self.out) if d.main else None
        self._barrier()
        if not d.main:
            from ..tokenizer import Tokenizer

            self.tokenizer = Tokenizer(self.out / "tokenizer.json")
        if cfg.init:
            self.model = load_checkpoint(cfg.init, dtype="float32", check_memory=False).model
        else:
            model_cfg = dict(cfg.model)
            if not model_cfg.get("vocab_size"):
                model_cfg["vocab_size"] = -(-self.tokenizer.vocab_size // 8) * 8
            self.model = Transformer(ModelConfig.from_dict(model_cfg, "model"))
            self.model.init_weights(std=0.02, seed=cfg.seed)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens, the model {self.model.config.vocab_size}"
            )
        self.config = self.model.config
        self.flops_per_token = partial(flops_per_token, self.config, self.model.num_parameters()[1])
        self.stages = stages(cfg)
        self.stage: Stage | None = None
        self.synthetic_lengths = cfg.data.synthetic_lengths  # the current stage's
        self.model.train()

        # parallelism, from the outside in
        self.expert_params: list[torch.nn.Parameter] = []
        if self.ep > 1:
            self.expert_params = apply_expert_parallel(self.model, d.rank, d.world)
        if self.cp > 1:
            apply_context_parallel(self.model, d.rank, d.world)
        if cfg.activation_checkpointing:
            for block in self.model.layers:
                block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        self.fsdp = d.world > 1 and p.dp == "fsdp"
        bf16 = cfg.dtype == "bfloat16"
        ep_ids = {id(x) for x in self.expert_params}
        # bf16: parameters FSDP holds are gathered in bf16 from fp32 shards (the masters); the others become bf16
        # with fp32 masters here. The optimizer, clipping and gradient sums all work on the fp32 tensors.
        own = {n: x for n, x in self.model.named_parameters() if not self.fsdp or id(x) in ep_ids}
        self.masters = MasterWeights(own if bf16 else {})
        if self.fsdp:
            apply_fsdp(self.model, set(self.expert_params), torch.bfloat16 if bf16 else None)
        self.params = [self.masters.master(x) for x in self.model.parameters()]  # what the optimizer updates
        self.expert_params = [self.masters.master(x) for x in self.expert_params]
        ep_ids = {id(x) for x in self.expert_params}
        self.replicated = [] if self.fsdp or d.world == 1 else [x for x in self.params if id(x) not in ep_ids]
        self.loss_scale = d.world if self.fsdp else 1  # FSDP averages gradients; we want them summed

        decay = [x for x in self.params if x.ndim >= 2]
        no_decay = [x for x in self.params if x.ndim < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), fused=True,  # one pass over each tensor: ~7x the for-loop form on CPU
        )  # fmt: skip
        self.data = Batches(cfg.data, self.tokenizer)
        self.step = 0
        self.peak = measured_peak_flops(torch.bfloat16 if bf16 else torch.float32)
        if resume:
            self._resume()
        self.metrics_path = self.out / "metrics.jsonl"
        self.tb = EventWriter(self.out / "tb") if d.main else None

    def close(self) -> None:
        """Flush logs and leave the process group together (a rank exiting mid-collective aborts the others)."""
        if self.tb is not None:
            self.tb.close()
        if self.dist.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    def _apply_stage(self) -> int:
        stage = [s for s in self.stages if s.start_step <= self.step][-1]
        if stage is not self.stage:
            c = self.config
            if stage.rope_theta:
                c.rope_theta = stage.rope_theta
            if stage.rope_scaling is not None:
                c.rope_scaling = stage.rope_scaling or None
            if stage.rope_theta or stage.rope_scaling is not None:
                self.model.rotary = RotaryEmbedding(c)
            if stage.seq_len > c.max_position_embeddings:
                c.max_position_embeddings = stage.seq_len
            # each setting from the latest stage that set it (stage 0 sets them all): the same after a resume
            latest = lambda name: next(getattr(s, name) for s in reversed(self.stages)  # noqa: E731
                                       if s.start_step <= self.step and getattr(s, name) is not None)  # fmt: skip
            self.synthetic_lengths = latest("synthetic_lengths")
            self.data.cfg = replace(self.cfg.data, retrieval_facts=latest("retrieval_facts"),
                                    retrieval_repeat_digits=latest("retrieval_repeat_digits"))
            self.stage = stage
        return stage.seq_len

    def _local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a global batch: its rows (data/expert parallel) or its chunks (context parallel)."""
        d = self.dist
        if self.cp > 1:  # (a shard's positions are no tail: "outputs" is dropped, the last layer runs everywhere)
            return {k: cp_shard(v, d.rank, d.world) for k, v in batch.items() if torch.is_tensor(v)}
        if self.dp > 1:
            n = batch["input_ids"].shape[0] // self.dp
            return {k: v[d.rank * n : (d.rank + 1) * n] if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch

    def _loss(
        self, batch: dict[str, torch.Tensor], global_targets: float, n_micro: int = 1
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        targets = batch["targets"].masked_fill(~batch["mask"], IGNORE)
        out = self.model(batch["input_ids"], batch["positions"], targets=targets, outputs=batch.get("outputs"))
        ce_sum = out.loss_sum
        loss = ce_sum / global_targets
        stats: dict[str, Any] = {"ce_sum": ce_sum.detach()}
        if out.router_logits and cfg.balance != "none":
            aux, z, entropy = self._balance_terms(out.router_logits, out.router_experts)
            stats.update(aux=aux.detach(), z=z.detach(), entropy=entropy)
            if cfg.balance == "aux_loss":
                loss = loss + (cfg.aux_loss_coef * aux + cfg.z_loss_coef * z) / n_micro
        return loss * self.loss_scale, stats

    def _after_backward(self) -> None:
        """Make every gradient the sum over ranks: all-reduce the replicated ones; undo the FSDP loss scale on
        the expert shards, which FSDP leaves alone."""
        if self.replicated:
            sync_replicated_grads(self.replicated, self.dist.world)
        if self.loss_scale != 1:
            for p in self.expert_params:
                if p.grad is not None:
                    p.grad.div_(self.loss_scale)

    def _balance_terms(
        self, router_logits: list[torch.Tensor], router_experts: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Switch load-balancing loss with expert counts over the global batch (all ranks), pooled over layers
        as transformers does (equals top_k at balance), router z-loss, and router entropy (for the logs). The counts
        are of the experts actually chosen (after any selection bias and group limits), not a fresh top-k."""
        c, world = self.config, self.dist.world
        E = c.num_experts
        counts = torch.zeros(E)
        prob_sum = torch.zeros(E)
        z_sum = torch.zeros(())
        entropy = 0.0
        rows = 0
        for logits, chosen in zip(router_logits, router_experts):
            probs = router_probs(logits, c.score_func)
            counts += torch.histc(chosen.flatten().float(), bins=E, min=0, max=E)
            prob_sum = prob_sum + probs.sum(0)
            z_sum = z_sum + torch.logsumexp(logits.float(), dim=-1).square().sum()
            entropy += -(probs.detach() * probs.detach().clamp_min(1e-12).log()).sum(-1).mean().item()
            rows += probs.shape[0]
        # aux-free balancing sums over ranks too; the CP/EP/DP ranks each see a part of the global batch
        total = all_reduce_sum(torch.tensor([float(rows)]), world).item()
        counts = all_reduce_sum(counts, world)
        aux = E * torch.sum((counts / total) * (prob_sum / total))
        z = z_sum / total
        return aux, z, entropy / len(router_logits)

    # ------------------------------------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> None:
        cfg, d = self.cfg, self.dist
        last = min(cfg.steps, stop_at) if stop_at else cfg.steps
        progress = Progress(cfg.steps, "train", start=self.step, enabled=d.main and not self.quiet)
        while self.step < last:
            seq_len = self._apply_stage()
            for g in self.optimizer.param_groups:
                g["lr"] = lr_at(self.step, cfg)
            t0 = time.perf_counter()
            micro = [self.data.next(cfg.batch_size, seq_len) for _ in range(cfg.grad_accum)]
            weights = [1.0] * len(micro)
            if cfg.data.synthetic_rows:
                micro.append(self.data.next_synthetic(self.synthetic_lengths))
                weights.append(cfg.data.synthetic_weight)
            # the same on every rank (global batches); a batch with no targets at all contributes nothing
            global_targets = max(sum(w * float(b["mask"].sum()) for w, b in zip(weights, micro)), 1.0)
            totals: dict[str, Any] = {"ce_sum": 0.0, "aux": 0.0, "z": 0.0, "entropy": 0.0, "syn_sum": 0.0}
            for batch, w in zip(micro, weights):
                loss, stats = self._loss(self._local(batch), global_targets / w, len(micro))
                loss.backward()
                self.masters.grads_to_master()
                if "outputs" in batch:  # the synthetic micro-batch: logged apart from the text loss
                    totals["syn_sum"] += float(stats.pop("ce_sum"))
                for k, v in stats.items():
                    totals[k] += float(v) / (1 if k == "ce_sum" else len(micro))
            self._after_backward()
            grad_norm = self._clip()
            if not math.isfinite(grad_norm):  # (the norm is global: every rank stops here together)
                self._stop_non_finite(grad_norm, totals)
            load = self._expert_load()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.masters.copy_to_model()
            if cfg.balance == "aux_free":
                for m in self.model.modules():
                    if isinstance(m, MoE):
                        m.tokens_per_expert.copy_(all_reduce_sum(m.tokens_per_expert, d.world))
                update_selection_bias(self.model, cfg.bias_update_rate)
            for m in self.model.modules():
                if isinstance(m, MoE):
                    m.tokens_per_expert.zero_()
            dt = time.perf_counter() - t0
            self.step += 1

            text_targets = max(sum(float(b["mask"].sum()) for b in micro if "outputs" not in b), 1.0)
            ce = all_reduce_sum(torch.tensor(totals["ce_sum"]), d.world).item() / text_targets
            tokens = cfg.batch_size * cfg.grad_accum * seq_len
            flops = self.flops_per_token(seq_len) * tokens
            if cfg.data.synthetic_rows:
                syn = micro[-1]
                tokens += syn["input_ids"].numel()
                tail = None if self.cp > 1 else syn["outputs"]  # (context parallel runs the last layer everywhere)
                flops += self.flops_per_token(syn["input_ids"].shape[1], tail) * syn["input_ids"].numel()
                synthetic = {"synthetic_loss": all_reduce_sum(torch.tensor(totals["syn_sum"]), d.world).item()
                             / max(float(syn["mask"].sum()), 1.0), "synthetic_len": syn["input_ids"].shape[1]}
            else:
                synthetic = {}
            row = {
                "step": self.step, "loss": ce, "lr": lr_at(self.step - 1, cfg), "grad_norm": grad_norm,
                "seq_len": seq_len, "tokens_per_s": tokens / dt,
                "mfu": flops / dt / (self.peak * d.world), **synthetic,
            }  # fmt: skip
            if load is not None:
                row.update(
                    aux_loss=totals["aux"], z_loss=totals["z"], router_entropy=totals["entropy"],
                    dead_experts=int(sum((torch.tensor(x) == 0).sum() for x in load)), expert_load=load,
                )  # fmt: skip
            evaluate = cfg.eval_every and cfg.data.heldout_percent > 0
            if evaluate and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                row["heldout_loss"] = self.heldout_loss()
            self._log(row)
            info = f"loss {ce:.3f}" + (f" held-out {row['heldout_loss']:.3f}" if "heldout_loss" in row else "")
            if synthetic:
                info += f" synthetic {synthetic['synthetic_loss']:.3f}"
            progress.update(self.step, f"{info} | {row['tokens_per_s']:,.0f} tok/s | mfu {100 * row['mfu']:.1f}%")
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
        if self.step == last and (not cfg.save_every or self.step % cfg.save_every):
            self.save_checkpoint()
        if self.step == cfg.steps:
            self.export(self.out / "export")

    def _stop_non_finite(self, grad_norm: float, totals: dict[str, Any]) -> None:
        """A NaN/inf loss or gradient: stop before the update, so the weights and checkpoints stay the last good
        ones, and say where to continue from. No export is written."""
        self.optimizer.zero_grad(set_to_none=True)
        last = latest_checkpoint(self.ckpt_dir)
        where = (f"the last good checkpoint is {last} (lower optim.lr, then --resume)" if last
                 else "no checkpoint had been saved yet")  # fmt: skip
        loss = totals["ce_sum"] + totals["syn_sum"]
        raise TrainError(
            f"step {self.step + 1}: the loss ({loss:.4g} summed) or gradient norm ({grad_norm}) is not finite; "
            f"training stopped before this update and exported nothing; {where}"
        )

    def _clip(self) -> float:
        """Global gradient norm (FSDP and expert shards summed over ranks, replicated grads counted once), clipped."""
        ep_ids = {id(x) for x in self.expert_params}
        sharded, replicated = torch.zeros(()), torch.zeros(())
        grads = []
        for x in self.params:
            if x.grad is None:
                continue
            grads.append(x.grad)
            if hasattr(x.grad, "to_local"):
                sharded += x.grad.to_local().float().pow(2).sum()
            elif id(x) in ep_ids:
                sharded += x.grad.float().pow(2).sum()
            else:
                replicated += x.grad.float().pow(2).sum()
        norm = (all_reduce_sum(sharded, self.dist.world) + replicated).sqrt().item()
        clip = self.cfg.optim.grad_clip
        if clip > 0 and norm > clip:
            for g in grads:
                g.mul_(clip / (norm + 1e-6))
        return norm

    def _expert_load(self) -> list[list[float]] | None:
        loads = []
        for m in self.model.modules():
            if isinstance(m, MoE):
                c = all_reduce_sum(m.tokens_per_expert, self.dist.world)
                loads.append([round(x, 4) for x in (c / c.sum().clamp_min(1)).tolist()])
        return loads or None

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """Mean next-token loss on held-out documents (the same batches every time)."""
        self.model.eval()
        data = Batches(self.cfg.data, self.tokenizer, split="heldout")
        seq_len = self.stage.seq_len if self.stage else self.cfg.data.seq_len
        ce_sum, n = 0.0, 0.0
        for _ in range(self.cfg.eval_batches):
            batch = data.next(self.cfg.batch_size, seq_len)
            n += float(batch["mask"].sum())
            local = self._local(batch)
            targets = local["targets"].masked_fill(~local["mask"], IGNORE)
            ce_sum += float(self.model(local["input_ids"], local["positions"], targets=targets).loss_sum)
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, MoE):
                m.tokens_per_expert.zero_()
        return all_reduce_sum(torch.tensor(ce_sum), self.dist.world).item() / max(n, 1)

    def _log(self, row: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tb.scalars(row["step"], {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})
        if str(row["step"]) == os.environ.get("LONGMOE_TEST_HANG_AFTER_STEP"):  # tests kill -9 a run here, no race
            time.sleep(3600)

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints: one directory per step, written under a temporary name and renamed when complete

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write this step's checkpoint under a temporary name, then rename it into place: a crash or a full disk
        half-way leaves the previous checkpoint as the latest one."""
        try:
            return self._save_checkpoint()
        except OSError as e:
            shutil.rmtree(self.ckpt_dir / f".step-{self.step:06d}.tmp", ignore_errors=True)
            last = latest_checkpoint(self.ckpt_dir)
            kept = f"the previous checkpoint {last} is intact" if last else "no earlier checkpoint exists"
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise TrainError(
                f"saving the checkpoint of step {self.step} under {self.ckpt_dir} failed: {why}; {kept}. Free space "
                "(or fix the directory), then rerun with --resume"
            ) from None

    def _save_checkpoint(self) -> Path:
        d = self.dist
        final = self.ckpt_dir / f"step-{self.step:06d}"
        tmp = self.ckpt_dir / f".step-{self.step:06d}.tmp"
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        state = {
            "model": _to_local(self.model.state_dict()),
            "optim": _to_local(self.optimizer.state_dict()),
            "master": self.masters.state_dict(),
            "rng": torch.get_rng_state(),
        }
        _atomic_torch_save(state, tmp / f"rank-{d.rank:05d}.pt")
        self._barrier()
        if d.main:
            pause = float(os.environ.get("LONGMOE_TEST_SAVE_PAUSE", "0"))  # tests kill a save half-way
            if pause:
                time.sleep(pause)
            meta = {"step": self.step, "world": d.world, "parallel": to_dict(self.cfg)["parallel"],
                    "data": self.data.state_dict(), "config": self.config.to_dict()}  # fmt: skip
            atomic_write_bytes(tmp / "meta.json", json.dumps(meta).encode())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
            atomic_write_bytes(self.ckpt_dir / "latest", final.name.encode())
            done = sorted(p for p in self.ckpt_dir.glob("step-*") if (p / "meta.json").exists())
            for old in done[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def _resume(self) -> None:
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.ckpt_dir}")
        meta = json.loads((latest / "meta.json").read_text())
        if meta["world"] != self.dist.world or meta["parallel"] != to_dict(self.cfg)["parallel"]:
            raise ValueError(
                f"{latest} was written by {meta['world']} process(es) with parallel = {meta['parallel']}; "
                f"resume with the same layout (now {self.dist.world}, {to_dict(self.cfg)['parallel']})"
            )
        state = torch.load(latest / f"rank-{self.dist.rank:05d}.pt", weights_only=False)
        self.step = meta["step"]
        self.config.rope_theta = meta["config"]["rope_theta"]
        self.config.rope_scaling = meta["config"]["rope_scaling"]
        self.model.rotary = RotaryEmbedding(self.config)
        _load_local(self.model.state_dict(), state["model"])
        self.masters.load_state_dict(state.get("master", {}))
        self.optimizer.load_state_dict(_optim_state_from_local(self.optimizer, state["optim"]))
        torch.set_rng_state(state["rng"])
        self.data.load_state_dict(meta["data"])
        self.stage = None
        if self.dist.main:  # the log continues from the checkpoint: drop lines of steps that will be redone
            path = self.out / "metrics.jsonl"
            if path.exists():
                rows = [r for r in path.read_text().splitlines() if (_step_of(r) or self.step + 1) <= self.step]
                atomic_write_bytes(path, "".join(r + "\n" for r in rows).encode())

    # ------------------------------------------------------------------------------------------------------------
    def export(self, out: Path) -> None:
        """Write the full model in longmoe's native format (+ tokenizer), loadable by `longmoe.load`."""
        full = {}
        ep_ids = {id(x) for x in self.expert_params}
        named = {n: self.masters.master(x) for n, x in self.model.named_parameters()}  # fp32 where bf16 trains
        for name, t in self.model.state_dict().items():
            t = named.get(name, t)
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            elif name in named and id(named[name]) in ep_ids:
                parts = [torch.empty_like(t) for _ in range(self.dist.world)]
                dist.all_gather(parts, t.detach().contiguous())
                t = torch.cat(parts)
            full[name] = t.detach()
        if not self.dist.main:
            return
        model = Transformer(self.config)
        model.load_state_dict(full)
        save(native(model), out)
        atomic_write_bytes(out / "tokenizer.json", (self.out / "tokenizer.json").read_bytes())
        gen = {"eos_token_id": eos_id(self.tokenizer)}
        atomic_write_bytes(out / "generation_config.json", json.dumps(gen).encode())


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line torn by a kill mid-write (it is dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    pointer = ckpt_dir / "latest"
    if pointer.exists() and (ckpt_dir / pointer.read_text().strip() / "meta.json").exists():
        return ckpt_dir / pointer.read_text().strip()
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "meta.json").exists())
    return done[-1] if done else None


def _to_local(obj: Any) -> Any:
    """DTensors (FSDP2 shards) -> their local tensors, recursively, for a per-rank torch.save."""
    if hasattr(obj, "to_local"):
        return obj.to_local().clone()
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_local(v) for v in obj]
    return obj


def _load_local(current: dict[str, Any], saved: dict[str, Any]) -> None:
    with torch.no_grad():
        for k, t in current.items():
            (t.to_local() if hasattr(t, "to_local") else t).copy_(saved[k])


def _optim_state_from_local(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """Saved (local) optimizer state -> state for the live optimizer, re-wrapping moments of FSDP-sharded
    parameters as DTensors with their parameter's layout."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, st in saved["state"].items():
        p = params[int(i)]
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import DTensor

            st = {
                k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                if torch.is_tensor(v) and v.ndim > 0 else v
                for k, v in st.items()
            }  # fmt: skip
        state[i] = st
    return {"state": state, "param_groups": saved["param_groups"]}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
