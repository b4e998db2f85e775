r"""Mean attention distance per head (paper Figs 3, 4, C.5, C.6).

Offline (digits; ViT-demo_4 trained on the fly and cached, 1,000 test digits at 32 px, patch 4):
  python -m vit_analysis.main --config=configs/attention_distance.py --workdir=/tmp/attn_dist
  python -m vit_analysis.main --config=configs/attention_distance.py:gap --workdir=/tmp/attn_dist
  python -m vit_analysis.main --config=configs/attention_distance.py:smoke --workdir=/tmp/ad_smoke
('gap' adds a GAP-head ViT side by side.)
Full size (TPU VM; official checkpoints at 224 px + TFDS imagenet2012 validation, 5,000 images):
  gsutil cp gs://vit_models/imagenet21k/ViT-{B_32,L_16,H_14}.npz $CKPT/
  python -m vit_analysis.main --config=configs/attention_distance.py:full,ckpt_dir=$CKPT \
      --workdir=$WORKDIR
  Fig 4 / C.5 (ImageNet-1k-only training): add `i1k_ckpt=$CKPT/<AugReg i1k npz>,i1k_name=ViT-B_16`
  to put an ImageNet-only model next to the large-data ones.
"""
from vit_analysis import analyses, config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("gap", "full", "ckpt_dir", "vit_b32", "vit_l16", "vit_h14",
                                     "i1k_ckpt", "i1k_name"))
  config = config_lib.base_config(flags)
  del config.models["resnet"]  # Attention distance is a ViT measurement.
  if flags.get("gap", False):
    config.models.vit_gap = config_lib.digits_model("vit_gap", "ViT-demo_4-gap",
                                                    smoke=flags.smoke)
  config.analyses = ("attention_distance",)
  config.attention_distance = analyses.default_config("attention_distance")
  config.attention_distance.update(dict(num_images=1000, batch_size=100))  # the test digits
  if flags.smoke:
    config.attention_distance.update(dict(num_images=16, batch_size=8, figure_formats=("png",)))
  if flags.get("full", False):
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
    config.models = config_lib.official_models(
        flags, {"vit_b32": "ViT-B_32", "vit_l16": "ViT-L_16", "vit_h14": "ViT-H_14"})
    if flags.get("i1k_ckpt", ""):
      config.models.vit_i1k = config_lib.official_model(
          flags.get("i1k_name", "ViT-B_16"), flags.i1k_ckpt, 1000)
    config.attention_distance.update(dict(num_images=5000, batch_size=256))
  return config
