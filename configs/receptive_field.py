r"""Effective receptive fields, post-residual and branch-only (paper Figs 6, C.1-C.4).

Offline (digits; ViT-demo_4 and R-demo trained on the fly and cached, 32 test digits):
  python -m vit_analysis.main --config=configs/receptive_field.py --workdir=/tmp/erf
  python -m vit_analysis.main --config=configs/receptive_field.py:smoke --workdir=/tmp/erf_smoke
Full size (TPU VM; official ViT-B/32 and BiT-M R50x1 at 224 px + TFDS imagenet2012 validation,
32 images, per-channel gradients of every layer, post-residual and branch-only):
  gsutil cp gs://vit_models/imagenet21k/ViT-B_32.npz gs://bit_models/BiT-M-R50x1.npz $CKPT/
  python -m vit_analysis.main --config=configs/receptive_field.py:full,ckpt_dir=$CKPT \
      --workdir=$WORKDIR    # vit=ViT-L_16 for Fig C.3
Cheap option: --config.receptive_field.per_channel=False (abs of the gradient of the channel mean).
"""
from vit_analysis import analyses, config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("full", "ckpt_dir", "vit", "resnet"))
  config = config_lib.base_config(flags)
  config.analyses = ("receptive_field",)
  config.receptive_field = analyses.default_config("receptive_field")  # the paper's settings
  if flags.smoke:
    # One pull-back per layer instead of one per channel: the per-channel ERF of a ResNet
    # costs ~1,000 backward passes per image, minutes on a CPU even for the tiny models.
    config.receptive_field.update(dict(num_images=4, batch_size=4, modes=("post",),
                                       per_channel=False, figure_formats=("png",)))
  if flags.get("full", False):
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
    config.models = config_lib.official_models(flags, {"vit": "ViT-B_32", "resnet": "R50x1"})
    config.receptive_field.update(dict(batch_size=8, channel_chunk=64))
  return config
