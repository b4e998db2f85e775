r"""Trains a small ViT and a small ResNet on the embedded 5,000 MNIST digits (offline, CPU).

  python -m vit_analysis.main --config=configs/train_digits.py --workdir=/tmp/train_digits
  python -m vit_analysis.main --config=configs/train_digits.py:smoke --workdir=/tmp/smoke

Each model reaches >= 97% test accuracy (1,000 held-out digits) in <= 3 minutes on 2 CPU cores;
trained models are cached under `<workdir>/models` (or --config.model_cache=DIR) and reused by
every config built with `config_lib.base_config`. `:smoke` trains the tiny twins for a few steps.
Options: 'model=vit' or 'model=resnet' trains only one of them.
"""
from vit_analysis import config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg)
  config = config_lib.base_config(arg)
  if "model" in flags:
    if flags.model not in config.models:
      raise KeyError(f"unknown model {flags.model!r}; known: {list(config.models)}")
    for key in list(config.models):
      if key != flags.model:
        del config.models[key]
  config.description = "ViT-demo_4 and R-demo trained on the embedded digits"
  return config
