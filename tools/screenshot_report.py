"""Renders a report.html in headless Chromium and saves a full-page PNG screenshot.

  python tools/screenshot_report.py runs/demo/report.html runs/demo/report.png [--width 1200]

Needs Debian's `chromium` package (`apt-get install chromium`). The flags keep Chromium off the
network (the report has no external resource, and this machine may have no network at all).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile


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
    cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
           f"--window-size={width},{height}", f"--screenshot={os.path.abspath(png_path)}",
           "file://" + os.path.abspath(html_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
  if not os.path.exists(png_path):
    raise RuntimeError(f"Chromium wrote no screenshot to {png_path}")
  return png_path


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("html")
  parser.add_argument("png")
  parser.add_argument("--width", type=int, default=1200)
  parser.add_argument("--height", type=int, default=6000)
  args = parser.parse_args(argv)
  print(screenshot(args.html, args.png, width=args.width, height=args.height))


if __name__ == "__main__":
  main(sys.argv[1:])
