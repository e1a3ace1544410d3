"""The playground in a real browser: headless Chromium (Debian's, driven by selenium) against a real `ipt serve`
with a tiny model. Paste examples, see a bad name refused beside its field with nothing typed lost, create,
watch the task train to `succeeded` from the events stream, predict and see a bar per option, delete.
Screenshots of the main states go to test-artifacts/playground/ (two of them are in the README)."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from tests.service.test_serve_shutdown import KEY, ipt_serve

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "playground"
EXAMPLES = "input,output\n" + "\n".join(
    f"the movie was {w},{label}" for w, label in [("great", "positive"), ("awful", "negative"), ("lovely", "positive"),
                                                   ("bad", "negative"), ("fine", "positive"), ("poor", "negative"),
                                                   ("nice", "positive"), ("dull", "negative")])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (shutil.which("chromium") and shutil.which("chromedriver") and (ROOT / ".test-deps" / "selenium").is_dir()):
        subprocess.run(["bash", str(ROOT / "tests" / "setup_browser.sh")], check=True,
                       env={**os.environ, "PYTHON": sys.executable})
    if str(ROOT / ".test-deps") not in sys.path:
        sys.path.append(str(ROOT / ".test-deps"))
    importlib.invalidate_caches()  # .test-deps may have been looked up (absent) before the install
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_paste_create_train_predict_delete(browser: Any, service_settings: Settings, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    find = browser.find_element
    with ipt_serve(service_settings, tmp_path) as serve:
        browser.get(serve.base + "/")
        find(By.ID, "api-key").send_keys(KEY, Keys.TAB)
        find(By.ID, "examples").send_keys(EXAMPLES)
        summary = wait_for(lambda: find(By.ID, "parse-summary").text, what="the parse summary")
        assert summary == "8 examples read; kind: classification (inferred)"
        assert find(By.ID, "task-labels").get_attribute("value") == "negative, positive"

        # bad input: the API's message beside the field, and nothing typed is lost
        find(By.ID, "task-name").send_keys("movie reviews")  # a space: refused by the API
        find(By.ID, "create-button").click()
        error = wait_for(lambda: find(By.CSS_SELECTOR, '.field-error[data-field="name"]').text, what="the name error")
        assert "pattern" in error
        assert find(By.ID, "examples").get_attribute("value") == EXAMPLES
        browser.save_screenshot(str(ARTIFACTS / "1-validation-error.png"))

        find(By.ID, "task-name").clear()
        find(By.ID, "task-name").send_keys("movie_reviews")
        find(By.ID, "create-button").click()
        wait_for(lambda: "succeeded" in find(By.ID, "task-status").text, timeout=180, what="training to finish")
        assert all(not e.text for e in find(By.ID, "create-form").find_elements(By.CLASS_NAME, "field-error"))
        assert find(By.ID, "curve").find_elements(By.TAG_NAME, "polyline")  # the dev curve from the events
        rows = find(By.ID, "task-table").find_elements(By.CSS_SELECTOR, "tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[2].text for r in rows] == ["succeeded"]
        browser.save_screenshot(str(ARTIFACTS / "2-trained.png"))

        find(By.ID, "predict-input").send_keys("the movie was superb", Keys.ENTER)
        answer = wait_for(lambda: find(By.ID, "answer").text, what="the answer")
        bars = find(By.ID, "bars").find_elements(By.CLASS_NAME, "bar")
        labels = [b.find_element(By.CLASS_NAME, "label").text for b in bars]
        assert answer in ("positive", "negative") and sorted(labels) == ["negative", "positive"]
        shares = [float(b.find_element(By.CLASS_NAME, "pct").text.rstrip("%")) for b in bars]
        assert sum(shares) == pytest.approx(100, abs=0.2)
        assert len(wait_for(lambda: find(By.ID, "task-map").find_elements(By.TAG_NAME, "circle"), what="the map")) == 1
        browser.save_screenshot(str(ARTIFACTS / "3-predict.png"))

        find(By.ID, "delete-button").click()
        wait_for(lambda: not find(By.ID, "task-table").find_elements(By.CSS_SELECTOR, "tbody tr"), what="the delete")
        assert "hidden" in find(By.ID, "task-panel").get_attribute("class")
