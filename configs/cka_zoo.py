r"""Every intra- and cross-model CKA heatmap of N models from one pass (Figs 1 and 2 at once).

Each model is forwarded once per minibatch and its Grams computed once; every model's own grid
and every pair's cross grid come from them (docs/method.md#one-pass-for-many-models). The saved
grids equal those of cka_intra / cka_cross for the same models, seed and images.

Offline (digits; a ViT, its GAP twin and a ResNet, trained on the fly and cached):
  python -m vit_analysis.main --config=configs/cka_zoo.py --workdir=/tmp/cka_zoo
  python -m vit_analysis.main --config=configs/cka_zoo.py:smoke --workdir=/tmp/cka_zoo_smoke
The paper's six models (ViT-B/32, B/16, L/16, H/14, R50x1, R152x2; official ImageNet-21k
checkpoints under $CKPT, TFDS imagenet2012 validation, 10,240 x 20 repeats, m = 1,024):
  python -m vit_analysis.main --config=configs/cka_zoo.py:full,ckpt_dir=$CKPT --workdir=$WORKDIR
  (21 grids from 6 forwards per image; the memory plan is logged and checked first)
"""
from vit_analysis import analyses, config_lib

PAPER_MODELS = {"vit_b32": "ViT-B_32", "vit_b16": "ViT-B_16", "vit_l16": "ViT-L_16",
                "vit_h14": "ViT-H_14", "r50": "R50x1", "r152": "R152x2"}


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("full", "ckpt_dir"))
  config = config_lib.base_config(flags)
  config.models.vit_gap = config_lib.digits_model("vit_gap", "ViT-demo_4-gap", smoke=flags.smoke)
  config.analyses = ("cka_zoo",)
  config.cka_zoo = analyses.default_config("cka_zoo")  # options and paper defaults
  config.cka_zoo.update(dict(models=("vit", "vit_gap", "resnet"), num_examples=768,
                             minibatch_size=128, repeats=5))
  if flags.smoke:
    config.cka_zoo.update(dict(num_examples=64, minibatch_size=16, repeats=2))
  if flags.get("full", False):
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
    config.models = config_lib.official_models(flags, PAPER_MODELS)
    config.cka_zoo.update(dict(models=tuple(PAPER_MODELS), num_examples=10240,
                               minibatch_size=1024, repeats=20))
  return config
