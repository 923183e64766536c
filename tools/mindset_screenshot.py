"""The screenshot of the Mindset UI in docs/mindset.png, taken the way a user would see the page.

Starts the UI (read-only) on the given student, opens it in Debian's headless chromium through
Selenium, traces a prompt, picks its last token, switches the largest row of the first layer off,
regenerates, looks a row up, and saves the page. With Pillow installed the PNG is reduced to a
palette of 64 colours, which keeps it small for the repository.

    python tools/mindset_screenshot.py memstore-demo/student docs/mindset.png
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys

from memstore_gpt2.mindset.web import MindsetServer, MindsetService


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student")
    parser.add_argument("out")
    parser.add_argument("--prompt", default="The for statement")
    parser.add_argument("--promotes", default=" clause", help="Search the rows promoting this.")
    parser.add_argument("--size", default="1280,1200", help="Window width,height in pixels.")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        sys.exit("needs Debian's chromium and chromium-driver (apt-get install ...)")
    server = MindsetServer(MindsetService(args.student), 0).start()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={args.size}", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(server.url)
        wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
        prompt = driver.find_element("id", "prompt")
        prompt.clear()
        prompt.send_keys(args.prompt)
        for field, value in (("top", "5"), ("rows-limit", "8")):  # a page that fits one screen
            box = driver.find_element("id", field)
            box.clear()
            box.send_keys(value)
        driver.find_element("id", "trace-btn").click()
        wait.until(lambda d: d.find_elements("css selector", "#fired table.fired tbody tr"))
        driver.find_elements("css selector", "#fired .off-box")[0].click()
        driver.find_element("id", "regen-btn").click()
        wait.until(lambda d: d.find_element("id", "gen-ablated").get_attribute("textContent"))
        driver.find_element("id", "rows-promotes").send_keys(args.promotes)
        driver.find_element("id", "rows-btn").click()
        wait.until(lambda d: "promoting" in d.find_element("id", "rows-summary").text)
        driver.find_elements("css selector", "#rows-result a.rid")[0].click()
        wait.until(lambda d: "LRFU" in d.find_element("id", "explain").text)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
        server.stop()
    try:
        from PIL import Image
    except ImportError:
        return
    image = Image.open(args.out).convert("RGB")
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)


if __name__ == "__main__":
    main()
