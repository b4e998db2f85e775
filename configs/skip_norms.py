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
import ml_collections

from vit_analysis import config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg)
  config = config_lib.base_config(arg)
  config.analyses = ("skip_norms",)
  config.skip_norms = ml_collections.ConfigDict(dict(
      split="test",
      num_images=1000,
      batch_size=100,
      seed=0,
      models=(),               # model keys; empty = all
      average="per_image",     # paper.md §6 row 11: mean of per-image ratios | 'ratio_of_means'
      cosine="out",            # §6 row 12: cos(z, z + f(z)) | 'branch': cos(z, f(z))
      heatmap_tokens=10,       # tokens in the Fig 7 heatmap (0 = CLS); Fig E.1 shows all
  ))
  if flags.smoke:
    config.skip_norms.update(dict(num_images=16, batch_size=8, figure_formats=("png",)))
  if flags.get("full", False):
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
    config.models = config_lib.official_models(flags, {"vit": "ViT-B_16", "resnet": "R50x1"})
    config.skip_norms.update(dict(num_images=5000, batch_size=256))
  return config
