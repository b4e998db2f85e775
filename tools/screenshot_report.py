"""Renders a report.html in headless Chromium and saves a PNG screenshot (e.g. docs/report.png).

  python tools/screenshot_report.py runs/demo/report.html docs/report.png [--width 1200]
  python tools/screenshot_report.py runs/demo/report.html docs/report.png --hover fig-1:5,2

Needs Debian's `chromium` package (`apt-get install chromium`). The flags keep Chromium off the
network (the report has no external resource, and this machine may have no network at all), and
a virtual-time budget lets the page's inline plotly.js draw every interactive figure before the
shot. `--hover DIV:ROW,COL` shows the tooltip of one heatmap cell (the figure's div id, e.g.
`fig-1`, and the cell's row and column index); it drives the browser through selenium and
Debian's `chromium-driver`, and scrolls that figure into view.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHROMEDRIVER = "/usr/bin/chromedriver"
_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--no-first-run", "--hide-scrollbars")


def find_chromium() -> str:
  for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
    path = shutil.which(name)
    if path:
      return path
  raise FileNotFoundError("no Chromium found on PATH: install Debian's `chromium` package")


def screenshot(html_path: str, png_path: str, *, width: int = 1200, height: int = 6000) -> str:
  """Writes a `width`×`height` screenshot of `html_path` to `png_path`; returns `png_path`."""
  if not os.path.exists(html_path):
    raise FileNotFoundError(html_path)
  with tempfile.TemporaryDirectory() as profile:
    cmd = [find_chromium(), *_FLAGS, "--virtual-time-budget=20000", f"--user-data-dir={profile}",
           f"--window-size={width},{height}", f"--screenshot={os.path.abspath(png_path)}",
           "file://" + os.path.abspath(html_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
  if not os.path.exists(png_path):
    raise RuntimeError(f"Chromium wrote no screenshot to {png_path}")
  return png_path


def screenshot_hover(html_path: str, png_path: str, div_id: str, row: int, col: int, *,
                     width: int = 1200, height: int = 1400) -> str:
  """Screenshot of the viewport with `div_id` in view and the tooltip of cell (row, col) shown."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  if not os.path.exists(html_path):
    raise FileNotFoundError(html_path)
  options = webdriver.ChromeOptions()
  options.binary_location = find_chromium()
  for flag in (*_FLAGS, f"--window-size={width},{height}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER),
                            options=options)
  try:
    driver.get("file://" + os.path.abspath(html_path))
    deadline = time.time() + 60
    while not driver.execute_script(
        "const p = document.getElementById(arguments[0]); return !!(p && p._fullLayout);",
        div_id):
      if time.time() > deadline:
        raise RuntimeError(f"figure {div_id!r} was not drawn within 60 s (is the id right?)")
      time.sleep(0.2)
    driver.execute_script(
        "const gd = document.getElementById(arguments[0]); gd.scrollIntoView({block: 'center'});"
        "Plotly.Fx.hover(gd, {xval: arguments[2], yval: arguments[1]}, 'xy');", div_id, row, col)
    time.sleep(0.5)
    driver.save_screenshot(os.path.abspath(png_path))
  finally:
    driver.quit()
  return png_path


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("html")
  parser.add_argument("png")
  parser.add_argument("--width", type=int, default=1200)
  parser.add_argument("--height", type=int, default=None,
                      help="window height (default 6000, or 1400 with --hover)")
  parser.add_argument("--hover", default=None, metavar="DIV:ROW,COL",
                      help="show the tooltip of one heatmap cell, e.g. fig-1:5,2")
  args = parser.parse_args(argv)
  if args.hover:
    div_id, cell = args.hover.split(":")
    row, col = (int(v) for v in cell.split(","))
    print(screenshot_hover(args.html, args.png, div_id, row, col, width=args.width,
                           height=args.height or 1400))
  else:
    print(screenshot(args.html, args.png, width=args.width, height=args.height or 6000))


if __name__ == "__main__":
  main(sys.argv[1:])
