"""Ordinary mistakes at every entry point: the CLI (generate, info, train, eval), the Python API and config files.
Each gets one line naming the problem (exit status 2 from the CLI, the right exception type from Python), never a
traceback, and a normal request right after it still works."""

import io
import json
import shutil
import struct
from pathlib import Path

import pytest

import longmoe
from longmoe import cli
from longmoe.engine.engine import ContextLengthError


@pytest.fixture(scope="module")
def model_dir(hf_dirs):
    return hf_dirs("llama")[0]  # a tiny dense model with a 256-token context


@pytest.fixture(scope="module")
def broken(model_dir, tmp_path_factory):
    """Copies of the model directory, each broken in one way."""
    root = tmp_path_factory.mktemp("broken")

    def variant(name: str, edit) -> str:
        d = root / name
        shutil.copytree(model_dir, d)
        edit(d)
        return str(d)

    def overlap(d: Path) -> None:
        f = next(d.glob("*.safetensors"))
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
        if header[a]["dtype"] == header[b]["dtype"] and header[a]["shape"] == header[b]["shape"]:
            header[b]["data_offsets"] = header[a]["data_offsets"]
        else:  # same bytes, seen twice: shape b like a
            header[b] = dict(header[a])
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    def corrupt_header(d: Path) -> None:
        f = next(d.glob("*.safetensors"))
        data = bytearray(f.read_bytes())
        data[8:20] = b"{{{{{{{{{{{{"
        f.write_bytes(bytes(data))

    return {
        "bad_config_json": variant("bad-config", lambda d: (d / "config.json").write_text("{not json")),
        "bad_generation": variant("bad-gen", lambda d: (d / "generation_config.json").write_text("[1, 2")),
        "eos_text": variant("eos-text", lambda d: (d / "generation_config.json").write_text('{"eos_token_id": "x"}')),
        "unknown_arch": variant("arch", lambda d: (d / "config.json").write_text('{"model_type": "gpt5"}')),
        "bad_tokenizer": variant("tok", lambda d: (d / "tokenizer.json").write_text("nonsense")),
        "overlap": variant("overlap", overlap),
        "corrupt": variant("corrupt", corrupt_header),
        "no_config": variant("no-config", lambda d: (d / "config.json").unlink()),
    }


def cli_run(capsys, *argv: str, stdin: bytes | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# (name, argv builder, expected stderr fragment); `M` is replaced by the model directory, `B:x` by broken[x]
CLI_CASES = [
    ("generate: missing model dir", ["generate", "--model", "/no/such/dir", "--prompt", "x"], "does not exist"),
    ("generate: model is a file", ["generate", "--model", "M/config.json", "--prompt", "x"], "is a file"),
    ("generate: dir without config", ["generate", "--model", "B:no_config", "--prompt", "x"], "has no config.json"),
    ("generate: config not JSON", ["generate", "--model", "B:bad_config_json", "--prompt", "x"], "not valid JSON"),
    ("generate: generation_config not JSON", ["generate", "--model", "B:bad_generation", "--prompt", "x"],
     "generation_config.json: not valid JSON"),
    ("generate: eos id is text", ["generate", "--model", "B:eos_text", "--prompt", "x"], "eos_token_id must be"),
    ("generate: unknown architecture", ["generate", "--model", "B:unknown_arch", "--prompt", "x"],
     "unsupported architecture 'gpt5'"),
    ("generate: corrupt tokenizer", ["generate", "--model", "B:bad_tokenizer", "--prompt", "x"],
     "cannot read tokenizer"),
    ("generate: overlapping tensors", ["generate", "--model", "B:overlap", "--prompt", "x"], "overlapping tensors"),
    ("generate: corrupt safetensors", ["generate", "--model", "B:corrupt", "--prompt", "x"], "corrupt header"),
    ("generate: negative max tokens", ["generate", "--model", "M", "--prompt", "x", "--max-new-tokens", "-1"],
     "max_new_tokens must be >= 0"),
    ("generate: negative temperature", ["generate", "--model", "M", "--prompt", "x", "--temperature", "-1"],
     "temperature must be >= 0"),
    ("generate: nan temperature", ["generate", "--model", "M", "--prompt", "x", "--temperature", "nan"],
     "temperature must be a finite number"),
    ("generate: top-p 0", ["generate", "--model", "M", "--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
    ("generate: top-p 1.5", ["generate", "--model", "M", "--prompt", "x", "--top-p", "1.5"], "top_p must be in"),
    ("generate: top-k 0", ["generate", "--model", "M", "--prompt", "x", "--top-k", "0"], "top_k must be >= 1"),
    ("generate: chunk 0", ["generate", "--model", "M", "--prompt", "x", "--chunk-size", "0"],
     "--chunk-size must be >= 1"),
    ("generate: max-context 0", ["generate", "--model", "M", "--prompt", "x", "--max-context", "0"],
     "--max-context must be >= 1"),
    ("generate: missing context file", ["generate", "--model", "M", "--prompt", "x", "--context-file", "/no/file"],
     "No such file"),
    ("generate: binary context file", ["generate", "--model", "M", "--prompt", "x", "--context-file",
                                       "M/model.safetensors"], "is not UTF-8 text"),
    ("generate: prompt beyond context", ["generate", "--model", "M", "--prompt", "word " * 600],
     "this model's context is 256 tokens"),
    ("generate: no GPU here", ["generate", "--model", "M", "--prompt", "x", "--device", "cuda"], "no CUDA device"),
    ("generate: unknown device", ["generate", "--model", "M", "--prompt", "x", "--device", "tpu"],
     "is not a device name"),
    ("info: missing model dir", ["info", "--model", "/no/such/dir"], "does not exist"),
    ("info: dir without config", ["info", "--model", "B:no_config"], "has no config.json"),
    ("train: unknown config", ["train", "no-such.toml"], "neither a preset"),
    ("train: lr not a number", ["train", "tiny", "--set", "optim.lr='fast'"], "optim.lr = 'fast' should be"),
    ("train: lr infinite", ["train", "tiny", "--set", "optim.lr=inf"], "optim.lr = inf: must be a finite"),
    ("train: beta out of range", ["train", "tiny", "--set", "optim.beta1=1.5"], "optim.beta1 = 1.5: must be in"),
    ("train: keep -1", ["train", "tiny", "--set", "keep_checkpoints=-1"], "keep_checkpoints = -1"),
    ("train: save every -1", ["train", "tiny", "--save-every", "-1"], "save_every = -1"),
    ("train: stop at 0", ["train", "tiny", "--stop-at", "0"], "--stop-at must be a step >= 1"),
    ("train: stop at -3", ["train", "tiny", "--stop-at", "-3"], "--stop-at must be a step >= 1"),
    ("train: bpe:0", ["train", "tiny", "--set", 'data.tokenizer="bpe:0"'], "at least 257 tokens"),
    ("train: bpe:-5", ["train", "tiny", "--set", 'data.tokenizer="bpe:-5"'], "at least 257 tokens"),
    ("train: rows past the context", ["train", "tiny", "--set", "data.seq_len=100000"],
     "longer than model.max_position_embeddings"),
    ("train: stage after the end", ["train", "tiny", "--set", "stages=[{start_step=5000, seq_len=128}]"],
     "a stage starts at step 5000"),
    ("train: unknown key", ["train", "tiny", "--set", "model.hidden_sise=64"], "unknown key(s) hidden_sise"),
    ("train: missing source", ["train", "tiny", "--set", 'data.sources=["/no/such/corpus"]', "--out", "T/a"],
     "does not exist"),
    ("train: resume without checkpoint", ["train", "tiny", "--resume", "--out", "T/empty"], "no complete checkpoint"),
    ("eval: no evaluation", ["eval"], "choose an evaluation"),
    ("eval: two targets", ["eval", "niah", "--model", "M", "--gemini-url", "http://x", "--out", "T/e"],
     "give one target"),
    ("eval: zero needles", ["eval", "niah", "--model", "M", "--needles", "0", "--out", "T/e"], "--needles 0"),
    ("eval: too many needles", ["eval", "niah", "--model", "M", "--needles", "100", "--out", "T/e"], "--needles 100"),
    ("eval: needle template", ["eval", "niah", "--model", "M", "--needle", "no placeholders", "--out", "T/e"],
     "lacks {city} and {value}"),
    ("eval: negative retries", ["eval", "niah", "--gemini-url", "http://127.0.0.1:9", "--model-name", "m",
                                "--retries", "-1", "--out", "T/e"], "--retries must be >= 0"),
    ("eval: zero samples", ["eval", "niah", "--model", "M", "--samples", "0", "--out", "T/e"], "--samples must be"),
    ("eval: lengths past the context", ["eval", "niah", "--model", "M", "--lengths", "100000", "--out", "T/e"],
     "exceed this model's context of 256 tokens"),
    ("eval: missing haystack", ["eval", "niah", "--model", "M", "--lengths", "100", "--haystack", "/no/hay",
                                "--out", "T/e"], "no such file or directory"),
    ("eval: nll of an endpoint", ["eval", "nll", "--gemini-url", "http://127.0.0.1:9", "--model-name", "m",
                                  "--out", "T/e"], "needs the model's log-probabilities"),
]  # fmt: skip


@pytest.mark.parametrize("name, argv, expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_input_with_one_line(name, argv, expected, model_dir, broken, tmp_path, capsys):
    def fill(a: str) -> str:
        if a.startswith("B:"):
            return broken[a[2:]]
        return a.replace("M/", f"{model_dir}/").replace("T/", f"{tmp_path}/") if a != "M" else str(model_dir)

    code, out, err = cli_run(capsys, *map(fill, argv))
    assert code == 2, (out, err)
    assert expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if name.startswith("train") and "--out" in argv:
        assert not (tmp_path / "a" / "checkpoints").exists()  # refused before any work
    # and a normal request right after it works
    code, out, err = cli_run(capsys, "generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens",
                             "3")  # fmt: skip
    assert code == 0, err


def test_argparse_choices_and_types_exit_2(model_dir, capsys):
    for argv in (["generate", "--model", str(model_dir), "--prompt", "x", "--dtype", "int8"],
                 ["generate", "--model", str(model_dir), "--prompt", "x", "--kv-dtype", "fp4"],
                 ["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "2.5"],
                 ["eval", "niah", "--model", str(model_dir), "--lengths", "1000,abc", "--out", "x"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "invalid" in err or "comma-separated integers" in err


def test_stdin_that_is_not_utf8_is_named(model_dir, capsys, monkeypatch):
    code, _, err = cli_run(capsys, "generate", "--model", str(model_dir), "--prompt", "-", stdin=b"ok \xff\xfe",
                           monkeypatch=monkeypatch)  # fmt: skip
    assert code == 2 and "the prompt on stdin is not UTF-8 text (byte 0xff at offset 3)" in err


def test_a_second_training_run_into_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    code, _, err = cli_run(capsys, "train", "tiny", "--out", str(out), "--steps", "2")
    assert code == 2 and "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # nothing changed


@pytest.fixture()
def m(model_dir):
    return longmoe.load(model_dir)


API_CASES = [
    ("chunk 0", lambda p: longmoe.load(p, chunk_size=0), ValueError, "engine option chunk_size must be >= 1"),
    ("block 0", lambda p: longmoe.load(p, block_size=0), ValueError, "engine option block_size must be >= 1"),
    ("chunk 2.5", lambda p: longmoe.load(p, chunk_size=2.5), TypeError, "chunk_size must be an integer"),
    ("unknown option", lambda p: longmoe.load(p, chunk=5), TypeError, "unknown engine option(s) chunk"),
    ("bad kv dtype", lambda p: longmoe.load(p, kv_dtype="int4"), ValueError, "kv_dtype 'int4'"),
    ("bad dtype", lambda p: longmoe.load(p, dtype="int8"), ValueError, "dtype 'int8'"),
    ("path not a path", lambda p: longmoe.load(123), TypeError, "model directory path"),
]  # fmt: skip

CALL_CASES = [
    ("bytes prompt", lambda m: m.generate(b"hello"), TypeError, "decode bytes first"),
    ("float token ids", lambda m: m.generate([1.5, 2.0]), TypeError, "token ids must be integers"),
    ("bool token ids", lambda m: m.generate([True]), TypeError, "token ids must be integers"),
    ("ids outside vocab", lambda m: m.generate([10**9]), ValueError, "outside the vocabulary"),
    ("empty prompt", lambda m: m.generate([]), ValueError, "the prompt is empty"),
    ("fractional max tokens", lambda m: m.generate("x", max_new_tokens=2.5), TypeError, "max_new_tokens must be an"),
    ("inf temperature", lambda m: m.generate("x", temperature=float("inf")), ValueError, "finite"),
    ("nan top_p", lambda m: m.generate("x", top_p=float("nan")), ValueError, "top_p must be a finite"),
    ("text seed", lambda m: m.generate("x", seed="7"), TypeError, "seed must be an integer"),
    ("stop not strings", lambda m: m.generate("x", stop=["a", 3]), TypeError, "stop must be a list of strings"),
    ("count non-text", lambda m: m.count_tokens(123), TypeError, "count_tokens takes text"),
    ("pin no name", lambda m: m.engine.pin("", [1, 2], ttl=10), TypeError, "non-empty string"),
    ("pin bad ttl", lambda m: m.engine.pin("a", [1, 2], ttl=-1), ValueError, "ttl must be"),
    ("pin empty", lambda m: m.engine.pin("a", [], ttl=10), ValueError, "the prompt is empty"),
    ("beyond the context", lambda m: m.generate([5] * 300), ContextLengthError, "this model's context is 256"),
    ("stream bad option", lambda m: list(m.stream("x", top_k=0)), ValueError, "top_k must be >= 1"),
]  # fmt: skip


@pytest.mark.parametrize("name, call, exc, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_load_refuses_bad_options(name, call, exc, message, model_dir):
    with pytest.raises(exc) as e:
        call(str(model_dir))
    assert message in str(e.value)
    assert len(longmoe.load(model_dir).generate("hello", max_new_tokens=2).token_ids) == 2


@pytest.mark.parametrize("name, call, exc, message", CALL_CASES, ids=[c[0] for c in CALL_CASES])
def test_api_refuses_bad_requests_and_keeps_working(name, call, exc, message, m):
    expected = m.generate("hello", max_new_tokens=3).token_ids
    free = {k: p.available for k, p in m.engine.cache.pools.items()}
    with pytest.raises(exc) as e:
        call(m)
    assert message in str(e.value)
    assert m.generate("hello", max_new_tokens=3).token_ids == expected
    assert not m.engine.has_work() and {k: p.available for k, p in m.engine.cache.pools.items()} == free


def test_a_stop_string_is_one_stop_sequence(m):
    free = m.generate("hello", max_new_tokens=20)
    text = free.text
    stop = text[2:5] if len(text) > 6 else None
    if stop:
        assert m.generate("hello", max_new_tokens=20, stop=stop).text == text[: text.index(stop)]


def test_a_broken_pipe_is_quiet(model_dir):
    import subprocess
    import sys

    p = subprocess.run(f"{sys.executable} -m longmoe.cli generate --model {model_dir} --prompt hello "
                       "--max-new-tokens 200 | head -c 1", shell=True, capture_output=True, timeout=120)  # fmt: skip
    assert b"Broken pipe" not in p.stderr and b"Traceback" not in p.stderr, p.stderr
