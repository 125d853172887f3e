"""The browser chat page (GET /) in a real headless Chromium (Debian's package) driven by Playwright, against
`qwen3lab serve`'s app on loopback. Skips where no Chromium is installed; .ci/run installs it."""

import json
import os
import shutil
import time

import httpx
import pytest
from helpers import serving, tiny_server_model

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("QWEN3LAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no Chromium installed: `apt-get install chromium` (or set QWEN3LAB_CHROMIUM)"
    ),
]


@pytest.fixture(scope="module")
def url(tmp_path_factory, tok):
    from qwen3lab.serve import create_app

    model = tiny_server_model(tmp_path_factory.mktemp("page"))
    with serving(create_app(model, tok, "tiny-chat")) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('model').textContent === 'tiny-chat'")
    yield page
    context.close()
    assert not errors, errors  # no script error in the page, ever


def settings(page, **values):
    if page.locator("#settings").is_hidden():
        page.click("#settings-button")
    for key, value in values.items():
        if isinstance(value, bool):
            page.set_checked(f"#{key}", value)
        else:
            page.fill(f"#{key}", str(value))


def ask(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")
    return page.locator(".msg.assistant").last


def metric(url, name):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_streamed_answer_appears_and_finishes(page, url):
    settings(page, temperature=0, max_tokens=60)
    page.fill("#input", "Hello there\nsecond line")  # Shift+Enter would make this new line; Enter sends
    page.press("#input", "Shift+Enter")
    assert page.input_value("#input").count("\n") == 2  # still in the box, not sent
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as streamed:
        answer = ask(page, "Hello there")
    answer.wait_for(state="attached")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=30_000)
    # tokens arrived one piece at a time: counted in what the page read, not in how often the browser
    # repainted (a loaded machine hands several pieces to one read)
    pieces = [line for line in streamed.value.text().splitlines() if line.startswith("data: {")]
    assert len(pieces) > 5
    assert page.locator(".msg.user .body").last.inner_text() == "Hello there"
    # the same request through the API, greedy: the same number of tokens, as the page reports them
    want = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 60},
        timeout=30,
    ).json()
    tokens = want["usage"]["completion_tokens"]
    assert answer.locator(".meta").inner_text().startswith(f"{tokens} tokens")
    assert "tokens/s" in page.inner_text("#rate")
    assert page.is_visible("#send") and page.is_hidden("#stop")


def test_thinking_toggle_and_settings_reach_the_request(page):
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/completions") else None)
    settings(page, thinking=False, temperature=0.3, top_p=0.5, max_tokens=5, system="Be brief.")
    ask(page, "one")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    settings(page, thinking=True)
    ask(page, "two")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-state=done]').length === 2")
    first, second = bodies
    assert first["chat_template_kwargs"] == {"enable_thinking": False}
    assert second["chat_template_kwargs"] == {"enable_thinking": True}
    assert (first["temperature"], first["top_p"], first["max_tokens"]) == (0.3, 0.5, 5)
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"}]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]  # the conversation
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.reload()  # settings are remembered
    page.wait_for_function("() => document.getElementById('model').textContent === 'tiny-chat'")
    assert page.input_value("#top_p") == "0.5" and page.input_value("#system") == "Be brief."


def test_stop_cancels_a_long_answer(page, url):
    settings(page, temperature=1, max_tokens=3000)
    answer = ask(page, "Tell me a very long story")
    page.wait_for_function("() => document.querySelector('.msg.assistant .body').textContent.length > 20")
    assert page.is_visible("#stop")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]")
    assert answer.locator(".body").inner_text()  # what came stays on the page
    deadline = time.time() + 60  # generous: a shared machine can be slow
    while metric(url, "qwen3lab_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    assert metric(url, "qwen3lab_requests_running") == 0  # the row left the engine
    generated = metric(url, "qwen3lab_generated_tokens_total")
    time.sleep(0.3)
    assert metric(url, "qwen3lab_generated_tokens_total") == generated
    assert page.is_visible("#send")


def sse(*deltas, usage=None):
    chunks = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({"choices": [], "usage": usage or {"completion_tokens": 9}})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


SCRIPTED = sse(
    {"role": "assistant", "content": ""},
    {"reasoning_content": "The user wants <b>HTML</b>. "},
    {"reasoning_content": "I'll answer in markdown."},
    {"content": "Here is <script>window.pwned = 1</script> and <img src=x onerror='window.pwned = 2'>, as text.\n\n"},
    {"content": "**Bold**, *italic* and `inline <code>`:\n\n- one\n- two\n\n```python\nprint('<hi>')\n```\n"},
    {
        "tool_calls": [
            {
                "index": 0,
                "id": "c0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ]
    },
)


def test_model_output_is_text_never_html(page, tmp_path):
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=SCRIPTED),
    )
    answer = ask(page, "Show me some HTML")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    assert page.evaluate("window.pwned") is None
    assert page.locator("#log img, #log script, #log b").count() == 0
    body = answer.locator(".body")
    assert "<script>window.pwned = 1</script>" in body.inner_text()
    assert "<img src=x onerror='window.pwned = 2'>" in body.inner_text()
    assert body.locator("strong").inner_text() == "Bold" and body.locator("em").inner_text() == "italic"
    assert body.locator("pre code").inner_text() == "print('<hi>')"
    assert body.locator("p code").inner_text() == "inline <code>"
    assert body.locator("li").count() == 2
    think = answer.locator("details.think")  # dimmed, collapsed once the answer is done, opens on a click
    assert think.inner_text().startswith("Thought") and not think.evaluate("d => d.open")
    think.locator("summary").click()
    assert "The user wants <b>HTML</b>." in think.inner_text()
    assert float(think.evaluate("d => getComputedStyle(d).opacity")) < 1
    assert answer.locator(".tool-call").inner_text() == 'call get_weather({"city": "Paris"})'
    shot = os.environ.get("QWEN3LAB_SCREENSHOT")  # the README's picture: QWEN3LAB_SCREENSHOT=docs/chat.png
    page.screenshot(path=shot or tmp_path / "chat.png")


def test_errors_are_shown_never_a_silent_hang(page):
    busy = {"error": {"message": "server busy: 256 requests are waiting already", "type": "invalid_request_error"}}
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=503, json=busy))
    ask(page, "hello?")
    error = page.wait_for_selector(".msg.assistant[data-state=error] .error")
    assert "503" in error.inner_text() and "busy" in error.inner_text()
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionreset"))
    ask(page, "still there?")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-state=error]').length === 2")
    assert "Connection lost" in page.locator(".error").last.inner_text()
    page.unroute("**/v1/chat/completions")  # a stream that ends without [DONE]: the connection dropped mid-answer
    cut = SCRIPTED[: SCRIPTED.index("data: [DONE]")][:200]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(content_type="text/event-stream", body=cut))
    ask(page, "and now?")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-state=error]').length === 3")
    assert "closed before the answer was complete" in page.locator(".error").last.inner_text()
    page.unroute("**/v1/chat/completions")  # the real server's own 400
    settings(page, max_tokens=10**6)
    ask(page, "too long")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-state=error]').length === 4")
    assert "Error 400" in page.locator(".error").last.inner_text()
    assert page.is_visible("#send")  # ready for the next message


def test_api_key_from_settings(browser, tok, tmp_path):
    """Against a server started with --api-key: without the key the page says so (401 and where to set it); with
    the key in Settings the model's name shows and answers stream; the key is sent as a bearer header."""
    from qwen3lab.serve import create_app

    model = tiny_server_model(tmp_path / "m")
    with serving(create_app(model, tok, "keyed", api_key="k3y")) as base:
        context = browser.new_context()
        page = context.new_page()
        page.goto(base + "/")
        page.wait_for_function("() => document.getElementById('model').textContent.includes('401')")
        ask(page, "hello")
        page.wait_for_selector(".msg.assistant[data-state=error]")
        assert "set the server's API key in Settings" in page.locator(".msg.assistant").last.inner_text()
        sent = []
        page.on("request", lambda r: sent.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
        settings(page, api_key="k3y")
        page.press("#api_key", "Tab")  # the change event: the model's name is fetched again, with the key
        page.wait_for_function("() => document.getElementById('model').textContent === 'keyed'")
        settings(page, max_tokens=4)
        ask(page, "hello")
        page.wait_for_selector(".msg.assistant[data-state=done]")
        assert set(sent) == {"Bearer k3y"}
        context.close()
