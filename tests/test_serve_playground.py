"""The playground at / in a real browser (Debian's chromium driven by Playwright; no browser download): attach a
file and watch its tokens counted against the context, stream an answer, build a context cache from the file and
ask questions against it (cached-token counts and time to first token shown). Leaves a screenshot in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serve_harness import KEY, ServerProcess, build_model

import longmoe

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
DOC = "".join(f"Line {i}: the special magic number of city {i} is {1000 + 37 * i}.\n" for i in range(40))
QUESTIONS = ["What is the special magic number of city 7?", "And of city 12?"]
BLOCK = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("data"))
    yield srv
    srv.kill()


def test_playground_counts_streams_and_caches(server, model_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium (apt-get install chromium)")
    expect = sync_api.expect
    local = longmoe.load(model_dir)
    doc = tmp_path / "cities.txt"
    doc.write_text(DOC)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            expect(page.locator("#model")).to_have_value("models/tiny")
            expect(page.locator("#status")).to_have_text("ready")

            # attach a file: uploaded through the Files API, its tokens counted against the context
            page.set_input_files("#files", str(doc))
            expect(page.locator("#files-list li")).to_have_count(1)
            expect(page.locator("#token-count")).to_have_attribute("data-tokens", str(local.count_tokens(DOC)))
            expect(page.locator("#token-count")).to_contain_text("/ 8,192 tokens")
            page.fill("#prompt", QUESTIONS[0])
            prompt = DOC + "\n\n" + QUESTIONS[0]
            expect(page.locator("#token-count")).to_have_attribute("data-tokens", str(local.count_tokens(prompt)))

            # stream an answer: the same text the Python API gives
            page.fill("#max-tokens", "16")
            page.click("#run")
            expect(page.locator("#answer")).to_have_attribute("data-done", "1", timeout=60_000)
            assert page.text_content("#answer") == local.generate(prompt, max_new_tokens=16).text
            expect(page.locator("#status")).to_have_text("done (MAX_TOKENS)")

            # a context cache from the attached file, then questions against it
            page.click("#create-cache")
            expect(page.locator("#cache-info")).to_contain_text("cachedContents/", timeout=60_000)
            cached = str(local.count_tokens(DOC) // BLOCK * BLOCK)
            for q in QUESTIONS:
                page.fill("#prompt", q)
                page.click("#run")
                expect(page.locator("#answer")).to_have_attribute("data-done", "1", timeout=60_000)
                assert page.text_content("#answer") == local.generate(DOC + "\n\n" + q, max_new_tokens=16).text
                expect(page.locator("#run-stats")).to_contain_text("time to first token")
                expect(page.locator("#run-stats")).to_contain_text("from the cache")
            rows = page.locator("#history tr")
            expect(rows).to_have_count(3)
            assert [rows.nth(i).get_attribute("data-cached") for i in range(3)] == ["0", cached, cached]
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
            assert (tmp_path / "playground.png").stat().st_size > 10_000
            assert not errors, errors
        finally:
            browser.close()
