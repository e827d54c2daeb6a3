"""longmoe eval nll in process, with a fake local target (one token per character) and a substituted scorer:
documents are cut to a common length (two flat documents of different lengths give a flat curve), the spread
across documents is reported, a fit on its search bound is flagged, the default documents are held out (not the
Python docs the bundled model trains on), and an output directory is never reused for another run."""

import argparse
import math

import numpy as np
import pytest

from longmoe.corpora import builtin_haystack, python_docs_text
from longmoe.eval import nll
from longmoe.eval.runner import ResultsMismatch
from longmoe.eval.targets import TargetError


class Model:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class Fake:
    """What nll.main needs of a LocalTarget: a model that encodes, an identity, a context check."""

    concurrency = 1

    def __init__(self, name: str = "fake"):
        self.model, self.name, self.identity, self.checked = Model(), name, {"kind": "fake", "name": name}, []

    def count_tokens(self, text: str) -> int:
        return len(text)

    def check_length(self, tokens: int) -> None:
        self.checked.append(tokens)


def flat(target, ids: list[int]) -> list[float]:
    """Every token of the 'a' document costs 3 nats, every token of the others 1 nat."""
    return [3.0 if ids[0] == ord("a") else 1.0] * (len(ids) - 1)


def logarithmic(target, ids: list[int]) -> list[float]:
    """Per-token NLL whose running mean falls like 5 - 0.1 ln x: no power law (its c runs off the search range)."""
    return [5 - 0.1 * (math.log(t) + 1) for t in range(1, len(ids))]


def never(target, ids):
    raise AssertionError("scored again: the results on disk were not reused")


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 300)
    (tmp_path / "b.txt").write_text("b" * 5000)
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]


def args(out, documents, **kw) -> argparse.Namespace:
    base = dict(documents=documents, code_dir=None, max_context=32768, fit_from=16, seed=0, out=str(out), json=True,
                quiet=True)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_two_flat_documents_of_different_lengths_give_a_flat_curve(tmp_path, docs):
    target = Fake()
    s = nll.main(target, args(tmp_path / "out", docs), scorer=flat)
    # averaged over the documents reaching each position, positions 300..4999 would hold the 1-nat document alone
    # and the curve would fall from 2 to 1: cut to the shortest document, it stays at the mean of 3 and 1
    assert s["tokens_scored"] == 300 and target.checked == [300]
    assert set(s["curve"].values()) == {2.0} and s["final_nll"] == 2.0 and max(map(int, s["curve"])) == 299
    assert set(s["spread"]["min"].values()) == {1.0} and set(s["spread"]["max"].values()) == {3.0}
    assert set(s["spread"]["std"].values()) == {1.0}
    assert [(d["name"], d["tokens_available"], d["tokens_scored"]) for d in s["documents"]] == [
        ("a.txt", 300, 300), ("b.txt", 5000, 300)]  # fmt: skip
    assert s["fit"]["b"] == 0.0 and s["fit"]["c"] == 2.0 and not s["fit_at_bound"]
    assert (tmp_path / "out" / "nll.png").exists() and (tmp_path / "out" / "results.json").exists()
    text = nll.table(s)
    assert "2 documents (--documents / --code-dir), each scored over its first 300 tokens: a.txt, b.txt" in text
    assert "warning" not in text

    s = nll.main(Fake(), args(tmp_path / "short", docs, max_context=200), scorer=flat)
    assert s["tokens_scored"] == 200 and [d["tokens_available"] for d in s["documents"]] == [200, 200]


def test_a_fit_on_its_search_bound_is_flagged(tmp_path, docs):
    x = np.logspace(1, 5, 60)
    assert nll.fit_power_law(x, 5 - 0.1 * np.log(x))["fit_at_bound"]
    good = nll.fit_power_law(x, 3.0 * x**-0.2 + 1.5)
    assert not good["fit_at_bound"] and abs(good["c"] - 1.5) < 0.02
    s = nll.main(Fake(), args(tmp_path, docs[1:]), scorer=logarithmic)
    assert s["fit_at_bound"] and s["fit"]["fit_at_bound"]
    assert "warning: the fit's c sits on the edge of its search range" in nll.table(s)


def test_the_default_documents_are_held_out_not_the_python_docs():
    docs = nll.documents([], None, 0)
    assert [name for name, _ in docs] == ["perl-docs (1/2)", "perl-docs (2/2)", "perl-code (1/2)", "perl-code (2/2)"]
    assert "".join(t for _, t in docs[:2]) == builtin_haystack("perl-docs")  # cut, nothing lost
    assert "".join(t for _, t in docs[2:]) == builtin_haystack("perl-code")
    assert docs[3][1].startswith("# file: ") and all(len(t) > 100_000 for _, t in docs)
    python = [t.strip()[:80] for t in python_docs_text()[:40] if len(t.strip()) > 80]
    assert python and not any(p in t for p in python for _, t in docs)


def test_results_are_never_credited_to_another_run(tmp_path, docs):
    out = tmp_path / "out"
    first = nll.main(Fake(), args(out, docs), scorer=flat)
    assert nll.main(Fake(), args(out, docs), scorer=never) == first  # same run: resumed from disk
    for other, kw in ((Fake("another model"), {}), (Fake(), {"max_context": 200}), (Fake(), {"documents": docs[1:]})):
        with pytest.raises(ResultsMismatch):
            nll.main(other, args(out, kw.pop("documents", docs), **kw), scorer=never)


def test_nll_needs_log_probabilities(tmp_path, docs):
    class Endpoint:
        name, identity, concurrency = "endpoint", {"kind": "http"}, 4

    with pytest.raises(TargetError, match="needs the model's log-probabilities"):
        nll.main(Endpoint(), args(tmp_path, docs))
