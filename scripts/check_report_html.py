"""Open a sweep's report.html in headless Chromium and check that its plots really render.

Two Chromium runs, both offline (the page is self-contained):
1. `--dump-dom` on a copy of the page with one probe script appended: after load it writes, for
   every <img>, whether the browser decoded it (`complete` and `naturalWidth` > 0) and its size;
   the check wants at least `--min-images` decoded plots (report.html has three).
2. `--screenshot` of the page itself: the PNG must not be blank (pixel standard deviation above
   `--min-std`, and enough non-white pixels), i.e. the table and plots were painted.

Exit 0 when both hold, 1 with the reason otherwise, 2 when no Chromium is installed
(`apt-get install -y chromium` on Debian). Usage:
    python scripts/check_report_html.py out/sweep/report.html [--screenshot out/sweep/report.png]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio")
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => ({
    id: i.id, decoded: i.complete && i.naturalWidth > 0, w: i.naturalWidth, h: i.naturalHeight}));
  const pre = document.createElement("pre");
  pre.id = "citrus-probe";
  // the markers are joined here so that the script's own text never contains them
  pre.textContent = ["PROBE", "BEGIN"].join("_") + JSON.stringify(imgs) + ["PROBE", "END"].join("_");
  document.body.appendChild(pre);
});
</script>"""


class ReportCheckError(RuntimeError):
    """The page did not render as a report should."""


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, *FLAGS, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def decoded_images(browser: str, page: Path, timeout: float = 120) -> list[dict]:
    """The page's <img> elements as the browser loaded them (the probe's report)."""
    with tempfile.TemporaryDirectory(prefix="citrus-report-check-") as tmp:
        probe = Path(tmp) / "probe.html"
        text = page.read_text(encoding="utf-8")
        probe.write_text(text.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        proc = _run(
            browser,
            ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            timeout,
        )
    found = re.search(r"PROBE_BEGIN(.*?)PROBE_END", proc.stdout, re.S)
    if found is None:
        raise ReportCheckError(
            f"the probe did not report (exit {proc.returncode}): {proc.stderr[-500:]}"
        )
    return json.loads(found.group(1))


def screenshot(browser: str, page: Path, out: Path, size: str, timeout: float = 120) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = _run(
        browser,
        [f"--window-size={size}", f"--screenshot={out.resolve()}", page.resolve().as_uri()],
        timeout,
    )
    if not out.is_file():
        raise ReportCheckError(
            f"no screenshot written (exit {proc.returncode}): {proc.stderr[-500:]}"
        )


def pixel_stats(png: Path) -> dict[str, float]:
    """Standard deviation of the grey levels and the fraction of pixels that are not white."""
    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    return {
        "std": float(grey.std()),
        "non_white": float((grey < 245).mean()),
        "width": grey.shape[1],
        "height": grey.shape[0],
    }


def check(
    page: Path, shot: Path, min_images: int = 3, min_std: float = 10.0, min_ink: float = 0.02,
    size: str = "1400,2600",
) -> dict:  # fmt: skip
    """Run both checks; returns what was measured, raises ReportCheckError on a failure."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(
            "no Chromium found ("
            + ", ".join(BROWSERS)
            + "); install it: apt-get install -y chromium"
        )
    images = decoded_images(browser, page)
    decoded = [i for i in images if i["decoded"] and i["w"] > 0 and i["h"] > 0]
    if len(decoded) < min_images:
        raise ReportCheckError(
            f"{len(decoded)} of {len(images)} images decoded; want at least {min_images}: {images}"
        )
    screenshot(browser, page, shot, size)
    stats = pixel_stats(shot)
    if stats["std"] < min_std or stats["non_white"] < min_ink:
        raise ReportCheckError(
            f"the screenshot looks blank: grey std {stats['std']:.1f} (want >= {min_std}), "
            f"{stats['non_white']:.1%} non-white pixels (want >= {min_ink:.0%})"
        )
    return {"browser": browser, "images": images, "screenshot": str(shot), **stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="report.html of `citrus-edge sweep`")
    ap.add_argument("--screenshot", type=Path, help="PNG to write (default: next to the report)")
    ap.add_argument("--min-images", type=int, default=3)
    ap.add_argument("--min-std", type=float, default=10.0)
    args = ap.parse_args(argv)
    if not args.report.is_file():
        print(f"error: {args.report}: no such file", file=sys.stderr)
        return 1
    shot = args.screenshot or args.report.with_name("report-screenshot.png")
    try:
        result = check(args.report, shot, args.min_images, args.min_std)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ReportCheckError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(i["decoded"] for i in result["images"])
    sizes = ", ".join(f"{i['id']} {i['w']}x{i['h']}" for i in result["images"])
    print(
        f"ok: {n} plots decoded ({sizes}); screenshot {result['screenshot']} "
        f"{result['width']}x{result['height']}, grey std {result['std']:.1f}, "
        f"{result['non_white']:.1%} non-white; {result['browser']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
