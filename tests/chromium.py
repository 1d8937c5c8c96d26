"""Headless Chromium for the report tests and for the README's screenshot (docs/report.png):

    .venv/bin/python tests/chromium.py demo_output/sweep/report.html docs/report.png

`screenshot` returns the rendered DOM and the page's console messages (Chromium logs
every console message and uncaught error as a CONSOLE line on stderr). No host
name resolves: a page that needs the network cannot draw its plots. `read_png`
decodes the screenshot into a numpy array (stdlib zlib, no imaging package).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

CONSOLE = re.compile(r":CONSOLE[^\]]*\] (.*)$", re.MULTILINE)


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _run(html, *flags: str, budget_ms: int = 10000) -> tuple[str, list[str]]:
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium on PATH")
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                            "--v=0", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                            "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no fetch works
                            *flags, Path(html).resolve().as_uri()],
                           capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        raise RuntimeError(f"chromium exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout, CONSOLE.findall(r.stderr)


def screenshot(html, png, width: int = 1000, height: int = 1400) -> tuple[str, list[str]]:
    """Render `html` and write its top width x height pixels to `png`. Returns the DOM after the
    page's scripts ran and the page's console messages."""
    return _run(html, "--dump-dom", f"--screenshot={Path(png).resolve()}", f"--window-size={width},{height}")


def read_png(path) -> np.ndarray:
    """(height, width, channels) uint8 of an 8-bit, non-interlaced greyscale / RGB / RGBA PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    pos, idat, head = 8, [], None
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            head = body
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + n
    w, h = int.from_bytes(head[0:4], "big"), int.from_bytes(head[4:8], "big")
    depth, colour, interlace = head[8], head[9], head[12]
    ch = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    assert depth == 8 and interlace == 0, f"{path}: bit depth {depth}, interlace {interlace} not supported"
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * ch)
    out = np.zeros((h, w * ch), np.int32)
    prev = np.zeros(w * ch, np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:  # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(w, ch), axis=0).reshape(-1) % 256
        elif f == 2:  # Up
            cur = (line + prev) % 256
        else:         # Average, Paeth: left to right
            cur, p, ln = [0] * (w * ch), prev.tolist(), line.tolist()
            for i in range(w * ch):
                a = cur[i - ch] if i >= ch else 0
                b, c = p[i], (p[i - ch] if i >= ch else 0)
                if f == 3:
                    pred = (a + b) // 2
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                cur[i] = (ln[i] + pred) % 256
            cur = np.array(cur, np.int32)
        out[y] = prev = cur
    return out.reshape(h, w, ch).astype(np.uint8)


if __name__ == "__main__":
    html_file, png_file = sys.argv[1:3]
    _, msgs = screenshot(html_file, png_file)
    print(f"{png_file}: {Path(png_file).stat().st_size} bytes; console: {msgs or 'nothing'}")
