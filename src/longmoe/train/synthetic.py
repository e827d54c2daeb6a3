"""Long synthetic retrieval rows for training a model that must find a planted fact far beyond its training length.

A row is real training text or code (the haystack) with facts planted at boundaries ("The special magic Aldermoor
number is: 4921807."), then one question per fact, each followed by its answer; only the answers are targets:

    <haystack ... fact ... decoy ... fact ... haystack>\\n<question 1> <answer 1>\\n<question 2> <answer 2>\\n<eos>

What makes retrieval robust (see ../shared/reference/length-generalization.md):
- hard negatives: several facts with the same template and other keys (every one of them is asked), decoys with
  the asked key but another template, and bare numbers in the text;
- keys that cannot be memorised: pseudo-words, two-word names and place names, none of them the evaluation's
  cities (`longmoe.tasks.CITIES`); values of several kinds (7-digit numbers mostly, other lengths, hex codes, words);
- several wordings of the fact, of which the Gemini 1.5 report's is the most common;
- the answer repeats the question's own answer prefix, so a prompt that ends with the question alone still works;
- facts anywhere, from the first token to just before the questions (depth 100%).

Every row is a pure function of its `random.Random`, the documents and the tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..model.config import ConfigError
from ..tasks import CITIES

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Template:
    needle: str
    question: str
    answer: str  # the answer prefix; the value follows after a space, then "."


TEMPLATES: tuple[tuple[Template, float], ...] = (
    (Template("The special magic {key} number is: {value}.", "What is the special magic {key} number?",
              "The special magic {key} number is:"), 0.5),  # Gemini 1.5 / LWM
    (Template("One of the special magic numbers for {key} is: {value}.",
              "What is the special magic number for {key} mentioned in the provided text?",
              "The special magic number for {key} mentioned in the provided text is"), 0.15),  # RULER niah
    (Template("The pass key for {key} is {value}. Remember it. {value} is the pass key for {key}.",
              "What is the pass key for {key}?", "The pass key for {key} is"), 0.1),  # passkey retrieval
    (Template("{key}'s secret code is {value}.", "What is {key}'s secret code?", "{key}'s secret code is"), 0.1),
    (Template("Note: the {key} access code is {value}.", "What is the {key} access code?",
              "The {key} access code is"), 0.15),
)  # fmt: skip

# Place names for training keys; the evaluation's cities (longmoe.tasks.CITIES) are never among them.
TRAIN_PLACES = (
    "Aberdeen Accra Adelaide Agra Albany Algiers Amman Anchorage Ankara Antwerp Asuncion Auckland Austin Baku "
    "Baltimore Bamako Bandung Bangalore Basel Belfast Belgrade Bergen Bern Bilbao Birmingham Bologna Bordeaux "
    "Bratislava Bremen Brisbane Bristol Bucharest Busan Calgary Cardiff Casablanca Cebu Cologne Colombo "
    "Cordoba Cork Curitiba Dakar Damascus Darwin Detroit Doha Dresden Dundee Durban Edinburgh Eindhoven Florence "
    "Fukuoka Gdansk Geneva Genoa Ghent Glasgow Graz Guadalajara Hamburg Hanoi Harare Hobart Honolulu Innsbruck "
    "Irkutsk Izmir Jaipur Kabul Kampala Kazan Kiev Kigali Kobe Krakow Kyoto Lahti Leeds Leipzig Lille Limassol "
    "Linz Liverpool Ljubljana Lyon Malaga Malmo Managua Manchester Mandalay Maputo Marseille Medan Medellin Minsk "
    "Mombasa Monterrey Montevideo Munich Muscat Nairobi Nantes Naples Nice Novosibirsk Odessa Omaha Oporto Oran "
    "Orlando Ottawa Oulu Padua Palermo Panama Perth Phoenix Pittsburgh Porto Poznan Quito Rabat Recife Reykjavik "
    "Riga Rotterdam Salzburg Samara Sapporo Sarajevo Seville Skopje Sofia Split Stuttgart Suva Tallinn Tampere "
    "Tangier Tashkent Tbilisi Tirana Toulouse Trieste Tripoli Tucson Tunis Turin Uppsala Utrecht Valencia Venice "
    "Verona Vilnius Windhoek Winnipeg Wroclaw Yerevan Zagreb Zaragoza"
).split()
assert not set(TRAIN_PLACES) & set(CITIES), "training keys must be disjoint from the evaluation's cities"

SYLLABLES = (
    "ba be bi bo bu ca ce co da de di do fa fe fi ga go ha he hi ka ke ki ko la le li lo lu ma me mi mo mu na ne "
    "ni no nu pa pe pi po ra re ri ro ru sa se si so ta te ti to tu va ve vi vo wa we za zo an ar el en er in or "
    "ul am ith ost und ell ack orn"
).split()


def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def train_key(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        return rng.choice(TRAIN_PLACES)
    if r < 0.8:
        return pseudo_word(rng).capitalize()
    if r < 0.9:
        return f"{pseudo_word(rng).capitalize()} {pseudo_word(rng).capitalize()}"
    return pseudo_word(rng)


def train_value(rng: random.Random, repeat_digits: float = 0.0) -> str:
    if repeat_digits and rng.random() < repeat_digits:
        return digit_runs(rng)
    r = rng.random()
    if r < 0.75:
        return str(rng.randint(1_000_000, 9_999_999))
    if r < 0.88:
        n = rng.randint(4, 10)
        return str(rng.randint(10 ** (n - 1), 10**n - 1))
    if r < 0.94:
        return "".join(rng.choice("0123456789abcdef") for _ in range(8))
    return pseudo_word(rng)


def digit_runs(rng: random.Random) -> str:
    """A 7-digit number made of runs of one digit ("1411192", "5000338"): copying one needs the count of a run, not
    just the digit after the previous one, which the uniform numbers rarely teach."""
    digits = [rng.choice("123456789")]
    while len(digits) < 7:
        digits.append(digits[-1] if rng.random() < 0.45 else rng.choice("0123456789"))
    return "".join(digits)


def _boundaries(text: str) -> list[int]:
    """Offsets where a sentence or a line ends: facts are planted there, as whole sentences or lines."""
    out = [0]
    for i in range(1, len(text)):
        if text[i - 1] == "\n" or (text[i - 1] == " " and text[i - 2 : i - 1] in (".", "!", "?")):
            out.append(i)
    out.append(len(text))
    return out


def haystack_text(rng: random.Random, documents: Sequence[str], chars: int) -> str:
    """About `chars` characters of consecutive text from a random place in a random document, continuing into the
    following documents as needed."""
    i = rng.randrange(len(documents))
    doc = documents[i]
    start = rng.randrange(max(1, len(doc) - chars // 2)) if len(doc) > chars // 2 else 0
    parts, have = [doc[start:]], len(doc) - start
    while have < chars:
        i = (i + 1) % len(documents)
        parts.append(documents[i])
        have += len(documents[i])
    return "\n".join(parts)[:chars]


FACTS = (1, 1, 1, 2, 2, 3, 4, 4, 6, 8, 10, 12)  # facts per row, drawn uniformly (capped at one per 512 tokens)


def retrieval_row(
    rng: random.Random, length: int, encode: Encode, eos: int, documents: Sequence[str],
    facts: Sequence[int] = FACTS, repeat_digits: float = 0.0,
) -> tuple[list[int], list[int]]:  # fmt: skip
    """One training row of exactly `length` tokens -> (token ids, target marks: 1 on answer tokens).
    `facts`: the choices of how many facts to plant; `repeat_digits`: the share of values that are `digit_runs`."""
    for short in (False, True):  # a row too short for what was drawn: one fact in the shortest wording instead
        row = _retrieval_row(rng, length, encode, eos, documents, short, facts, repeat_digits)
        if row is not None:
            return row
    raise ConfigError(f"a {length}-token retrieval row has no room for its haystack: raise data.synthetic_lengths")


def _retrieval_row(
    rng: random.Random, length: int, encode: Encode, eos: int, documents: Sequence[str], short: bool,
    facts_choices: Sequence[int], repeat_digits: float,
) -> tuple[list[int], list[int]] | None:  # fmt: skip
    templates, weights = zip(*TEMPLATES)
    if short:
        templates, weights = templates[:1], weights[:1]
    n_facts = 1 if short else min(rng.choice(facts_choices), max(1, length // 512))
    keys: list[str] = []
    while len(keys) < n_facts:
        k = train_key(rng)
        if all(k.lower() not in x.lower() and x.lower() not in k.lower() for x in keys):
            keys.append(k)
    template = rng.choices(templates, weights)[0] if rng.random() < 0.7 or short else None  # else: one per fact
    facts = [(k, train_value(rng, repeat_digits), template or rng.choices(templates, weights)[0]) for k in keys]

    planted = [f.needle.format(key=k, value=v) for k, v, f in facts]
    if rng.random() < 0.3 and not short:  # a decoy: an asked key with another template (never the answer)
        k, _, f = rng.choice(facts)
        other = rng.choice([t for t in templates if t is not f])
        planted.append(other.needle.format(key=k, value=train_value(rng)))
    for _ in range(rng.choice((0, 0, 1, 3))):  # numbers without any key
        planted.append(rng.choice(("Call {v} for details.", "The number is {v}.", "Code {v} applies.")).format(
            v=train_value(rng)))  # fmt: skip

    qa = [(f"\n{f.question.format(key=k)}", f" {f.answer.format(key=k)} {v}.") for k, v, f in facts]
    order = list(range(len(qa)))
    rng.shuffle(order)
    qa_ids = [(encode(qa[i][0]), encode(qa[i][1])) for i in order]
    # a fact is a line of its own after a line break, a sentence after a sentence: "{fact}\n" or "{fact} "
    needle_ids = {sep: [encode(p + sep) for p in planted] for sep in ("\n", " ")}

    def room() -> int:
        return length - sum(len(q) + len(a) for q, a in qa_ids) - sum(map(len, needle_ids[" "])) - 1

    while room() < length // 4 and len(planted) > len(facts):  # short rows: drop the extras first...
        planted.pop()
        needle_ids = {sep: ids[:-1] for sep, ids in needle_ids.items()}
    while room() < length // 4 and len(qa_ids) > 1:  # ...then facts (and their questions)
        j = order.pop()
        del planted[j], needle_ids["\n"][j], needle_ids[" "][j], qa_ids[-1]
        order = [i - (i > j) for i in order]
    budget = room()
    if budget < 16:
        return None

    text = haystack_text(rng, documents, int(budget * 1.05) + 64)
    cuts = sorted(rng.choice(_boundaries(text)) for _ in planted)
    order = list(range(len(planted)))
    rng.shuffle(order)  # which fact goes where
    pieces: list[list[int]] = []  # haystack, fact, haystack, fact, ..., haystack
    prev = 0
    for cut, j in zip(cuts, order):
        sep = "\n" if cut == 0 or text[cut - 1] == "\n" else " "
        pieces += [encode(text[prev:cut]), needle_ids[sep][j]]
        prev = cut
    pieces.append(encode(text[prev:]))
    # Too long: shorten haystack only, never a fact: the end, then the start, then the gaps between facts.
    overflow = sum(map(len, pieces)) - budget
    for i in [len(pieces) - 1, 0, *range(2, len(pieces) - 1, 2)]:
        if overflow <= 0:
            break
        cut = min(overflow, len(pieces[i]))
        pieces[i] = pieces[i][cut:] if i == 0 else pieces[i][: len(pieces[i]) - cut]
        overflow -= cut
    ids = [t for piece in pieces for t in piece]
    marks = [0] * len(ids)
    for q, a in qa_ids:
        ids += q + a
        marks += [0] * len(q) + [1] * len(a)
    ids.append(eos)
    marks.append(1)
    pad = length - len(ids)
    return ids + [eos] * pad, marks + [0] * pad


def copy_row(
    rng: random.Random, length: int, encode: Encode, eos: int, documents: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Induction practice: real text, then a few spans of that same text repeated at the end, each on a new line.
    After a span's first tokens the rest is predictable only by finding where it occurred before - the matching a
    retrieval needs, with a target on every repeated token (dense signal; see the recipe notes)."""
    spans = rng.choice((1, 2, 3, 4))
    span_len = [rng.randint(16, 96) for _ in range(spans)]
    budget = length - sum(n + 1 for n in span_len) - 1
    if budget < 2 * max(span_len):
        spans, span_len = 1, [min(span_len[0], max(8, length // 4))]
        budget = length - span_len[0] - 2
    hay = encode(haystack_text(rng, documents, int(budget * 1.05) + 64))[:budget]
    hay += [eos] * (budget - len(hay))
    ids, marks = list(hay), [0] * len(hay)
    newline = encode("\n")
    for n in span_len:
        start = rng.randrange(max(1, len(hay) - n))
        span = hay[start : start + n]
        ids += newline + span
        marks += [0] * len(newline) + [0] * min(4, n) + [1] * max(0, n - 4)  # its first tokens cannot be known
    ids, marks = ids[: length - 1] + [eos], marks[: length - 1] + [1]
    pad = length - len(ids)
    return ids + [eos] * pad, marks + [0] * pad
