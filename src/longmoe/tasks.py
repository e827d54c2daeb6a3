"""Synthetic long-context tasks, shared by training (mixed into the data) and evaluation (longmoe eval).

- needle in a haystack with the Gemini 1.5 template: "The special magic {city} number is: {number}." /
  "What is the special magic {city} number?" (arXiv 2403.05530 sec. 5.2.1.2; LWM's eval_needle.py);
- multi-key (distractor needles for other cities), multi-value (one city, several numbers), multi-query;
- variable tracking (RULER's "vt": VAR X = 12345, VAR Y = VAR X, ...; name every variable holding the value).

Haystacks are sentences of English text that ships with every Python installation (the pydoc topic help), or any
text the caller passes. All randomness comes from the `random.Random` handed in, so a task is a pure function of
its seed.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from .corpora import python_docs_text

CITIES = (
    "Tokyo Delhi Shanghai Cairo Mumbai Beijing Dhaka Osaka Karachi Istanbul Kinshasa Lagos Manila Tianjin Lima "
    "Bangkok Chennai Bogota Jakarta Lahore Hyderabad Nagoya London Tehran Chicago Chengdu Nanjing Wuhan Luanda "
    "Ahmedabad Toronto Riyadh Singapore Santiago Madrid Pune Houston Dallas Khartoum Barcelona Philadelphia "
    "Miami Atlanta Yangon Sydney Melbourne Berlin Athens Rome Paris Vienna Warsaw Prague Dublin Oslo Lisbon "
    "Helsinki Budapest Brussels Stockholm Copenhagen Amsterdam Zurich Montreal Seattle Denver Boston Havana"
).split()
NEEDLE = "The special magic {city} number is: {value}."
QUESTION = "What is the special magic {city} number?"
ANSWER_PREFIX = "The special magic {city} number is:"
CountFn = Callable[[str], int]


@dataclass
class Task:
    """context (haystack with the planted facts), question, the prefix the answer starts with, expected answers.
    `depth` is where the (first) needle sits, as a fraction of the context."""

    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    depth: float = 0.0
    meta: dict = field(default_factory=dict)

    def prompt(self) -> str:
        return f"{self.context}\n{self.question}" + (f" {self.answer_prefix}" if self.answer_prefix else "")

    def score(self, output: str) -> float:
        """Share of expected answers found in the output (RULER's string_match_all; LWM's exact match)."""
        return sum(a.lower() in output.lower() for a in self.answers) / len(self.answers)


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text) if len(s.strip()) > 1]


@lru_cache(maxsize=4)
def default_haystack() -> tuple[str, ...]:
    out: list[str] = []
    for doc in python_docs_text():
        out += [s for s in split_sentences(doc) if s[-1] in ".!?" and len(s) <= 300 and "magic" not in s.lower()]
    return tuple(out)


NAMES = (
    "Amara Bastian Camille Desmond Elif Fabian Giulia Hamza Isolde Joaquin Keiko Leonie Matteo Nadia Oskar Priya "
    "Quinn Rafael Sigrid Tobias Ursula Viktor Wanjiru Xavier Yara Zoltan Adele Bruno Celeste Dario Esme Felix"
).split()


def number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def uuid_value(rng: random.Random) -> str:
    h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """English words (the list RULER's tasks use here), for word keys and values."""
    return tuple((Path(__file__).parent / "eval" / "words.txt").read_text().split())


# What a needle's key ({city}) and value ({value}) may be: the Gemini report's cities and 7-digit numbers, or other
# kinds to see how far retrieval generalises.
KEY_KINDS: dict[str, Callable[[random.Random, int], list[str]]] = {
    "cities": lambda rng, n: rng.sample(CITIES, n),
    "names": lambda rng, n: rng.sample(NAMES, n),
    "words": lambda rng, n: rng.sample(common_words(), n),
    "uuids": lambda rng, n: [uuid_value(rng) for _ in range(n)],
}
VALUE_KINDS: dict[str, Callable[[random.Random], str]] = {
    "numbers": number,
    "words": lambda rng: rng.choice(common_words()),
    "uuids": uuid_value,
}


def fill(sentences: Sequence[str], budget: int, count: CountFn, rng: random.Random) -> list[str]:
    """Consecutive sentences from a random start (wrapping around, i.e. repeating the haystack), skipping any that
    would overflow, until the budget (tokens) is nearly used."""
    out, used, misses = [], 0, 0
    i = rng.randrange(len(sentences))
    while misses < 50 and budget - used > 2:
        s = sentences[i % len(sentences)]
        i += 1
        n = count(" " + s)
        if used + n > budget:
            misses += 1
            continue
        out.append(s)
        used += n
    return out


def place(
    sentences: list[str], inserts: list[tuple[float, str]], count: CountFn | None = None, sep: str = " "
) -> tuple[str, list[float]]:
    """Insert texts at depth fractions, each at a unit (sentence or line) boundary: the last boundary at or before
    the depth, so a needle is moved back, never forward (as in Kamradt's harness). With `count` (the target's
    tokenizer) depths are token depths, else character depths. Returns the text and each insert's actual depth."""
    measure = count or len
    ends = list(itertools.accumulate(len(x) + len(sep) for x in sentences))  # character offset after each unit

    def boundary(d: float) -> int:
        if count is None:  # characters: a direct lookup
            return bisect.bisect_right(ends, d * (ends[-1] if ends else 0))
        total = measure(sep.join(sentences))
        lo, hi = 0, len(sentences)  # the largest i whose prefix has at most d x total tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if measure(sep.join(sentences[:mid])) <= d * total:
                lo = mid
            else:
                hi = mid - 1
        return lo

    parts = list(sentences)
    slots = sorted(((boundary(d), j, text) for j, (d, text) in enumerate(inserts)), reverse=True)
    for idx, _, text in slots:
        parts.insert(idx, text)
    out = sep.join(parts)
    total = max(measure(out), 1)
    depths = [measure(out[: out.find(text)]) / total for _, text in inserts]
    return out, depths


def window(sentences: Sequence[str], start: int, n: int) -> list[str]:
    """n consecutive sentences from `start`, wrapping around (the haystack repeats, as Kamradt's and Gemini's do)."""
    return [sentences[(start + i) % len(sentences)] for i in range(n)]


def _draw_needles(
    rng: random.Random,
    *,
    keys: int = 1,
    values: int = 1,
    queries: int = 1,
    distractors: int = 0,
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer_prefix: str = ANSWER_PREFIX,
    key_kind: str = "cities",
    value_kind: str = "numbers",
) -> tuple[list[str], Task]:
    """The needle sentences and a Task without its context yet."""
    cities = KEY_KINDS[key_kind](rng, keys + distractors)
    value = VALUE_KINDS[value_kind]
    facts = {c: [value(rng) for _ in range(values if i < keys else 1)] for i, c in enumerate(cities)}
    needles = [needle.format(city=c, value=v) for c, vs in facts.items() for v in vs]
    asked = cities[:queries]
    if queries == 1:
        q, prefix = question.format(city=asked[0]), answer_prefix.format(city=asked[0])
    else:
        q = "What are the special magic numbers for " + ", ".join(asked) + "?"
        prefix = "The special magic numbers are:"
    answers = [v for c in asked for v in facts[c]]
    return needles, Task("", q, prefix, answers, meta={"kind": "niah", "keys": keys, "values": values, "facts": facts})


def _plant(rng: random.Random, sentences: list[str], needles: list[str], task: Task, depth: float | None,
           count: CountFn | None = None, sep: str = " ") -> Task:  # fmt: skip
    first = rng.random() if depth is None else depth
    depths = [first] + [rng.random() for _ in needles[1:]]
    context, actual = place(sentences, list(zip(depths, needles)), count, sep)
    return replace(task, context=context, depth=actual[0])


def needle_task_from(rng: random.Random, sentences: list[str], *, depth: float | None = None,
                     count: CountFn | None = None, sep: str = " ", **kw) -> Task:  # fmt: skip
    """Plant `keys` cities (each with `values` numbers) plus `distractors` other cities in the given haystack
    sentences (joined by `sep`); ask for `queries` of the planted cities (keyword arguments of `_draw_needles`).
    depth: where the first needle goes (fraction of the haystack, in tokens by `count` if given), random if None;
    further needles go to random depths."""
    needles, task = _draw_needles(rng, **kw)
    return _plant(rng, sentences, needles, task, depth, count, sep)


def needle_task(rng: random.Random, n_tokens: int, count: CountFn, *, haystack: Sequence[str] | None = None,
                depth: float | None = None, **kw) -> Task:  # fmt: skip
    """needle_task_from with about n_tokens of haystack (training-time sizing by per-sentence counts)."""
    needles, task = _draw_needles(rng, **kw)
    sentences = _fill_around(rng, n_tokens, count, haystack, needles, task)
    return _plant(rng, sentences, needles, task, depth)


def _fill_around(rng: random.Random, n_tokens: int, count: CountFn, haystack: Sequence[str] | None,
                 inserts: list[str], task: Task) -> list[str]:  # fmt: skip
    """Haystack sentences that, with the inserted lines and the question, make about n_tokens."""
    overhead = sum(count(" " + x) for x in inserts) + count("\n" + task.question + " " + task.answer_prefix) + 8
    return fill(haystack or default_haystack(), max(n_tokens - overhead, 0), count, rng)


def _draw_chains(rng: random.Random, hops: int, chains: int) -> tuple[list[str], Task]:
    """The assignment lines of `chains` chains and a Task (without context) asking for the first chain."""
    used: set[str] = set()

    def var() -> str:
        while True:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in used:
                used.add(name)
                return name

    lines, first_chain, first_value = [], [], ""
    for c in range(chains):
        value = str(rng.randint(10000, 99999))
        names = [var() for _ in range(hops + 1)]
        lines += [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
        if c == 0:
            first_chain, first_value = names, value
    q = f"Find all variables that are assigned the value {first_value} in the text above."
    prefix = f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are" \
        " assigned the value " + first_value + ", they are:"  # fmt: skip
    return lines, Task("", q, prefix, first_chain, meta={"kind": "vt", "hops": hops})


def _place_chains(rng: random.Random, sentences: list[str], lines: list[str], task: Task) -> Task:
    depths = sorted(rng.random() for _ in lines)  # chain order preserved through the text
    context, actual = place(sentences, list(zip(depths, lines)))
    return replace(task, context=context, depth=actual[0])


def variable_tracking_task_from(rng: random.Random, sentences: list[str], *, hops: int = 4, chains: int = 1) -> Task:
    """RULER vt: chains of assignments 'VAR A = 12345', 'VAR B = VAR A', ... scattered in order through the
    haystack sentences; answer every variable of the first chain."""
    return _place_chains(rng, sentences, *_draw_chains(rng, hops, chains))


def variable_tracking_task(rng: random.Random, n_tokens: int, count: CountFn, *, hops: int = 4, chains: int = 1,
                           haystack: Sequence[str] | None = None) -> Task:  # fmt: skip
    """variable_tracking_task_from with about n_tokens of haystack."""
    lines, task = _draw_chains(rng, hops, chains)
    sentences = _fill_around(rng, n_tokens, count, haystack, lines, task)
    return _place_chains(rng, sentences, lines, task)


TRAIN_TASKS = {
    "niah": lambda rng, n, count: needle_task(rng, n, count),
    "multikey": lambda rng, n, count: needle_task(rng, n, count, distractors=3),
    "multivalue": lambda rng, n, count: needle_task(rng, n, count, values=3),
    "vt": lambda rng, n, count: variable_tracking_task(rng, n, count, hops=2),
}
