"""Greedy generation equals transformers' `generate`, through the Python API and the CLI."""

import subprocess
import sys

import pytest
import torch
from reference_models import FAMILIES

import longmoe

PROMPT = "Long context models read a million tokens and still find the needle. The special magic number is"
NEW = 32


def hf_greedy(hf, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(hf_dirs, family):
    path, hf = hf_dirs(family)
    m = longmoe.load(path)
    ids = m.encode(PROMPT)
    assert len(ids) > 24  # longer than the test models' sliding window / attention chunk
    expected = hf_greedy(hf, ids)

    gen = m.generate(PROMPT, max_new_tokens=NEW)
    assert gen.token_ids == expected
    assert gen.usage.prompt_tokens == len(ids) and gen.usage.generated_tokens == len(expected)
    assert gen.finish_reason == ("stop" if len(expected) < NEW else "length")

    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "longmoe.cli",
            "generate",
            "--model",
            str(path),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            str(NEW),
        ],
        capture_output=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr.decode()
    assert cli.stdout.decode("utf-8") == m.tokenizer.decode(expected)  # bytes: keep "\r" as written


def test_stream_pieces_join_to_generate_text(hf_dirs):
    path, _ = hf_dirs("mixtral")
    m = longmoe.load(path)
    pieces = list(m.stream(PROMPT, max_new_tokens=NEW))
    assert "".join(pieces) == m.generate(PROMPT, max_new_tokens=NEW).text
    assert len(pieces) > 1


def test_sampling_is_reproducible_with_a_seed(hf_dirs):
    path, _ = hf_dirs("qwen3_moe")
    m = longmoe.load(path)
    a = m.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7).token_ids
    b = m.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, seed=7).token_ids
    c = m.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=8).token_ids
    assert a == b and a != c


def test_generate_rejects_bad_arguments(hf_dirs):
    path, _ = hf_dirs("llama")
    m = longmoe.load(path)
    for kwargs, msg in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=msg):
            m.generate(PROMPT, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        m.generate("")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.generate([5, 10_000])
