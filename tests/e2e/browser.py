"""Helpers to run the service on a loopback port in a thread and drive the page in headless Chromium (Debian
``chromium`` + ``chromium-driver``; ``scripts/install_browser.sh`` installs them). Used by the browser test and by
``benchmarks/bench_serve.py`` (screenshot)."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int | None = None,
                   timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread; yields the base URL; stops the server on exit."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server on {host}:{port} did not start within {timeout_s} s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def missing_browser() -> str | None:
    """Why headless Chromium cannot run here (None when it can)."""
    for p in (CHROMIUM, CHROMEDRIVER):
        if not p.exists() and not shutil.which(p.name):
            return (f"{p} is missing: the browser test needs Debian's chromium and chromium-driver; "
                    "run scripts/install_browser.sh (apt-get install -y chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is missing: install the test extras (pip install -e '.[test]')"
    return None


def chromium_driver(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium WebDriver on the system binaries (no driver download: selenium-manager is bypassed)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--window-size={width},{height}")
    service = Service(executable_path=str(CHROMEDRIVER if CHROMEDRIVER.exists() else shutil.which("chromedriver")))
    return webdriver.Chrome(service=service, options=opts)
