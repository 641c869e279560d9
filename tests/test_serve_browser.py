"""The web chat page at / in a real headless browser (Debian's chromium + chromium-driver, driven
by Selenium) against a real jaxgpt.serve server: the model picker lists the served models, a
typed message is sent and its streamed reply appears and ends (equal to the API's greedy
answer), a second turn sends the first one along, New chat forgets it, Stop aborts a long reply
and frees its slot. A screenshot is saved to test-artifacts/serve_chat.png."""

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
from test_serve import Server, metric, wait_for  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install "
                                       "chromium chromium-driver; .ci/run does)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=128)).eval().save_pretrained(root / "hf")
    a = random_adapter(root / "hf", root / "ad_a", 4, ["c_attn"], 1)
    service = build_service(str(root / "hf"), [("helper", str(a))], max_batch=2, log=lambda s: None)
    server = Server(create_app(service))
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(DRIVER), options=opts)
    driver.set_script_timeout(30)
    try:
        yield server, service, driver
    finally:
        driver.quit()
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
