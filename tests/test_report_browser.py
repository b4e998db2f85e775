"""report.html in a real browser: headless Chromium, no console errors, no network, hover works.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and selenium; skipped
with the reason when they are absent (failed under CI=true, where `.ci/run` installs them).
Selenium is pointed at /usr/bin/chromedriver, so its driver manager downloads nothing. One browser session serves every test of this module.
"""
import json
import os
import shutil

import helpers
import numpy as np
import pytest
import test_report  # tests/ is on sys.path under pytest's default import mode

from vit_analysis.report import page as report

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
WebDriverWait = pytest.importorskip("selenium.webdriver.support.ui").WebDriverWait

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
  if CHROMIUM is None or not os.path.exists(CHROMEDRIVER):
    helpers.skip_unless_ci("needs Debian's chromium and chromium-driver (apt-get install "
                           "chromium chromium-driver); .ci/run installs them")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--window-size=1300,1000"):
    options.add_argument(flag)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
  driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
  driver.set_page_load_timeout(120)
  yield driver
  driver.quit()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
  """The rebuilt report of a saved run holding every analysis' result files."""
  workdir = str(tmp_path_factory.mktemp("browser_run"))
  arrays = test_report.make_full_workdir(workdir)
  path = report.rebuild(workdir)
  browser.get_log("performance")  # drop whatever the new session logged before the page
  browser.get("file://" + os.path.abspath(path))
  WebDriverWait(browser, 60).until(lambda d: d.execute_script(
      "return typeof Plotly !== 'undefined' && document.querySelectorAll('.plot').length > 0 &&"
      " Array.from(document.querySelectorAll('.plot')).every(p => p._fullLayout)"))
  return {"arrays": arrays, "path": path}


def test_page_logs_no_console_errors(browser, page):
  drawn = browser.execute_script(
      "return Array.from(document.querySelectorAll('.plot')).map(p => !!p.querySelector("
      "'.main-svg .cartesianlayer'));")
  assert drawn == [True] * 23  # every interactive figure of every analysis (the zoo: 5) was drawn
  errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
  assert errors == []


def test_page_makes_no_network_request(browser, page):
  urls = []
  for entry in browser.get_log("performance"):
    message = json.loads(entry["message"])["message"]
    if message["method"] == "Network.requestWillBeSent":
      urls.append(message["params"]["request"]["url"])
  assert urls, "the performance log recorded no request at all (not even the page)"
  assert [u for u in urls if not u.startswith(("file:", "data:", "blob:"))] == []


def _hover_text(browser, div_id, row, col):
  browser.execute_script(
      "Plotly.Fx.hover(document.getElementById(arguments[0]), {xval: arguments[2], "
      "yval: arguments[1]}, 'xy');", div_id, row, col)
  return browser.execute_script(
      "return Array.from(document.querySelectorAll('#' + arguments[0] + ' .hoverlayer .hovertext'))"
      ".map(e => Array.from(e.querySelectorAll('tspan.line')).map(t => t.textContent)"
      ".join('\\n') || e.textContent).join('\\n');", div_id)


def test_hover_shows_layer_names_value_and_errors(browser, page):
  # The ResNet grid (stems sorted: cka_intra_resnet first, so its div is fig-1).
  title = browser.execute_script(
      "return document.getElementById('fig-1')._fullLayout.title.text;")
  assert title == "resnet (R50x1) vs resnet (R50x1)"
  names = test_report.resnet_names(3)
  row, col = 4, 1  # block1/unit03 (row) x root (column)
  text = _hover_text(browser, "fig-1", row, col)
  mean = page["arrays"]["resnet"]["mean"][row, col]
  stderr = page["arrays"]["resnet"]["stderr"].mean(0)[row, col]
  spread = page["arrays"]["resnet"]["std"][row, col]
  assert f"row (resnet (R50x1)): {names[row]}" in text, text
  assert f"column (resnet (R50x1)): {names[col]}" in text, text
  assert f"CKA: {float(f'{mean:.4g}'):.4g}" in text, text
  assert f"stderr (minibatches): {float(f'{stderr:.3g}'):.3g}" in text, text
  assert f"std over repeats: {float(f'{spread:.3g}'):.3g}" in text, text


def test_heatmaps_zoom_from_the_modebar(browser, page):
  # The intra-model grids keep square cells (scaleanchor), so zoom acts on both axes together.
  get = ("const gd = document.getElementById('fig-2');"
         "return [gd._fullLayout.xaxis.range.slice(), gd._fullLayout.yaxis.range.slice()];")
  before = np.asarray(browser.execute_script(get))
  browser.execute_script(
      "document.querySelector('#fig-2 .modebar-btn[data-title=\"Zoom in\"]').click();")
  WebDriverWait(browser, 10).until(
      lambda d: not np.allclose(np.asarray(d.execute_script(get)), before))
  after = np.asarray(browser.execute_script(get))
  width = lambda r: r[:, 1] - r[:, 0]
  np.testing.assert_allclose(width(after), width(before) / 2, rtol=1e-6)
  np.testing.assert_allclose(after.mean(1), before.mean(1), atol=1e-6)  # about the centre
