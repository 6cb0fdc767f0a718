"""The chat page at `/`, in a real headless browser (Debian's chromium + chromedriver, through selenium):
a message typed and sent streams the answer the API gives, and the KV panel shows the slot's statistics."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_serve import Server


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromedriver is missing: apt-get install chromium chromium-driver (.ci/run does)"
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,700"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_the_page_streams_the_answer_and_shows_the_slot(browser, smollm2_path: Path, tmp_path: Path) -> None:
    import matplotlib.image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    question = "Name three colors of the rainbow."
    server = Server(smollm2_path, "--temp", "0", "-n", "48", "--kv-budget", "512")
    try:
        expected = server.client().chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=48
        )
        browser.get(server.url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text != "model")
        browser.find_element(By.ID, "input").send_keys(question)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 120).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#answer-1[data-done='1']"),
            message="the answer did not finish streaming",
        )
        answer = browser.find_element(By.ID, "answer-1")
        assert "error" not in answer.get_attribute("class")
        assert answer.text.strip() == expected.choices[0].message.content.strip()
        assert int(browser.find_element(By.ID, "s-tokens").text) > 0
        assert "/" in browser.find_element(By.ID, "s-cells").text  # cells in use / cells
        assert "% of a full cache" in browser.find_element(By.ID, "s-note").text
        png = answer.screenshot_as_png
        (tmp_path / "answer.png").write_bytes(png)
        browser.save_screenshot(str(tmp_path / "page.png"))  # (kept by pytest for a look)
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
        dark = (pixels.mean(axis=-1) < 0.5).mean()
        assert 0.01 < dark < 0.5, f"the screenshot of the answer shows no text ({dark:.3f} dark pixels)"
        assert np.isfinite(pixels).all()
    finally:
        out = server.stop()
    assert server.proc.returncode == 0, out
