"""Skip removal: split summary closed forms, entry rewriting, the analysis end to end."""
import ml_collections
import numpy as np
import pytest

from vit_analysis.analyses import skip_removal as sr


def test_split_contrast_of_a_two_block_matrix():
  m = np.full((5, 5), 0.2)
  m[:2, :2] = 0.9
  m[2:, 2:] = 0.7
  np.fill_diagonal(m, 1.0)  # The diagonal must not count.
  s = sr.split_contrast(m, 2)
  assert s["within"] == pytest.approx(0.8) and s["across"] == pytest.approx(0.2)
  assert s["contrast"] == pytest.approx(0.6)
  assert sr.split_contrast(np.ones((4, 4)), 1)["contrast"] == pytest.approx(0.0)
  with pytest.raises(ValueError, match="cut"):
    sr.split_contrast(m, 0)
  assert sr.split_index(["embedding", "block00/ln0", "block00", "block01/ln0"], 1) == 3
  with pytest.raises(KeyError, match="block 4"):
    sr.split_index(["embedding", "block00"], 4)


def test_removed_entry_adds_the_block_and_leaves_the_original():
  entry = ml_collections.ConfigDict(dict(name="ViT-smoke_8", num_classes=10, checkpoint="",
                                         train=None, overrides={"skip_removed": (3,)}))
  new = sr.removed_entry(entry, 1)
  assert tuple(new.overrides["skip_removed"]) == (1, 3) and new.name == "ViT-smoke_8"
  assert tuple(entry.overrides["skip_removed"]) == (3,)


def test_run_trains_through_train_fn_and_draws_heatmaps(tmp_path):
  from helpers import make_context, random_variables, run_analysis

  from vit_analysis import models
  from vit_analysis.analyses import base
  calls = []

  def train_fn(key, entry):  # Stands in for main's training loop (tested in test_main.py).
    calls.append((key, dict(entry.overrides)))
    module = models.create_model(entry.name, entry.num_classes, **entry.overrides)
    return base.LoadedModel(key, entry.name, module, random_variables(module), 32, 0.25)

  ctx = make_context(tmp_path, {"vit": "ViT-smoke_8"}, num_images=40, train_fn=train_fn)
  ctx.models["vit"].test_accuracy = 0.75
  config = ml_collections.ConfigDict({
      "seed": 0,
      "models": {"vit": dict(name="ViT-smoke_8", num_classes=10, checkpoint="",
                             train={"num_steps": 3}, overrides={})},
      "skip_removal": {"base_model": "vit", "blocks": (1,), "layers": "coarse",
                       "num_examples": 32, "minibatch_size": 8, "repeats": 1,
                       "figure_formats": ("png",)}})
  result = run_analysis("skip_removal", config, ctx)
  assert calls == [("vit_noskip01", {"skip_removed": (1,)})]
  m = result.metrics["vit_noskip01"]
  assert m["skip_removed"] == [1] and m["accuracy_drop"] == pytest.approx(0.5)
  # Same weights, skips of block 1 removed: layers from block 1 on lose their similarity to
  # the earlier ones (measured 0.41 vs 0.63 across the cut at random init).
  assert m["split"]["across"] < m["split_unmodified"]["across"] - 0.1
  saved = np.load(tmp_path / "results" / "skip_removal_vit_noskip01.npz")
  assert saved["mean"].shape == (m["num_layers"],) * 2 == (10, 10)  # coarse: 1 + 4 * 2 + 1.
  np.testing.assert_allclose(np.diag(saved["mean"]), 1.0, atol=1e-4)
  assert all((tmp_path / f).exists() for f in result.figures)
  with pytest.raises(ValueError, match="out of range"):
    config.skip_removal.blocks = (2,)
    run_analysis("skip_removal", config, ctx)
