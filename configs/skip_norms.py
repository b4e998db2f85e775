r"""Skip-connection norm ratios and cosines per token and block (paper Figs 7, E.1, E.2).

Offline (digits; ViT-demo_4 and R-demo trained on the fly and cached, 1,000 test digits):
  python -m vit_analysis.main --config=configs/skip_norms.py --workdir=/tmp/skip_norms
  python -m vit_analysis.main --config=configs/skip_norms.py:smoke --workdir=/tmp/skip_norms_smoke
Full size (TPU VM; official ViT-B/16 (Fig 7; vit=ViT-B_32 for E.1) and BiT-M R50x1 at 224 px +
TFDS imagenet2012 validation):
  gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz gs://bit_models/BiT-M-R50x1.npz $CKPT/
  python -m vit_analysis.main --config=configs/skip_norms.py:full,ckpt_dir=$CKPT --workdir=$WORKDIR
Options: --config.skip_norms.average=ratio_of_means, --config.skip_norms.cosine=branch.
"""
from vit_analysis import analyses, config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("full", "ckpt_dir", "vit", "resnet"))
  config = config_lib.base_config(flags)
  config.analyses = ("skip_norms",)
  config.skip_norms = analyses.default_config("skip_norms")  # options and paper defaults
  config.skip_norms.update(dict(num_images=1000, batch_size=100))  # the test digits
  if flags.smoke:
    config.skip_norms.update(dict(num_images=16, batch_size=8, figure_formats=("png",)))
  if flags.get("full", False):
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
    config.models = config_lib.official_models(flags, {"vit": "ViT-B_16", "resnet": "R50x1"})
    config.skip_norms.update(dict(num_images=5000, batch_size=256))
  return config
