"""Netron for exported models: serve one (`qcompiler inspect OUT --netron`) or capture a screenshot of it in headless
Chromium with a SpQRMatMul node selected (`qcompiler inspect OUT --screenshot PNG`), returning the text of
Netron's node-properties panel so a test can check what a user would read there.

Needs the `netron` package; the screenshot also needs `selenium` and Chromium + chromedriver (Debian: `apt-get
install chromium chromium-driver`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

from qcompiler import QCompilerError
from qcompiler.graph.format import OP_TYPE
from qcompiler.tools.inspect import model_file


def serve(path: str | os.PathLike, *, port: int = 8080, browse: bool = False) -> tuple[str, int]:
    """Start Netron's server for the model (in a background thread); returns (host, port)."""
    try:
        import netron
    except ImportError as e:
        raise QCompilerError("--netron needs the netron package: pip install netron") from e
    return netron.serve(str(model_file(path)), None, ("localhost", port), browse)


def find_chromium() -> tuple[Optional[str], Optional[str]]:
    """(chromium binary, chromedriver) paths, or None where missing."""
    browsers = (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome"))
    return next((b for b in browsers if b), None), shutil.which("chromedriver")


def screenshot(path: str | os.PathLike, png: str | os.PathLike, *, port: int = 8081,
               size: tuple[int, int] = (1600, 1000), timeout: float = 120.0) -> str:
    """Serve the model, open it in headless Chromium, select the first SpQRMatMul node, save a screenshot to `png`;
    returns the node-properties panel's text."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
    except ImportError as e:
        raise QCompilerError("--screenshot needs selenium: pip install selenium") from e
    browser, driver_path = find_chromium()
    if browser is None or driver_path is None:
        raise QCompilerError("--screenshot needs Chromium and chromedriver (Debian: apt-get install chromium "
                             "chromium-driver)")
    import netron

    host, port = serve(path, port=port)
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={size[0]},{size[1]}"):
        opts.add_argument(arg)
    opts.binary_location = browser
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(f"http://{host}:{port}/")
        deadline = time.monotonic() + timeout
        nodes = []
        while time.monotonic() < deadline and not nodes:
            for button in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Accept']"):
                if button.is_displayed():
                    button.click()  # Netron's first-run consent banner
            nodes = driver.find_elements(
                By.XPATH, f"//*[local-name()='text' and normalize-space(text())='{OP_TYPE}']")
            time.sleep(0.5)
        # large graphs: Netron lays out behind its welcome/progress screen; wait until the graph view is shown
        while time.monotonic() < deadline and "welcome" in (driver.execute_script("return document.body.className")
                                                            or ""):
            time.sleep(1)
        if not nodes:
            raise QCompilerError(f"Netron showed no {OP_TYPE} node within {timeout:.0f} s")
        driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", nodes[0])
        time.sleep(1.5)
        panel = driver.execute_script(
            "const s = document.getElementById('sidebar') || document.body;"
            "const fields = Array.from(s.querySelectorAll('input, textarea')).map(e => e.value);"
            "return s.innerText + '\\n' + fields.join('\\n');")
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(png))
        return panel
    finally:
        driver.quit()
        netron.stop((host, port))
