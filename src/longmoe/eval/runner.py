"""Shared machinery of the evaluations: sizing a task to a token length with the target's own tokenizer, a results
file written as each cell is measured (so an interrupted run resumes where it stopped), and a concurrent runner
with a progress line."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..progress import Progress
from ..tasks import Task
from .targets import Target, TargetError


def sized(build: Callable[[int], Task], count: Callable[[str], int], length: int, sentence_tokens: float) -> Task:
    """The task with the most haystack sentences whose prompt is at most `length` tokens by the target's count.
    Binary search over the number of sentences: the result undershoots `length` by less than one sentence."""
    shortest = count(build(0).prompt())
    if shortest > length:
        raise TaskTooShort(f"{length} tokens is less than this task needs without any haystack ({shortest})")
    lo, hi = 0, max(4, int(2.5 * length / max(sentence_tokens, 1)) + 4)
    while count(build(hi).prompt()) <= length:  # haystack still too short: widen
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(build(mid).prompt()) <= length:
            lo = mid
        else:
            hi = mid - 1
    return build(lo)


class TaskTooShort(ValueError):
    pass


@dataclass
class Cell:
    key: str  # unique within a run: the resume key
    meta: dict[str, Any]  # what the results file records about the cell (task, length, depth, ...)
    build: Callable[[], Task]  # sized with the target's tokenizer; called in a worker thread
    max_tokens: int


class Results:
    """Append-only JSONL: one line per measured cell, flushed and fsynced as it is written."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash: that cell is measured again
                    self.rows[row["key"]] = row

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def evaluate(cell: Cell, target: Target) -> dict[str, Any]:
    row: dict[str, Any] = {"key": cell.key, **cell.meta}
    try:
        task = cell.build()
        prompt = task.prompt()
        row["prompt_tokens"] = target.count_tokens(prompt)
        row["depth_actual"] = round(task.depth, 4)
        answer = target.generate(prompt, cell.max_tokens)
        row.update(score=task.score(answer), answer=answer[:200], expected=task.answers, error=None)
    except (TargetError, TaskTooShort) as e:
        row.update(score=None, error=str(e)[:300])
    return row


def run(cells: list[Cell], target: Target, results: Results, desc: str, quiet: bool = False) -> None:
    """Measure every cell not yet in `results`, `target.concurrency` at a time. Ctrl-C stops after the cells in
    flight; everything measured so far is already on disk."""
    todo = [c for c in cells if c.key not in results.rows]
    done = len(cells) - len(todo)
    progress = Progress(len(cells), desc, start=done, enabled=not quiet)
    progress.update(done)
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
                results.add(fut.result())
                done += 1
                scored = [r["score"] for r in results.rows.values() if r.get("score") is not None]
                mean = sum(scored) / len(scored) if scored else 0.0
                progress.update(done, f"score {100 * mean:.1f}%")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
