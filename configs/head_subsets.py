r"""Subsets of early ViT attention heads vs lower ResNet layers (paper Fig 5).

Heads of block 0 sorted by mean attention distance, sliding windows of H/2 heads (stride 1),
pre-output-projection outputs, CKA with the first five ResNet unit outputs.

Offline (digits; ViT-demo_4 has 4 heads -> 3 windows of 2):
  python -m vit_analysis.main --config=configs/head_subsets.py --workdir=/tmp/head_subsets
  python -m vit_analysis.main --config=configs/head_subsets.py:smoke --workdir=/tmp/hs_smoke
Full size (official checkpoints + TFDS imagenet2012 validation, 224 px; 16 heads -> 9 windows):
  gsutil cp gs://vit_models/imagenet21k/ViT-L_16.npz gs://bit_models/BiT-M-R50x1.npz $CKPT/
  python -m vit_analysis.main --config=configs/head_subsets.py:full,ckpt_dir=$CKPT \
      --workdir=$WORKDIR   # vit=ViT-H_14 for the second panel, resnet=R101x1 for the third
"""
from vit_analysis import analyses, config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("full", "ckpt_dir", "vit", "resnet"))
  config = config_lib.base_config(flags)
  config.analyses = ("head_subsets",)
  config.head_subsets = analyses.default_config("head_subsets")  # options and paper defaults
  config.head_subsets.update(dict(distance_examples=1000, num_examples=768, minibatch_size=128,
                                  repeats=5))
  if flags.smoke:
    config.head_subsets.update(dict(distance_examples=32, num_examples=64, minibatch_size=16,
                                    repeats=2))
  if flags.get("full", False):
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
    config.models = config_lib.official_models(flags, {"vit": "ViT-L_16", "resnet": "R50x1"})
    config.head_subsets.update(dict(distance_examples=5000, num_examples=10240,
                                    minibatch_size=1024, repeats=20))
  return config
