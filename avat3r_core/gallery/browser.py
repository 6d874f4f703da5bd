"""Open a built gallery in headless Chromium (the browser test and benchmarks/gallery.py).

Debian's ``chromium`` (``/usr/bin/chromium``; the Makefile's set-up installs it where we are root)
driven by Python ``playwright`` (never ``playwright install``: the browser is the system's). WebGL
runs on SwiftShader, the software renderer, so the viewer is exercised the same with or without a
GPU. The site is served by the standard library's file server on 127.0.0.1, as a user would.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu",
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",  # software WebGL 2 (SwiftShader)
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
)


def browser_unavailable() -> str | None:
    """Why the browser cannot be used here (None when it can; it is started once to find out):
    the test's skip reason."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is not installed (make setup installs Debian's chromium when run as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"the playwright package is not importable ({exc})"
    try:
        with chromium():
            pass
    except Exception as exc:  # playwright raises its own Error types for a browser that will not start
        return f"{CHROMIUM} could not be launched ({str(exc).splitlines()[0]})"
    return None


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextlib.contextmanager
def serve(site: str | Path):
    """Serve ``site`` on 127.0.0.1 (a free port) for the ``with`` block; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def chromium():
    """A headless Chromium (playwright Browser) for the ``with`` block."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_FLAGS))
        try:
            yield browser
        finally:
            browser.close()


def webgl_renderer(page) -> str:
    """The WebGL 2 renderer string of ``page`` (names SwiftShader when software WebGL is in use)."""
    return page.evaluate("""() => {
        const gl = document.createElement('canvas').getContext('webgl2');
        if (!gl) return 'no WebGL 2';
        const info = gl.getExtension('WEBGL_debug_renderer_info');
        return info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER);
    }""")
