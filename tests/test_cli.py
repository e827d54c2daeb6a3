"""The `longmoe` command line: help texts, info, and clear errors (exit status 2, message on stderr)."""

import json
import subprocess
import sys

import pytest


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longmoe.cli", *args], capture_output=True, text=True, timeout=120, input=input
    )


@pytest.mark.parametrize("args", [[], ["generate"], ["info"]])
def test_help_explains_every_subcommand(args):
    out = run(*args, "--help")
    assert out.returncode == 0
    assert "usage: longmoe" in out.stdout
    assert len(out.stdout.splitlines()) > 5


def test_info_json_counts_parameters(hf_dirs):
    path, hf = hf_dirs("mixtral")
    out = run("info", "--model", str(path), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    c = hf.config
    total = sum(p.numel() for p in hf.parameters())
    per_expert = 3 * c.hidden_size * c.intermediate_size
    assert info["parameters_total"] == total
    assert info["parameters_active_per_token"] == total - c.num_hidden_layers * (4 - 2) * per_expert
    assert info["layers"] == 2 and info["experts"] == 4 and info["experts_per_token"] == 2
    head_dim = c.hidden_size // c.num_attention_heads
    assert info["kv_bytes_per_token"] == 2 * 2 * c.num_key_value_heads * head_dim * 4  # layers x (k,v) x fp32
    assert info["max_context"] == c.max_position_embeddings


def test_info_for_mla_counts_the_latent(hf_dirs):
    path, hf = hf_dirs("deepseek_v3")
    info = json.loads(run("info", "--model", str(path), "--json").stdout)
    assert info["attention"] == "mla"
    assert info["kv_bytes_per_token"] == 3 * (16 + 8) * 4  # layers x (kv_lora_rank + rope dim) x fp32


def test_info_table_is_readable(hf_dirs):
    path, _ = hf_dirs("qwen2_moe")
    out = run("info", "--model", str(path))
    assert out.returncode == 0
    assert "parameters total" in out.stdout and "kv bytes per token" in out.stdout


def test_generate_reads_prompt_from_stdin(hf_dirs):
    path, _ = hf_dirs("llama")
    a = run("generate", "--model", str(path), "--prompt", "-", "--max-new-tokens", "8", input="The needle")
    b = run("generate", "--model", str(path), "--prompt", "The needle", "--max-new-tokens", "8")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--model", "/no/such/dir"], "does not exist"),
        (["generate", "--model", "/no/such/dir", "--prompt", "x"], "does not exist"),
        (["generate", "--model", "{llama}", "--prompt", "x", "--temperature", "-2"], "temperature must be >= 0"),
        (["generate", "--model", "{llama}", "--prompt", "x", "--top-p", "2"], "top_p must be in"),
    ],
)
def test_errors_are_clear(hf_dirs, args, message):
    path, _ = hf_dirs("llama")
    out = run(*[a.replace("{llama}", str(path)) for a in args])
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""


def test_unknown_option_is_reported():
    out = run("generate", "--modle", "x")
    assert out.returncode == 2
    assert "unrecognized arguments" in out.stderr or "required" in out.stderr


def test_context_files_and_stats(hf_dirs, tmp_path):
    path, _ = hf_dirs("qwen3_moe")
    doc1, doc2 = tmp_path / "a.txt", tmp_path / "b.txt"
    doc1.write_text("The special magic number is 4217.")
    doc2.write_text("Mixture-of-experts route each token.")
    out = run("generate", "--model", str(path), "--context-file", str(doc1), "--context-file", str(doc2),
              "--prompt", "What is it?", "--max-new-tokens", "6", "--stats")  # fmt: skip
    assert out.returncode == 0, out.stderr
    import longmoe

    m = longmoe.load(path)
    full = "The special magic number is 4217.\n\nMixture-of-experts route each token.\n\nWhat is it?"
    expected = m.generate(full, max_new_tokens=6)
    assert out.stdout == expected.text
    assert f"prompt {m.count_tokens(full)} tokens" in out.stderr and "prefill" in out.stderr and "tok/s" in out.stderr


def test_too_large_request_is_refused_by_the_cli(hf_dirs, tmp_path):
    path, _ = hf_dirs("llama")
    big = tmp_path / "big.txt"
    big.write_text("needle " * 20_000)  # far longer than this 256-position toy model's context
    out = run("generate", "--model", str(path), "--context-file", str(big), "--prompt", "x", "--max-new-tokens", "1")
    assert out.returncode == 2
    assert "this model's context is 256 tokens" in out.stderr and "Traceback" not in out.stderr
