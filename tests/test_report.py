"""report.html: self-contained (every figure inline, nothing external), every stage present."""
import base64
import html.parser
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

from vit_analysis import plotting, report
from vit_analysis.analyses.base import AnalysisResult


class _Collector(html.parser.HTMLParser):

  def __init__(self):
    super().__init__()
    self.imgs, self.external, self.ids = [], [], []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "img":
      self.imgs.append(attrs.get("src", ""))
    for key in ("src", "href"):
      if key in attrs and not attrs[key].startswith(("data:", "#")):
        self.external.append((tag, attrs[key]))
    if tag in ("script", "link", "iframe"):
      self.external.append((tag, attrs))
    if "id" in attrs:
      self.ids.append(attrs["id"])


def _figure(path):
  fig, ax = plt.subplots()
  plotting.heatmap(ax, np.random.default_rng(0).random((4, 4)))
  return plotting.save_figure(fig, path)


def _results(workdir):
  png_a = _figure(os.path.join(workdir, "figures", "a"))
  png_b = _figure(os.path.join(workdir, "figures", "b"))
  return [
      AnalysisResult("cka_intra", "Intra-model CKA", "What it shows. What the paper found.",
                     [os.path.relpath(png_a, workdir)],
                     {"vit": {"mean_offdiag": {"mean": 0.61234, "std": 0.0123}}, "n": 128}, 3.5),
      AnalysisResult("attention_distance", "Attention distance", "Shows. Found.",
                     [os.path.relpath(png_b, workdir)], {"block00": [1.0, 2.5]}, 1.25),
  ]


def test_report_is_self_contained_and_complete(tmp_path):
  workdir = str(tmp_path)
  results = _results(workdir)
  models = [{"key": "vit", "name": "ViT-smoke_8", "params": 12345, "image_size": 32,
             "test_accuracy": 0.975, "train_seconds": 12.0}]
  path = report.write_report(workdir, {"seed": 0, "analyses": ["cka_intra"]}, results, models,
                             timings={"train: vit": 12.0})
  assert path == os.path.join(workdir, "report.html")
  text = open(path, encoding="utf-8").read()
  parser = _Collector()
  parser.feed(text)
  assert parser.external == []
  assert len(parser.imgs) == 2
  for src, result in zip(parser.imgs, results):
    assert src.startswith("data:image/png;base64,")
    embedded = base64.b64decode(src.split(",", 1)[1])
    assert embedded == open(os.path.join(workdir, result.figures[0]), "rb").read()
  for stage in ("models", "cka_intra", "attention_distance", "timings", "config"):
    assert stage in parser.ids
  assert "0.6123 ± 0.0123 (std)" in text
  assert "97.50%" in text and "ViT-smoke_8" in text and "12,345" in text
  assert "train: vit" in text and "analysis: cka_intra" in text
  assert not os.path.exists(path + ".tmp")


def test_report_shows_nan_and_rejects_non_png(tmp_path):
  bad = AnalysisResult("x", "X", "c", ["figures/x.pdf"], {"value": float("nan")})
  with pytest.raises(ValueError, match="PNG"):
    report.render_report({}, [bad], [], str(tmp_path))
  page = report.render_report({}, [AnalysisResult("x", "X", "c", [], {"v": float("nan")})], [],
                              str(tmp_path))
  assert "NaN" in page
