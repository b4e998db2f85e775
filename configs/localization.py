r"""Spatial localisation of tokens: CLS ViT, GAP ViT and ResNet (paper Figs 9, 10, D.1-D.3).

CKA between each output token of the final block (final unit) and the raw input patch at every
grid position; maps for four tokens per model plus summary scores over all tokens.

Offline (digits; ViT-demo_4 CLS and GAP (8x8 grid) and R-demo):
  python -m vit_analysis.main --config=configs/localization.py --workdir=/tmp/localization
  python -m vit_analysis.main --config=configs/localization.py:smoke --workdir=/tmp/loc_smoke
Full size (224 px, TFDS imagenet2012 validation; ViT-B/32 7x7 grid, R50x1 final unit 7x7 with
32 px patches; a GAP B/32 checkpoint, e.g. from gs://vit_models/gsam/, given as gap_ckpt=):
  python -m vit_analysis.main --config=configs/localization.py:full,ckpt_dir=$CKPT,gap_ckpt=$GAP \
      --workdir=$WORKDIR
  Penultimate block (Fig D.2): --config.localization.layers_per_model.vit=block10 ...
"""
import ml_collections

from vit_analysis import analyses, config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("full", "ckpt_dir", "gap_ckpt"))
  config = config_lib.base_config(flags)
  config.models.vit_gap = config_lib.digits_model("vit_gap", "ViT-demo_4-gap", smoke=flags.smoke)
  config.analyses = ("localization",)
  config.localization = analyses.default_config("localization")  # options and paper defaults
  config.localization.update(dict(models=("vit", "vit_gap", "resnet"), num_examples=768,
                                  minibatch_size=128, repeats=3))
  if flags.smoke:
    config.localization.update(dict(num_examples=64, minibatch_size=16, repeats=1))
  if flags.get("full", False):
    ckpt = flags.get("ckpt_dir", "checkpoints")
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
    config.models = ml_collections.ConfigDict(dict(
        vit=config_lib.official_model("ViT-B_32", f"{ckpt}/ViT-B_32.npz", 21843),
        vit_gap=config_lib.official_model(
            "ViT-B_32-gap-norep", flags.get("gap_ckpt", f"{ckpt}/ViT-B_32-gap.npz"), 1000),
        resnet=config_lib.official_model("R50x1", f"{ckpt}/BiT-M-R50x1.npz", 21843)))
    config.localization.update(dict(num_examples=10240, minibatch_size=1024, repeats=20))
  return config
