"""Evaluations against a real HTTP server speaking the Gemini API (written here) and against a local model."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import longmoe
from longmoe.eval.niah import load_haystack
from longmoe.eval.nll import fit_power_law

LENGTHS = "300,600,1200"
DEPTHS = "0,50,100"


class GeminiStub(BaseHTTPRequestHandler):
    """models/{behaviour}:generateContent and :countTokens. Tokens are whitespace-separated words (the endpoint's
    own tokenizer, which the harness must use for sizing). Behaviours: oracle (reads the needles and answers),
    liar (always wrong), flaky (every other request is a 503, else oracle), down (always 500), gated (oracle, each
    answer waiting for the test to release `gate`)."""

    calls = 0
    lock = threading.Lock()
    gate = threading.Semaphore(0)
    recovered = False

    def log_message(self, *args):  # keep test output clean
        pass

    def reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        m = re.match(r"^/v1beta/models/([\w-]+):(generateContent|countTokens)$", self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not m or self.headers.get("x-goog-api-key") != "test-key":
            return self.reply(404 if not m else 403, {"error": {"code": 403, "message": "bad key or path"}})
        behaviour, method = m.groups()
        text = "".join(p["text"] for c in body["contents"] for p in c["parts"])
        if method == "countTokens":
            if behaviour == "nullcount":
                return self.reply(200, {"totalTokens": None})
            return self.reply(200, {"totalTokens": 7 if behaviour == "constcount" else len(text.split())})
        if behaviour == "nulltext":
            return self.reply(200, {"candidates": [{"content": {"parts": [{"text": None}]}}]})
        if behaviour == "nonobject":
            return self.reply(200, ["not", "an", "object"])
        with GeminiStub.lock:
            GeminiStub.calls += 1
            n = GeminiStub.calls
        if (behaviour == "down" and not GeminiStub.recovered) or (behaviour == "flaky" and n % 2):
            return self.reply(503 if behaviour == "flaky" else 500, {"error": {"code": 503, "status": "UNAVAILABLE"}})
        if behaviour == "gated":  # answers only while the test lets it (deterministic interrupts)
            GeminiStub.gate.acquire()
        if behaviour == "liar":
            answer = "The special magic number is 1234567."
        else:
            asked = re.findall(r"special magic (\w+) number\?", text) or re.findall(r"numbers for ([\w, ]+)\?", text)
            cities = [c.strip() for c in ", ".join(asked).split(",") if c.strip()]
            values = [v for c in cities for v in re.findall(rf"The special magic {c} number is: (\d+)", text)]
            answer = " ".join(values) or "I do not know."
        return self.reply(200, {"candidates": [{"content": {"role": "model", "parts": [{"text": answer}]},
                                                "finishReason": "STOP"}]})  # fmt: skip


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), GeminiStub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def run_eval(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longmoe.cli", "eval", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def niah(server: str, behaviour: str, out, *extra: str) -> dict:
    proc = run_eval("niah", "--gemini-url", server, "--api-key", "test-key", "--model-name", behaviour,
                    "--lengths", LENGTHS, "--depths", DEPTHS, "--out", str(out), "--json", "--quiet",
                    "--retries", "4", *extra)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_perfect_target_scores_100_and_sizing_lands_on_the_length(server, tmp_path):
    summary = niah(server, "oracle", tmp_path)
    assert summary["recall"] == 1.0 and summary["errors"] == 0
    assert set(summary["recall_per_length"]) == {"300", "600", "1200"}
    longest = max(len(s.split()) for s in load_haystack(None).units)
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert len(cells) == 9
    for c in cells:
        # stated tolerance: the prompt is at most `length` tokens (by the endpoint's countTokens) and short of it
        # by less than one haystack sentence
        assert c["length"] - longest <= c["prompt_tokens"] <= c["length"], c
    depths = {c["depth"]: c["depth_actual"] for c in cells if c["length"] == 1200}
    assert depths[0] < 0.05 and 0.4 < depths[50] < 0.6 and depths[100] > 0.9
    png = (tmp_path / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_wrong_target_scores_0(server, tmp_path):
    summary = niah(server, "liar", tmp_path)
    assert summary["recall"] == 0.0 and summary["errors"] == 0


def test_flaky_target_is_retried_and_scores_correctly(server, tmp_path):
    before = GeminiStub.calls
    summary = niah(server, "flaky", tmp_path, "--concurrency", "1")
    assert summary["recall"] == 1.0 and summary["errors"] == 0
    assert GeminiStub.calls - before >= 2 * 9 - 1  # every other generate call was a 503 and was retried


def test_failing_target_is_marked_as_error_not_miss(server, tmp_path):
    summary = niah(server, "down", tmp_path, "--retries", "1", "--lengths", "300", "--depths", "50")
    assert summary["errors"] == 1 and summary["recall"] is None  # grey cell, not a 0% recall
    cell = json.loads((tmp_path / "results.json").read_text())["cells"][0]
    assert cell["score"] is None and "HTTP 500" in cell["error"]


def test_multi_needle_mode_asks_for_all(server, tmp_path):
    summary = niah(server, "oracle", tmp_path, "--needles", "3", "--lengths", "600")
    assert summary["recall"] == 1.0
    cell = json.loads((tmp_path / "results.json").read_text())["cells"][0]
    assert len(cell["expected"]) == 3


def test_interrupt_and_resume_gives_the_same_results(server, tmp_path):
    args = ["niah", "--gemini-url", server, "--api-key", "test-key", "--model-name", "gated", "--lengths", LENGTHS,
            "--depths", DEPTHS, "--concurrency", "1", "--quiet"]  # fmt: skip
    for _ in range(3):
        GeminiStub.gate.release()  # three answers, then the fourth request waits: no timing involved
    # The child gets Ctrl-C's default action even when this suite runs as a background job (`cmd &`), where the
    # shell starts everything with SIGINT ignored and Python would then never raise KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "longmoe.cli", "eval", *args, "--out", str(tmp_path / "a")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    results = tmp_path / "a" / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C while the fourth cell is in flight
    for _ in range(1000):
        GeminiStub.gate.release()  # from now on the stub answers at once
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rerun the same command to resume" in err
    assert len(results.read_text().splitlines()) in (3, 4)  # the cell in flight may or may not have landed
    resumed = run_eval(*args, "--out", str(tmp_path / "a"))
    assert resumed.returncode == 0, resumed.stderr
    assert len(results.read_text().splitlines()) == 9  # only the missing cells were measured
    once = run_eval(*args, "--out", str(tmp_path / "b"))
    assert once.returncode == 0

    def cells(d):
        rows = json.loads((tmp_path / d / "results.json").read_text())["cells"]
        return sorted((r["key"], r["score"], r["prompt_tokens"], tuple(r["expected"])) for r in rows)

    assert cells("a") == cells("b")


def test_ruler_against_an_endpoint(server, tmp_path):
    proc = run_eval("ruler", "--gemini-url", server, "--api-key", "test-key", "--model-name", "liar", "--lengths",
                    "1000,2000", "--samples", "1", "--out", str(tmp_path), "--json", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert set(summary["per_task"]) == {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                        "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
                                        "vt", "cwe", "fwe"}  # fmt: skip
    assert summary["effective_length"] == 0 and "effective context length" in proc.stderr
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert all(c["prompt_tokens"] <= c["length"] for c in cells)


def test_local_model_niah_ruler_and_nll(hf_dirs, tmp_path):
    path, _ = hf_dirs("qwen3_moe")
    proc = run_eval("niah", "--model", str(path), "--lengths", "128,200", "--depths", "0,100", "--out",
                    str(tmp_path / "niah"), "--json", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert 0.0 <= summary["recall"] <= 1.0 and summary["errors"] == 0
    cells = json.loads((tmp_path / "niah" / "results.json").read_text())["cells"]
    tok = longmoe.load(path).tokenizer
    longest = max(len(tok.encode(" " + x, add_special_tokens=False)) for x in load_haystack(None).units)
    assert all(c["length"] - longest <= c["prompt_tokens"] <= c["length"] for c in cells)
    proc = run_eval("ruler", "--model", str(path), "--lengths", "256", "--tasks", "niah_single_1,vt,cwe,fwe",
                    "--out", str(tmp_path / "ruler"), "--quiet")  # fmt: skip
    # RULER's prompts do not fit a 256-token model (niah reserves 128 answer tokens, vt's one-shot example is 500)
    assert proc.returncode == 2 and "is too short: niah_single_1 needs" in proc.stderr
    assert "use longer --lengths or fewer --tasks" in proc.stderr and not (tmp_path / "ruler").exists()
    proc = run_eval("nll", "--model", str(path), "--max-context", "200", "--out", str(tmp_path / "nll"), "--json",
                    "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    nll = json.loads(proc.stdout)
    assert nll["fit"] is not None and "r2" in nll["fit"] and (tmp_path / "nll" / "nll.png").exists()


def test_nll_needs_a_local_model(server, tmp_path):
    proc = run_eval("nll", "--gemini-url", server, "--api-key", "test-key", "--model-name", "oracle", "--out",
                    str(tmp_path))  # fmt: skip
    assert proc.returncode == 2 and "needs the model's log-probabilities" in proc.stderr


def test_bad_arguments_are_clear(tmp_path):
    proc = run_eval("niah", "--model", "x", "--gemini-url", "http://x", "--out", str(tmp_path))
    assert proc.returncode == 2 and "give one target" in proc.stderr
    proc = run_eval("niah", "--model", "x", "--lengths", "1000,abc", "--out", str(tmp_path))
    assert proc.returncode == 2 and "comma-separated integers" in proc.stderr
    proc = run_eval("niah", "--model", "x", "--depths", "150", "--out", str(tmp_path))
    assert proc.returncode == 2 and "[0, 100]" in proc.stderr
    proc = run_eval("niah", "--gemini-url", "http://127.0.0.1:9", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--model-name is required" in proc.stderr


def test_power_law_fit_recovers_known_parameters():
    import numpy as np

    x = np.logspace(1, 6, 60)
    y = 3.0 * x**-0.2 + 1.5
    fit = fit_power_law(x, y)
    assert fit["r2"] > 0.9999
    assert abs(fit["b"] + 0.2) < 0.01 and abs(fit["c"] - 1.5) < 0.02 and abs(fit["a"] - 3.0) < 0.1


def test_another_target_never_reuses_answers_in_the_same_out(server, tmp_path):
    niah(server, "oracle", tmp_path, "--lengths", "300", "--depths", "50")
    proc = run_eval("niah", "--gemini-url", server, "--api-key", "test-key", "--model-name", "liar", "--lengths",
                    "300", "--depths", "50", "--out", str(tmp_path), "--quiet")  # fmt: skip
    assert proc.returncode == 2 and "holds results of a different run" in proc.stderr and "liar" in proc.stderr
    proc = run_eval("niah", "--gemini-url", server, "--api-key", "test-key", "--model-name", "oracle", "--lengths",
                    "300", "--depths", "50", "--seed", "1", "--out", str(tmp_path), "--quiet")  # fmt: skip
    assert proc.returncode == 2 and "seed" in proc.stderr  # another seed is another run too
    assert niah(server, "liar", tmp_path / "new", "--lengths", "300", "--depths", "50")["recall"] == 0.0


def test_errored_cells_are_measured_again_on_a_rerun(server, tmp_path):
    first = niah(server, "down", tmp_path, "--retries", "0", "--lengths", "300", "--depths", "0,50")
    assert first["errors"] == 2
    # the endpoint recovered: the same command measures the failed cells again (same target identity)
    GeminiStub.recovered = True
    try:
        second = niah(server, "down", tmp_path, "--retries", "0", "--lengths", "300", "--depths", "0,50")
    finally:
        GeminiStub.recovered = False
    assert second["errors"] == 0 and second["recall"] == 1.0


@pytest.mark.parametrize("behaviour, reason", [("nulltext", "no text"), ("nonobject", "not an object"),
                                               ("nullcount", "without a token count")])  # fmt: skip
def test_malformed_endpoint_answers_mark_the_cell_as_an_error(server, tmp_path, behaviour, reason):
    summary = niah(server, behaviour, tmp_path, "--retries", "0", "--lengths", "300", "--depths", "50")
    assert summary["errors"] == 1 and summary["recall"] is None
    cell = json.loads((tmp_path / "results.json").read_text())["cells"][0]
    assert reason in cell["error"]


def test_a_token_count_that_does_not_grow_stops_the_run(server, tmp_path):
    proc = run_eval("niah", "--gemini-url", server, "--api-key", "test-key", "--model-name", "constcount",
                    "--lengths", "300", "--depths", "50", "--out", str(tmp_path), "--quiet")  # fmt: skip
    assert proc.returncode == 2 and "token count does not grow" in proc.stderr and "Traceback" not in proc.stderr


def test_the_needle_lands_within_one_sentence_of_its_token_depth(server, tmp_path):
    niah(server, "oracle", tmp_path, "--lengths", "2000", "--depths", "10,25,50,75,90")
    hay = [len(s.split()) for s in load_haystack(None).units]
    one_sentence = max(hay) / 2000
    for c in json.loads((tmp_path / "results.json").read_text())["cells"]:
        assert c["depth"] / 100 - one_sentence <= c["depth_actual"] <= c["depth"] / 100 + 1e-9, c  # never forward


def test_question_only_ending_and_asking_each_needle(server, tmp_path):
    s = niah(server, "oracle", tmp_path, "--ending", "question", "--needles", "4", "--ask-each", "--lengths", "600",
             "--depths", "50")  # fmt: skip
    assert s["recall"] == 1.0 and s["ending"] == "question" and s["ask_each"]
    cell = json.loads((tmp_path / "results.json").read_text())["cells"][0]
    assert len(cell["answer"]) == 4 and len(cell["expected"]) == 4
