"""The web chat page at / in a real headless browser (Debian's chromium + chromium-driver, driven
by Selenium) against a real jaxgpt.serve server: the model picker lists the served models, a
typed message is sent and its streamed reply appears and ends (equal to the API's greedy
answer), a second turn sends the first one along, New chat forgets it, Stop aborts a long reply
and frees its slot; over several random small models, templates and prompts the page's reply is
exactly the text the API streams for the same request (issue 23: with the default max tokens of
256 a model of context 256 answered nothing). A screenshot is saved to
test-artifacts/serve_chat.png."""

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

import torch  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from jaxgpt.serve.app import build_service, create_app  # noqa: E402

from conftest import random_adapter  # noqa: E402
from test_serve import Server, metric, sse, wait_for  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,  # a browser and a server: the slow tier
              pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                 reason="needs Debian's chromium and chromium-driver (apt-get install "
                                        "chromium chromium-driver; .ci/run does)")]


def random_gpt2(path, seed, **shape):
    """A GPT-2-shaped Hugging Face folder with random weights (torch seed `seed`)."""
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the whole module."""
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(DRIVER), options=opts)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory, browser):
    root = tmp_path_factory.mktemp("browser")
    random_gpt2(root / "hf", 0, n_layer=2, n_head=2, n_embd=32, n_positions=128)
    a = random_adapter(root / "hf", root / "ad_a", 4, ["c_attn"], 1)
    service = build_service(str(root / "hf"), [("helper", str(a))], max_batch=2, warmup=False,  # (no
                            log=lambda s: None)  # background warm-up left beside the later tests' servers)
    server = Server(create_app(service))
    try:
        yield server, service, browser
    finally:
        server.close()
        service.scheduler.stop()


def api_answer(url, messages, max_tokens):
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "hf", "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def replies(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")


def set_value(driver, css, value):
    el = driver.find_element(By.CSS_SELECTOR, css)
    el.clear()
    el.send_keys(str(value))


def send(driver, text):
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()


def wait_done(driver, n, timeout=30):
    wait_for(lambda: len(replies(driver)) == n and replies(driver)[-1].get_attribute("data-done") == "1",
             timeout, f"reply {n} to end")
    return replies(driver)[-1]


def test_chat_page_in_a_real_browser(site):
    server, service, driver = site
    driver.get(server.url + "/")
    assert driver.title == "jaxgpt chat"
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "select#model option")) == 2, 20, "models")
    assert [o.text for o in driver.find_elements(By.CSS_SELECTOR, "select#model option")] == ["hf", "helper"]
    set_value(driver, "#temperature", 0)
    set_value(driver, "#max-tokens", 8)

    # turn 1: the streamed reply appears, ends, and is the API's greedy answer
    send(driver, "Name a color.")
    first = wait_done(driver, 1)
    want = api_answer(server.url, [{"role": "user", "content": "Name a color."}], 8)
    assert first.get_attribute("textContent") == want and first.get_attribute("data-finish") == "length"
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == ""

    # turn 2 sends turn 1 along
    send(driver, "And another?")
    second = wait_done(driver, 2)
    convo = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": want},
             {"role": "user", "content": "And another?"}]
    sent = driver.execute_script("return window.jaxgptChat.lastRequest")
    assert sent["messages"] == convo and sent["stream"] is True and sent["model"] == "hf"
    assert second.get_attribute("textContent") == api_answer(server.url, convo, 8)
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "serve_chat.png"))

    # New chat forgets the conversation
    driver.find_element(By.ID, "new-chat").click()
    assert replies(driver) == [] and driver.execute_script("return window.jaxgptChat.messages") == []

    # Stop aborts a long reply: the request is cancelled and its slot freed
    sched = service.scheduler
    cancelled = metric(server.url, "requests_cancelled_total")
    set_value(driver, "#max-tokens", 90)
    send(driver, "Tell me a long story.")
    rows = sched.engine.requests
    wait_for(lambda: any(r is not None and len(r.tokens) >= 2 for r in rows), 20, "decoding")
    sched.pause()  # (no step runs now: the reply cannot finish before Stop is clicked)
    try:
        wait_for(lambda: len(replies(driver)) == 1 and len(replies(driver)[0].get_attribute("textContent")) > 0, 20, "streaming")
        assert driver.find_element(By.ID, "stop").is_enabled()
        driver.find_element(By.ID, "stop").click()
        reply = wait_done(driver, 1)
        assert reply.get_attribute("data-finish") == "stopped"
        wait_for(lambda: any(j.cancelled for j in _jobs(service)), 20, "the server to see the abort")
    finally:
        sched.resume()
    wait_for(lambda: metric(server.url, "requests_running") == 0, 20, "the slot to be freed")
    assert metric(server.url, "requests_cancelled_total") == cancelled + 1
    assert metric(server.url, "generation_tokens_total") > 0
    assert driver.find_element(By.ID, "send").is_enabled() and not driver.find_element(By.ID, "stop").is_enabled()
    # the stopped reply stays in the conversation, and the page keeps working
    assert driver.execute_script("return window.jaxgptChat.messages.length") == 2
    set_value(driver, "#max-tokens", 4)
    send(driver, "Thanks.")
    assert wait_done(driver, 2).get_attribute("data-finish") == "length"
    logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] if hasattr(driver, "get_log") else []
    assert not logs, json.dumps(logs)[:500]


def _jobs(service):
    return [r.on_token.__self__.job for r in service.scheduler.engine.requests if r is not None]


def test_page_is_self_contained(site):
    """No CDN or other outside resource: the page works offline."""
    server, _, _ = site
    html = httpx.get(server.url + "/").text
    for bad in ("http://", "https://", "//cdn", "@import", "src="):
        assert bad not in html, bad
    assert re.findall(r'href="([^"]*)"', html) == ["data:,"]  # the favicon, inline
    for needed in ('id="prompt"', 'id="send"', 'id="stop"', 'id="new-chat"', '<select id="model"',
                   'id="messages"', "getReader", "AbortController"):
        assert needed in html, needed


def api_stream(url, body):
    """The text and finish_reason that POST /v1/chat/completions streams for `body`."""
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        chunks = sse(r)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    return text, finish[-1]


# (torch seed, GPT-2 shape, --template, sessions): each model is served alone; a session loads the
# page, sets its fields (None: the page's default is kept) and has its chats of turns, and the
# page's reply to each turn must be what the API streams for the same conversation, temperature,
# seed and max tokens. (Two shapes; a shape compiles once.)
ISSUE = dict(n_layer=2, n_head=4, n_embd=64, n_positions=256)
SMALL = dict(n_layer=1, n_head=2, n_embd=32, n_positions=128)
MODELS = [
    # issue 23 exactly: context 256, chatml, the page's default max tokens (256); greedy first,
    # then the default temperature with a seed. Each reply fills the context, so a second turn
    # is then too long (checked after the last chat).
    (6, ISSUE, "chatml", [
        (dict(temperature=0, max_tokens=None, seed=None), [["Hello there, who are you?"]]),
        (dict(temperature=None, max_tokens=None, seed=1234),
         [["Hello there, who are you?"], ["Write a haiku about rain."]]),
    ]),
    # the alpaca template: its prompt leaves less room than max tokens, so the reply gets the room
    # that is left; then greedy with empty seed and max tokens fields (as many as fit)
    (11, ISSUE, None, [(dict(temperature=1.0, max_tokens=240, seed=7), [["¿Qué tal? 你好 — naïve café ☕"]]),
                       (dict(temperature=0, max_tokens="", seed=""), [["Name three colors."]])]),
    # a cap that fits, two turns (both prompts of 17..32 tokens: one compiled prompt length)
    (1, SMALL, "none", [(dict(temperature=0.9, max_tokens=6, seed=99),
                         [["Once upon a time, in a small village by the sea, there lived an old man", " who"]])]),
]


def field(driver, css):
    """An input's value ("" where the page has no such input)."""
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].get_attribute("value") if found else ""


def test_page_reply_is_the_api_stream(tmp_path, browser):
    """Issue 23: the page showed an empty reply where the API returned text (its default max tokens,
    256, did not fit beside any prompt in a context of 256, so every request was refused). For
    random small models, templates, settings and prompts, the page's final reply == the API's stream."""
    driver = browser
    driver.get_log("browser")  # (what earlier tests logged)
    for seed, shape, template, sessions in MODELS:
        hf = random_gpt2(tmp_path / str(seed) / "hf", seed, **shape)  # (served as "hf")
        service = build_service(str(hf), template=template, max_batch=1, warmup=False, log=lambda s: None)
        server = Server(create_app(service))
        try:
            for settings, chats in sessions:
                driver.get(server.url + "/")
                wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "select#model option")) == 1,
                         20, "the models")
                for name, value in settings.items():
                    if value is not None:
                        set_value(driver, "#" + name.replace("_", "-"), value)
                want = {"model": "hf", "truncate_prompt_tokens": -1}  # (empty temperature: the server's)
                if field(driver, "#temperature"):
                    want["temperature"] = float(field(driver, "#temperature"))
                if field(driver, "#seed"):
                    want["seed"] = int(field(driver, "#seed"))
                cap = int(field(driver, "#max-tokens")) if field(driver, "#max-tokens") else None
                for turns in chats:
                    driver.find_element(By.ID, "new-chat").click()
                    convo = []
                    for i, user in enumerate(turns):
                        convo.append({"role": "user", "content": user})
                        send(driver, user)
                        reply = wait_done(driver, i + 1, timeout=120)
                        body = {**want, "messages": list(convo)}
                        if cap is not None:
                            body["max_tokens"] = cap
                            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
                            if r.status_code == 400:  # no room for the cap: "at most" is the room left
                                assert r.json()["error"]["code"] == "context_length_exceeded", r.text
                                del body["max_tokens"]
                        text, finish = api_stream(server.url, body)
                        where = f"model seed {seed}, {settings}, turn {convo}"
                        assert reply.get_attribute("textContent") == text, where
                        assert text, where  # (these models and settings all say something)
                        assert driver.find_elements(By.CSS_SELECTOR, ".msg.error") == [], where
                        assert reply.get_attribute("data-finish") == finish, where
                        sent = driver.execute_script("return window.jaxgptChat.lastRequest")
                        assert {k: v for k, v in sent.items() if k not in ("stream", "stream_options")} == body, where
                        convo.append({"role": "assistant", "content": text})
                    assert driver.execute_script("return window.jaxgptChat.messages") == convo
            assert driver.find_element(By.ID, "max-tokens").get_attribute("max") == str(shape["n_positions"])
        finally:
            server.close()
            service.scheduler.stop()
    logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and " 400 " not in e["message"]]
    assert not logs, json.dumps(logs)[:500]


@pytest.mark.slow
def test_page_keeps_talking_past_the_context(tmp_path, browser):
    """Issue 28: a conversation that outgrows the context (256 tokens, replies of 120) goes on: the
    page asks the server to truncate, the oldest turns leave the prompt (the server says how many),
    their bubbles are marked as no longer seen, and each reply is the API's for the conversation
    without them."""
    driver = browser
    hf = random_gpt2(tmp_path / "hf", 6, **ISSUE)  # (its greedy replies never stop early)
    service = build_service(str(hf), template="chatml", max_batch=1, warmup=False, log=lambda s: None)
    server = Server(create_app(service))
    try:
        driver.get(server.url + "/")
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "select#model option"), 20, "the models")
        set_value(driver, "#temperature", 0)
        set_value(driver, "#max-tokens", 120)
        convo = []
        for i, user in enumerate(["Hello there, who are you?", "Write a haiku about rain.", "And one about snow?"]):
            convo.append({"role": "user", "content": user})
            send(driver, user)
            reply = wait_done(driver, i + 1, timeout=600)  # (the first compiles: a loaded CPU is slow)
            assert driver.find_elements(By.CSS_SELECTOR, ".msg.error") == []
            r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
                "messages": convo, "max_tokens": 120, "temperature": 0, "truncate_prompt_tokens": -1})
            dropped = int(r.headers.get("x-dropped-messages", 0))
            seen = convo[dropped:]  # (no system message here)
            alone = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
                "messages": seen, "max_tokens": 120, "temperature": 0}).json()["choices"][0]["message"]["content"]
            assert reply.get_attribute("textContent") == r.json()["choices"][0]["message"]["content"] == alone
            bubbles = driver.find_elements(By.CSS_SELECTOR, "#messages .msg.user, #messages .msg.assistant")
            assert ["unseen" in b.get_attribute("class") for b in bubbles[:len(convo)]] == \
                [j < dropped for j in range(len(convo))]
            if dropped:
                note = driver.find_element(By.CSS_SELECTOR, ".unseen-note").get_attribute("textContent")
                assert f"no longer sees the {dropped} messages" in note
            convo.append({"role": "assistant", "content": alone})
        assert dropped >= 2  # the conversation did outgrow the context
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "serve_chat_truncated.png"))
    finally:
        server.close()
        service.scheduler.stop()
