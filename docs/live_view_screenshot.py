"""Make docs/live_view.png: the bundled model on the demo clip (looped, at 15 FPS), served on a
loopback live page, photographed by headless Chromium (Debian's; `pip install playwright`, no
browser download).

    python docs/live_view_screenshot.py [--seconds 12]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).with_name("live_view.png")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="charts filled this long")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium here: apt-get install chromium")
    url = f"http://127.0.0.1:{free_port()}"
    stream = subprocess.Popen(
        [sys.executable, "-m", "i2e_deploy.cli", "stream", "default", "--source", "demo"]
        + ["--loop", "--fps", "15", "--activity", "--output", url]
    )
    try:
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            deadline = time.time() + 120
            while True:  # the page answers once the port is bound, before the model loads
                try:
                    page.goto(url + "/")
                    break
                except Exception:
                    if time.time() > deadline:
                        raise
                    time.sleep(1)
            time.sleep(args.seconds)
            page.screenshot(path=str(OUT))
            browser.close()
    finally:
        stream.terminate()
        stream.wait(timeout=30)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
