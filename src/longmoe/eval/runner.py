"""Shared machinery of the evaluations: sizing a task to a token length with the target's own tokenizer, a results
file written as each cell is measured (so an interrupted run resumes where it stopped), and a concurrent runner
with a progress line."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..progress import Progress
from ..tasks import Task
from .targets import Target, TargetError


def sized(build: Callable[[int], Task], count: Callable[[str], int], length: int, sentence_tokens: float) -> Task:
    """The task with the most haystack units whose prompt is at most `length` tokens by the target's count."""
    return build(fit(build, count, length, sentence_tokens))


def fit(build: Callable[[int], Task], count: Callable[[str], int], length: int, sentence_tokens: float) -> int:
    """The largest number of haystack units whose task prompt is at most `length` tokens by the target's count.
    Binary search over the number of units: the result undershoots `length` by less than one unit. Raises
    TaskTooShort when even no haystack is too long or the task cannot grow to `length` (its prompt stops getting
    longer), and SizingError when the target's token count does not grow with the text: never loops."""
    shortest = count(build(0).prompt())
    if shortest > length:
        raise TaskTooShort(f"{length} tokens is less than this task needs without any haystack ({shortest})")
    lo, hi = 0, max(4, int(2.5 * length / max(sentence_tokens, 1)) + 4)
    prev_text, prev_count = len(build(0).prompt()), shortest
    while True:  # widen until the haystack is too long
        prompt = build(hi).prompt()
        n = count(prompt)
        if n > length:
            break
        if len(prompt) <= prev_text:
            raise TaskTooShort(f"this task cannot make a {length:,}-token prompt: it stops growing at {n:,} tokens")
        if n <= prev_count:
            raise SizingError(
                f"the target's token count does not grow with the text ({n:,} tokens for {len(prompt):,} characters"
                f", {prev_count:,} for {prev_text:,}): it cannot size contexts; check its countTokens"
            )
        lo, hi, prev_text, prev_count = hi, hi * 2, len(prompt), n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(build(mid).prompt()) <= length:
            lo = mid
        else:
            hi = mid - 1
    return lo


class TaskTooShort(ValueError):
    """A cell whose task cannot be built at its length (recorded as an error cell)."""


class SizingError(TargetError):
    """The target's token counts cannot size a context: the whole run stops."""


def fingerprint(*parts: object) -> str:
    """A short content hash of anything JSON-serialisable (haystacks, templates, settings)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class Cell:
    key: str  # unique within a run: the resume key
    meta: dict[str, Any]  # what the results file records about the cell (task, length, depth, ...)
    build: Callable[[], Task]  # sized with the target's tokenizer; called in a worker thread
    max_tokens: int
    weight: float = 1.0  # its share of the work (e.g. its length), for the progress line's ETA


class Results:
    """Append-only JSONL of measured cells in an output directory that belongs to one run identity: the target
    (model directory and its content fingerprint, or endpoint URL and model name) and every setting that
    determines a cell's content (seed, haystack, templates, ...). Rerunning the same command resumes; a different
    identity is refused, so answers are never credited to another target. Cells that failed with an error are
    measured again on every rerun."""

    def __init__(self, out: Path, identity: dict[str, Any]):
        self.path = out / "results.jsonl"
        self.rows: dict[str, dict] = {}
        run = out / "run.json"
        if run.exists():
            try:
                before = json.loads(run.read_text())
            except (OSError, json.JSONDecodeError):
                before = None
            if before != json.loads(json.dumps(identity)):
                diff = sorted(k for k in set(identity) | set(before or {}) if (before or {}).get(k) != identity.get(k))
                shown = "; ".join(f"{k}: {(before or {}).get(k)!r} then, {identity.get(k)!r} now" for k in diff[:4])
                raise ResultsMismatch(
                    f"--out {out} holds results of a different run ({shown}); results are never mixed: use a new "
                    "--out, or delete that directory to start over"
                )
        elif self.path.exists():
            raise ResultsMismatch(f"--out {out} holds results without a run.json (written by an older longmoe); "
                                  "use a new --out")  # fmt: skip
        else:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(run, json.dumps(identity, indent=1))
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: that cell is measured again
                if isinstance(row, dict) and "key" in row:
                    if row.get("error") is None:
                        self.rows[row["key"]] = row
                    else:
                        self.rows.pop(row["key"], None)  # failed cells are retried

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


class ResultsMismatch(ValueError):
    pass


def atomic_write(path: Path, text: str) -> None:
    """Write a whole file so that a reader (or a crash) sees the old one or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate(cell: Cell, target: Target) -> dict[str, Any]:
    row: dict[str, Any] = {"key": cell.key, **cell.meta}
    t0 = time.perf_counter()
    try:
        task = cell.build()
        prompt = task.prompt()
        row["prompt_tokens"] = target.count_tokens(prompt)
        row["depth_actual"] = round(task.depth, 4)
        if "queries" in task.meta:  # several questions over one context, each sent on its own
            answers, found = [], 0
            for question, prefix, values in task.meta["queries"]:
                q = replace(task, question=question, answer_prefix=prefix, answers=values)
                answers.append(target.generate(q.prompt(), cell.max_tokens))
                found += sum(v.lower() in answers[-1].lower() for v in values)
            row.update(score=found / len(task.answers), answer=[a[:100] for a in answers], expected=task.answers,
                       error=None)  # fmt: skip
        else:
            answer = target.generate(prompt, cell.max_tokens)
            row.update(score=task.score(answer), answer=answer[:200], expected=task.answers, error=None)
    except SizingError:
        raise  # the target cannot be measured at all: stop the run
    except (TargetError, TaskTooShort) as e:
        row.update(score=None, error=str(e)[:300])
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def run(cells: list[Cell], target: Target, results: Results, desc: str, quiet: bool = False) -> None:
    """Measure every cell not yet in `results`, `target.concurrency` at a time. Ctrl-C stops after the cells in
    flight; everything measured so far is already on disk."""
    todo = [c for c in cells if c.key not in results.rows]
    done = len(cells) - len(todo)
    work = {c.key: c.weight for c in cells}
    done_work = sum(work[c.key] for c in cells if c.key in results.rows)
    progress = Progress(sum(work.values()), desc, start=done_work, enabled=not quiet)
    progress.update(done_work, count=f"{done}/{len(cells)}")
    pool = ThreadPoolExecutor(max_workers=max(1, target.concurrency))
    pending = set()
    it = iter(todo)
    try:
        while True:
            while len(pending) < max(1, target.concurrency):
                cell = next(it, None)
                if cell is None:
                    break
                pending.add(pool.submit(evaluate, cell, target))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                row = fut.result()
                results.add(row)
                done += 1
                done_work += work[row["key"]]
                scored = [r["score"] for r in results.rows.values() if r.get("score") is not None]
                mean = sum(scored) / len(scored) if scored else 0.0
                progress.update(done_work, f"score {100 * mean:.1f}%", count=f"{done}/{len(cells)}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
