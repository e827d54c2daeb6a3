"""Training: config checks, the tiny preset learning the needle task, exact resume after SIGKILL, crash-safe saves,
TensorBoard files, the context-length schedule, continued pretraining of an imported checkpoint."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import longmoe
from longmoe.model.config import ConfigError
from longmoe.tasks import needle_task
from longmoe.train.config import load_config, validate
from longmoe.train.loop import latest_checkpoint

SMALL = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.head_dim=16",
    "model.intermediate_size=128", "model.moe_intermediate_size=64", "data.seq_len=32", "batch_size=4",
    "eval_every=0", 'data.tokenizer="bytes"', "data.synthetic_ratio=0",
]  # fmt: skip


def train(out: Path, *args: str, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "longmoe.cli", "train", "tiny", "--out", str(out), "--quiet", *args]
    cmd += [x for s in SMALL if s.split("=")[0] not in " ".join(args) for x in ("--set", s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    if wait:
        _, err = proc.communicate(timeout=1800)  # generous: the tiny preset beside a CPU-heavy job took > 10 min
        assert proc.returncode == 0, err[-3000:]
    return proc


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hidden_sise=64", "unknown key.*hidden_sise"),
        ("optim.lr='fast'", r"optim.lr = 'fast' should be of type float"),
        ("model.num_heads=5", r"num_heads \(5\) must be a multiple of num_kv_heads"),
        ("data.synthetic_tasks=['juggling']", "unknown task 'juggling'"),
        ("balance='perfect'", "balance = 'perfect'"),
        ("stages=[{start_step=10, seq_len=4}]", "seq_len = 4 must be >= 8"),
        ("nonsense", "expected key=value"),
    ],
)
def test_bad_config_fails_before_any_work_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_parallel_layout_is_checked_against_the_world_size():
    with pytest.raises(ConfigError, match=r"parallel.ep = 3 does not divide model.num_experts = 4"):
        load_config("tiny", ["parallel.ep=3"])
    with pytest.raises(ConfigError, match=r"seq_len 66 must be divisible by 2 x parallel.cp = 4"):
        load_config("tiny", ["parallel.cp=2", "data.document_masking=false", "data.seq_len=66"])
    with pytest.raises(ConfigError, match="parallel.cp > 1 needs data.document_masking = false"):
        load_config("tiny", ["parallel.cp=2"])
    cfg = load_config("tiny", ["batch_size=5"])
    with pytest.raises(ConfigError, match="batch_size = 5 must be divisible by the 2 data-parallel ranks"):
        validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"parallel.ep = 4 must be 1 or the world size \(2\)"):
        validate(load_config("tiny", ["parallel.ep=4"]), world_size=2)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("no-such-config.toml")


def test_synthetic_tasks_that_cannot_fit_the_sequence_fail_before_training(tmp_path):
    """32 bytes hold no needle sentence plus its question: every synthetic row would have nothing to learn."""
    cmd = [sys.executable, "-m", "longmoe.cli", "train", "tiny", "--out", str(tmp_path)]
    cmd += ["--set", 'data.tokenizer="bytes"', "--set", "data.seq_len=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "data.seq_len = 32 is too short for the synthetic task 'niah'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "metrics.jsonl").exists()


def test_toml_config_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('steps = 7\n[model]\nhidden_size = 64\nnum_layers = 1\nnum_heads = 2\nnum_kv_heads = 1\n'
                 'intermediate_size = 64\n[data]\nseq_len = 16\n[optim]\nlr = 1e-3\n')  # fmt: skip
    cfg = load_config(str(f), ["optim.lr=2e-3"])
    assert cfg.steps == 7 and cfg.model["hidden_size"] == 64 and cfg.optim.lr == 2e-3 and cfg.data.seq_len == 16


def test_tiny_preset_lowers_heldout_loss_and_learns_the_needle_task(tmp_path):
    """The whole `tiny` preset (~3 minutes on 2 cores): held-out loss falls and the exported model retrieves the
    7-digit needle in >= 90% of fresh tasks at its training length (64 tokens)."""
    # the timeout only catches a hang: alone this takes ~4 min; beside two CPU-heavy jobs it took over 15
    proc = subprocess.run([sys.executable, "-m", "longmoe.cli", "train", "tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=2400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ETA" in proc.stderr or "<" in proc.stderr  # the progress line
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    held = [r["heldout_loss"] for r in rows if "heldout_loss" in r]
    assert len(held) >= 3 and held[-1] < held[0] - 0.5
    for key in ("loss", "tokens_per_s", "mfu", "expert_load", "router_entropy", "dead_experts", "aux_loss"):
        assert key in rows[-1]
    m = longmoe.load(tmp_path / "export")

    def count(s: str) -> int:
        return len(m.tokenizer.encode(s, add_special_tokens=False))

    hits = 0
    for i in range(50):
        task = needle_task(random.Random(10_000 + i), 64 - 24, count)
        assert count(task.prompt()) <= 64
        hits += task.score(m.generate(task.prompt(), max_new_tokens=10).text)
    assert hits / 50 >= 0.9


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the fp32 masters are part of the checkpoint
def test_exact_resume_after_sigkill(tmp_path, dtype):
    full = tmp_path / "full"
    train(full, "--steps", "30", "--save-every", "10", "--set", f'dtype="{dtype}"')
    killed = tmp_path / "killed"
    proc = train(killed, "--steps", "30", "--save-every", "10", "--set", f'dtype="{dtype}"', wait=False,
                 env={"LONGMOE_TEST_HANG_AFTER_STEP": "24"})  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once the run has logged step 24 and waits (between two checkpoints)
        if (killed / "metrics.jsonl").exists() and len((killed / "metrics.jsonl").read_text().splitlines()) >= 24:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(killed / "checkpoints").name == "step-000020"
    train(killed, "--steps", "30", "--save-every", "10", "--set", f'dtype="{dtype}"', "--resume")
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, 31))
    for step in range(21, 31):  # stated tolerance: bit-identical (same ops, same order, one process)
        assert b[step] == a[step], (step, a[step], b[step])


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = train(out, "--steps", "20", "--save-every", "10", env={"LONGMOE_TEST_SAVE_PAUSE": "30"}, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "checkpoints").glob(".step-000010.tmp/rank-*.pt")):
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # rank files written, meta not yet: the save is half done
    proc.wait()
    assert latest_checkpoint(out / "checkpoints") is None  # nothing complete yet: the half save does not count
    train(out, "--steps", "20", "--save-every", "10", "--stop-at", "10", "--overwrite")  # a complete step-10 one
    proc = train(out, "--steps", "20", "--save-every", "10", "--resume", env={"LONGMOE_TEST_SAVE_PAUSE": "30"},
                 wait=False)  # fmt: skip
    while time.time() < deadline and not list((out / "checkpoints").glob(".step-000020.tmp/rank-*.pt")):
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = latest_checkpoint(out / "checkpoints")
    assert latest.name == "step-000010"
    state = torch.load(latest / "rank-00000.pt", weights_only=False)  # loadable
    assert "model" in state and "optim" in state
    train(out, "--steps", "20", "--save-every", "10", "--resume")
    assert sorted(losses(out)) == list(range(1, 21))
    assert latest_checkpoint(out / "checkpoints").name == "step-000020"


def test_tensorboard_reads_the_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, "--steps", "5")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5]
    assert events[0].value == pytest.approx(losses(tmp_path)[1], rel=1e-6)


def test_context_length_schedule_changes_length_and_rope(tmp_path):
    train(tmp_path, "--steps", "6", "--set", "stages=[{start_step=3, seq_len=64, rope_theta=50000.0}]")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in rows] == [32, 32, 32, 64, 64, 64]
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["rope_theta"] == 50000.0
    m = longmoe.load(tmp_path / "export")
    assert m.generate("The special magic", max_new_tokens=3).usage.generated_tokens >= 1


def test_continued_pretraining_from_an_imported_checkpoint(hf_dirs, tmp_path):
    path, _ = hf_dirs("qwen3_moe")
    cmd = [sys.executable, "-m", "longmoe.cli", "train", "tiny", "--out", str(tmp_path), "--quiet", "--steps", "4",
           "--set", "model={}", "--set", f'init="{path}"', "--set", "data.seq_len=32", "--set", "batch_size=2",
           "--set", "eval_every=2", "--set", "data.synthetic_ratio=0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()
    m = longmoe.load(tmp_path / "export")
    assert m.config.num_experts == 8 and m.config.qk_norm == "head"


def test_bf16_master_weights_keep_updates_smaller_than_a_bf16_step():
    """An update of 1e-4 on a weight of 1.0 is below half a bf16 ulp (2^-8): a bf16 weight never moves. With fp32
    masters the updates accumulate and the bf16 weight follows (100 steps -> 0.99)."""
    from longmoe.train.precision import MasterWeights

    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    kept = torch.nn.Parameter(torch.ones(4))
    masters = MasterWeights({"w": kept})
    assert kept.dtype == torch.bfloat16 and masters.master(kept).dtype == torch.float32
    opt_plain = torch.optim.SGD([plain], lr=1e-4)
    opt_kept = torch.optim.SGD([masters.master(kept)], lr=1e-4)
    for _ in range(100):
        for p in (plain, kept):
            (p.float().sum()).backward()  # gradient 1
        masters.grads_to_master()
        assert kept.grad is None
        opt_plain.step()
        opt_kept.step()
        masters.copy_to_model()
        opt_plain.zero_grad()
        opt_kept.zero_grad()
    assert torch.equal(plain, torch.ones(4, dtype=torch.bfloat16))
    torch.testing.assert_close(masters.master(kept), torch.full((4,), 0.99), atol=1e-5, rtol=0)
    assert torch.equal(kept.detach(), torch.full((4,), 0.99).to(torch.bfloat16))


def test_bf16_training_tracks_fp32(tmp_path):
    """bf16 weights and compute with fp32 masters: losses within 1% of the fp32 run's over 30 steps; the export is
    fp32 (the masters)."""
    train(tmp_path / "fp32", "--steps", "30")
    train(tmp_path / "bf16", "--steps", "30", "--set", 'dtype="bfloat16"')
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    for step in range(1, 31):
        assert abs(a[step] - b[step]) < 0.01 * a[step], (step, a[step], b[step])
    m = longmoe.load(tmp_path / "bf16" / "export", dtype="auto")
    assert next(m.module.parameters()).dtype == torch.float32


# --- a run directory is never lost by accident ------------------------------------------------------------------


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


def test_a_second_run_into_an_existing_out_refuses_and_changes_nothing(tmp_path):
    train(tmp_path, "--steps", "3")
    before = _snapshot(tmp_path)
    proc = train(tmp_path, "--steps", "3", wait=False)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "already holds a training run" in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before
    train(tmp_path, "--steps", "2", "--overwrite")  # an explicit --overwrite starts afresh
    assert sorted(losses(tmp_path)) == [1, 2]


def test_resume_with_a_changed_model_refuses_before_writing(tmp_path):
    train(tmp_path, "--steps", "4", "--save-every", "2", "--stop-at", "2")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a line torn by a kill mid-write must not block a resume
    before = _snapshot(tmp_path)
    proc = train(tmp_path, "--steps", "4", "--save-every", "2", "--resume", "--set", "model.hidden_size=32",
                 wait=False)  # fmt: skip
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "model.hidden_size" in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before
    train(tmp_path, "--steps", "4", "--save-every", "2", "--resume")
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    proc = train(tmp_path, "--steps", "10", "--save-every", "1", "--set", "optim.lr=1e30", "--set",
                 "optim.warmup_steps=0", wait=False)  # fmt: skip
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    step = int(re.search(r"step (\d+): the loss .* is not finite", err).group(1))
    assert "Traceback" not in err and "exported nothing" in err
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last is not None and last.name == f"step-{step - 1:06d}" and str(last) in err
    assert "model" in torch.load(last / "rank-00000.pt", weights_only=False)
    assert not (tmp_path / "export").exists()


def test_a_full_disk_during_a_save_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from longmoe.errors import TrainError
    from longmoe.train import loop

    cfg = load_config("tiny", [*SMALL, "steps=4", "save_every=2"])
    trainer = loop.Trainer(cfg, tmp_path, quiet=True)
    real, calls = loop._atomic_torch_save, [0]

    def fills_up(obj, path):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(loop, "_atomic_torch_save", fills_up)
    with pytest.raises(TrainError, match=r"step 4 .* failed: the disk is full; the previous checkpoint .*step-000002 "
                       r"is intact"):  # fmt: skip
        trainer.train()
    trainer.close()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000002"
    assert not list((tmp_path / "checkpoints").glob(".step-*"))  # the half-written one is gone


def test_synthetic_retrieval_and_copy_rows():
    """Rows of exactly the asked length; every asked value is planted in the context, under a key that is never one
    of the evaluation's cities; only answers are targets. Copy rows repeat text that occurred earlier."""
    from longmoe.corpora import python_docs_text
    from longmoe.tasks import CITIES
    from longmoe.train.synthetic import TRAIN_PLACES, copy_row, retrieval_row

    assert not set(TRAIN_PLACES) & set(CITIES)
    docs = list(python_docs_text())
    enc = lambda s: list(s.encode())  # noqa: E731
    for seed in range(60):
        length = [257, 1024, 4096][seed % 3]
        ids, marks = retrieval_row(random.Random(seed), length, enc, 256, docs)
        assert len(ids) == len(marks) == length
        first = marks.index(1)
        context = bytes(t for t in ids[:first] if t < 256).decode(errors="replace")
        tail = bytes(t for t in ids[first:] if t < 256).decode()
        for line in tail.strip().split("\n"):
            value = line.rstrip(".").split(" ")[-1]
            assert value in context, (seed, line)
            assert not any(f" {c} " in line for c in CITIES), line
        answered = bytes(t for t, m in zip(ids, marks) if m and t < 256).decode()
        assert "What is" not in answered  # questions are not targets
        ids, marks = copy_row(random.Random(seed), length, enc, 256, docs)
        assert len(ids) == len(marks) == length and sum(marks) > 0
        span_end = max(i for i, m in enumerate(marks[:-1]) if m) + 1
        span_start = span_end - 8
        needle = ids[span_start:span_end]
        assert any(ids[i : i + 8] == needle for i in range(span_start - 8))  # seen before in the row


def test_retrieval_rows_plant_as_many_facts_as_asked_and_digit_runs():
    """data.retrieval_facts sets how many facts a long row plants (every one asked); retrieval_repeat_digits = 1
    makes every value a 7-digit number of runs; the defaults leave stage 1's rows as they were (same rng use)."""
    from longmoe.corpora import python_docs_text
    from longmoe.train.synthetic import digit_runs, retrieval_row

    docs = list(python_docs_text())
    enc = lambda s: list(s.encode())  # noqa: E731
    for seed in range(6):
        ids, marks = retrieval_row(random.Random(seed), 16384, enc, 256, docs, facts=[16], repeat_digits=1.0)
        tail = bytes(t for t in ids[marks.index(1) :] if t < 256).decode()
        answers = [line.rstrip(".").split(" ")[-1] for line in tail.strip().split("\n")]
        assert len(answers) == 16, answers
        assert all(len(v) == 7 and v.isdigit() for v in answers), answers
    runs = [digit_runs(random.Random(i)) for i in range(200)]
    assert sum(any(v[i] == v[i + 1] for i in range(6)) for v in runs) > 180  # nearly every one repeats a digit
    assert all(len(v) == 7 and v[0] != "0" for v in runs)
    assert retrieval_row(random.Random(3), 4096, enc, 256, docs) == retrieval_row(
        random.Random(3), 4096, enc, 256, docs, facts=load_config("tiny").data.retrieval_facts, repeat_digits=0.0)


def test_retrieval_settings_are_checked():
    with pytest.raises(ConfigError, match="data.retrieval_facts"):
        load_config("tiny", ["data.retrieval_facts=[0]"])
    with pytest.raises(ConfigError, match="data.retrieval_facts"):
        load_config("tiny", ["data.retrieval_facts=[]"])
    with pytest.raises(ConfigError, match="data.retrieval_repeat_digits"):
        load_config("tiny", ["data.retrieval_repeat_digits=1.5"])


def test_a_stage_changes_the_retrieval_settings_from_its_step_on_and_after_a_resume(tmp_path):
    """The bundled recipe's last stage plants more facts and digit runs: a stage's retrieval settings hold from its
    start step, are restored by a resume, and leave the run's config (saved with it) as written."""
    from longmoe.train import loop

    stage = "stages=[{start_step=2, seq_len=32, retrieval_facts=[3], retrieval_repeat_digits=0.5}]"
    default = load_config("tiny", [*SMALL]).data
    default = (default.retrieval_facts, default.retrieval_repeat_digits)

    def run(resume: bool) -> list[tuple]:
        cfg = load_config("tiny", [*SMALL, "steps=4", stage])
        trainer = loop.Trainer(cfg, tmp_path, resume=resume, quiet=True)
        seen, real = [], trainer.data.next

        def spy(*args):
            seen.append((trainer.step, trainer.data.cfg.retrieval_facts, trainer.data.cfg.retrieval_repeat_digits))
            return real(*args)

        trainer.data.next = spy
        trainer.train(stop_at=None if resume else 3)
        trainer.close()
        assert (cfg.data.retrieval_facts, cfg.data.retrieval_repeat_digits) == default
        return seen

    assert run(resume=False) == [(0, *default), (1, *default), (2, [3], 0.5)]
    assert run(resume=True) == [(3, [3], 0.5)]
    with pytest.raises(ConfigError, match="stages: retrieval_facts"):
        load_config("tiny", ["stages=[{start_step=2, seq_len=32, retrieval_facts=[0]}]"])
    with pytest.raises(ConfigError, match="stages: retrieval_repeat_digits"):
        load_config("tiny", ["stages=[{start_step=2, seq_len=32, retrieval_repeat_digits=2.0}]"])


def test_flops_per_token_counts_windows_and_the_answer_tail():
    """MFU's numerator: the PaLM count on full-attention models; a sliding layer attends over its window only, and a
    long synthetic row runs its last layer and the output projection on the answer tail only (MFU was >100%)."""
    from longmoe.model.config import ModelConfig
    from longmoe.train.loop import flops_per_token

    kw = dict(vocab_size=264, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
              intermediate_size=256, max_position_embeddings=65536)  # fmt: skip
    full = ModelConfig(**kw)
    active, embed = 3_000_000, 2 * 264 * 128
    assert flops_per_token(full, active, 1024) == 6 * (active - embed) + 6 * 264 * 128 + 6 * 4 * 1024 * 4 * 64
    swa = ModelConfig(**kw, layer_types=["sliding"] * 3 + ["full"], sliding_window=128)
    assert flops_per_token(swa, active, 1024) == pytest.approx(
        flops_per_token(full, active, 1024) - 6 * 3 * (1024 - 128) * 4 * 64)
    per_layer = (active - embed) / 4
    tail = flops_per_token(swa, active, 32768, outputs=64)
    last = 64 / 32768 * 6 * (per_layer + 32768 * 256 + 264 * 128)
    assert tail == pytest.approx(6 * 3 * (per_layer + 128 * 256) + last)
