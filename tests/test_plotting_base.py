"""Shared plotting helpers: files written, colour range fixed, bad shapes rejected."""
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

from vit_analysis import plotting


def test_save_figure_writes_png_and_pdf(tmp_path):
  fig, ax = plt.subplots()
  image = plotting.heatmap(ax, np.eye(3) * 2.0)
  assert image.get_clim() == (0.0, 1.0)  # CKA colour bar is fixed to [0, 1] whatever the data.
  png = plotting.save_figure(fig, str(tmp_path / "figs" / "eye"))
  assert png.endswith("eye.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(tmp_path / "figs" / "eye.pdf") > 0
  assert not [p for p in os.listdir(tmp_path / "figs") if ".tmp." in p]


def test_heatmap_rejects_non_matrix():
  fig, ax = plt.subplots()
  with pytest.raises(ValueError, match="2-D"):
    plotting.heatmap(ax, np.zeros((2, 2, 2)))
  plt.close(fig)
