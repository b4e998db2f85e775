r"""Intra-model CKA heatmaps (paper Figs 1, B.1; H.1 with a Mixer).

Offline (digits, small models trained on the fly and cached):
  python -m vit_analysis.main --config=configs/cka_intra.py --workdir=/tmp/cka_intra
  python -m vit_analysis.main --config=configs/cka_intra.py:smoke --workdir=/tmp/cka_intra_smoke
Full size (TPU/GPU VM; official checkpoints + TFDS imagenet2012 validation, paper protocol
10,240 examples in minibatches of 1,024, 20 repeats, fine granularity):
  gsutil cp gs://vit_models/imagenet21k/ViT-L_16.npz gs://bit_models/BiT-M-R50x1.npz $CKPT/
  python -m vit_analysis.main --config=configs/cka_intra.py:full,ckpt_dir=$CKPT \
      --workdir=$WORKDIR  # optionally vit=ViT-H_14, resnet=R101x1 (Fig 1's R152 is not public)
"""
import ml_collections

from vit_analysis import config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg)
  config = config_lib.base_config(arg)
  config.analyses = ("cka_intra",)
  config.cka_intra = ml_collections.ConfigDict(dict(
      models=("vit", "resnet"),
      layers="fine",            # 'fine' | 'coarse' | 'blocks' | a tuple of globs
      layers_per_model={},      # model key -> preset or globs (overrides `layers`)
      tokens="all",             # 'all' | 'exclude_cls' | 'cls_only' | 'token_mean'
      split="test",
      num_examples=768, minibatch_size=128, repeats=5,
      minibatches_per_step=0,   # 0: one minibatch per device per step
  ))
  if flags.smoke:
    config.cka_intra.update(dict(num_examples=64, minibatch_size=16, repeats=2))
  if flags.get("full", False):
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
    config.models = config_lib.official_models(flags, {"vit": "ViT-L_16", "resnet": "R50x1"})
    config.cka_intra.update(dict(num_examples=10240, minibatch_size=1024, repeats=20))
  return config
