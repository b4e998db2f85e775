r"""Trains a small ViT and a small ResNet on the embedded 5,000 MNIST digits (offline, CPU).

  python -m vit_analysis.main --config=configs/train_digits.py --workdir=/tmp/train_digits
  python -m vit_analysis.main --config=configs/train_digits.py:smoke --workdir=/tmp/smoke
  python -m vit_analysis.main --config=configs/train_digits.py:model=vit --workdir=/tmp/vit

Budget: each model >= 97% test accuracy (1,000 held-out digits) in <= 3 minutes on 2 CPU cores.
The contract demo models are too slow for that on 2 cores (measured training cost on the shared
2-core machine: ViT-demo_4 ~16 ms CPU per example, R-demo ~37 ms), so this config trains cheaper
variants of them through create_model overrides:
  vit:    ViT-demo_4 with patch_size=8 (16 tokens + CLS; ~3.4 ms CPU per example), 10 epochs;
  resnet: R-demo with width=8, num_groups=4, block_units=(1, 1, 1, 1), 6 epochs of SGD at 0.1.
'contract' (e.g. `:contract`) trains the unmodified ViT-demo_4 / R-demo that the analysis
configs use (config_lib.base_config), sharing their model cache. Trained models are cached
under `<workdir>/models` (or --config.model_cache=DIR); re-running resumes or reuses them.
`:smoke` trains the tiny twins for a few steps. 'model=vit' / 'model=resnet' trains one of them.
"""
from vit_analysis import config_lib

FAST_OVERRIDES = {
    "vit": {"patch_size": 8},
    "resnet": {"width": 8, "num_groups": 4, "block_units": (1, 1, 1, 1)},
}


def get_config(arg=None):
  flags = config_lib.parse_arg(arg)
  config = config_lib.base_config(arg)
  if not flags.smoke and not flags.get("contract", False):
    for key, overrides in FAST_OVERRIDES.items():
      config.models[key].overrides = overrides
  if "model" in flags:
    if flags.model not in config.models:
      raise KeyError(f"unknown model {flags.model!r}; known: {list(config.models)}")
    for key in list(config.models):
      if key != flags.model:
        del config.models[key]
  config.description = "a small ViT and a small ResNet trained on the embedded digits"
  return config
