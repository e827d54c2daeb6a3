"""The bundled model ships in the package, loads with no path, and finds a needle in a 4K-token haystack it never saw
in training (Perl's documentation), through the engine."""

import random

import longmoe
from longmoe.eval.niah import load_haystack
from longmoe.eval.runner import fit
from longmoe.tasks import needle_task_from, window


def test_bundled_model_answers_a_4k_needle():
    m = longmoe.load()  # no path: the bundled model
    assert m.info()["model_type"] == "longmoe" and m.config.num_experts >= 8
    hay = load_haystack("perl-docs")
    count = m.count_tokens
    for i, depth in enumerate((0.0, 0.5, 1.0)):
        rng_start = random.Random(i).randrange(len(hay.units))

        def build(n, count=None, start=rng_start, depth=depth, i=i):
            return needle_task_from(random.Random(100 + i), window(hay.units, start, n), depth=depth, count=count)

        task = build(fit(build, count, 4096 - 16, 30), count)
        assert 4000 <= count(task.prompt()) <= 4096
        out = m.generate(task.prompt(), max_new_tokens=12)
        assert task.answers[0] in out.text, (depth, task.answers, out.text)
