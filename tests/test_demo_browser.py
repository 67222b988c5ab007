"""The demo in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium.

Loads the page, checks that the inputs and result labels render, clicks Classify without an image (a
readable message appears), uploads an example image, runs one prediction through the UI and saves a
screenshot under $VLMTTA_ARTIFACTS (default: the test's tmp dir).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from vlmtta import demo

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
OFFLINE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--window-size=1400,1000")
pytestmark = pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                                reason="needs Debian's chromium and chromium-driver")


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*OFFLINE_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    blocks = demo.build_demo(tiny_model_dir, None, "cpu", fallback=None)
    _, url, _ = blocks.launch(server_name="127.0.0.1", prevent_thread_lock=True, max_file_size=demo.MAX_BYTES)
    yield url
    blocks.close()


def _find(driver, css: str, timeout: float = 60):
    return WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.CSS_SELECTOR, css))


def _wait_text(driver, css: str, accept: Callable[[str], bool], timeout: float = 60) -> str:
    """The first text of an element matching ``css`` that ``accept`` takes (toasts fade in, labels fill in late)."""
    def shown(d):
        texts = [element.text for element in d.find_elements(By.CSS_SELECTOR, css)]
        return next((text for text in texts if accept(text)), False)
    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(shown)


def test_one_prediction_through_the_browser(served, browser, tmp_path):
    artifacts = Path(os.environ.get("VLMTTA_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        browser.get(served)
        classes = _find(browser, "#classes textarea")
        assert _find(browser, "#image input[type=file]")
        assert demo.default_method() in _find(browser, "#method input").get_attribute("value")
        assert "Before: zero-shot" in _find(browser, "#before").text and "After" in _find(browser, "#after").text
        assert not browser.find_elements(By.CSS_SELECTOR, "#after [data-testid='label-output-value']")

        browser.find_element(By.CSS_SELECTOR, "#run").click()  # no image yet: a readable message, no traceback
        _wait_text(browser, ".toast-body", lambda text: "No image" in text)
        browser.find_element(By.CSS_SELECTOR, ".toast-close").click()
        WebDriverWait(browser, 10).until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".toast-body"))

        browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(demo.EXAMPLES_DIR / "house.png"))
        _find(browser, "#image img")  # the uploaded image is previewed
        classes.send_keys(demo.SCENE_CLASSES)
        browser.find_element(By.CSS_SELECTOR, "#run").click()

        names = demo.SCENE_CLASSES.split(", ")
        _wait_text(browser, "#after [data-testid='label-output-value']", names.__contains__, timeout=180)
        _wait_text(browser, "#before [data-testid='label-output-value']", names.__contains__)
        _wait_text(browser, "#summary", lambda text: "Before" in text and " ms" in text)
        assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body")  # no error shown
    finally:
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1400, max(1000, min(int(height), 1300)))
        browser.save_screenshot(str(artifacts / "demo.png"))
    assert (artifacts / "demo.png").stat().st_size > 10_000
