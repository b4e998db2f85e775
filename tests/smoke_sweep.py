"""One cheap two-point sweep run once per test process, shared by test_sweep and test_results.

configs/cka_intra.py:smoke over seed=0,1, analysing the ViT only; the 'resnet' entry is made the
same tiny ViT, so that its training is the ViT's, restored from the sweep's model cache (the
ResNet would double the time).
"""
import functools
import os
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "cka_intra.py") + ":smoke"
SWEEP = ("seed=0,1",)
OVERRIDES = {"cka_intra.models": "vit", "models.resnet.name": "ViT-smoke_8"}


@functools.lru_cache(maxsize=None)
def run() -> tuple[str, tuple]:
  """(sweep folder, index entries) of the sweep, run on first call."""
  from vit_analysis import sweep  # pylint: disable=g-import-not-at-top
  workdir = tempfile.mkdtemp(prefix="smoke_sweep_")
  entries = sweep.run(CONFIG, workdir, sweep=SWEEP, overrides=OVERRIDES, config_sweep=False)
  return workdir, tuple(entries)
