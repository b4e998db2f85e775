r"""ViTs trained without the skip connections of one block (paper Fig 8).

Offline (digits; ViT-demo_4 (6 blocks) and one copy per block in `blocks`, each trained through
vit_analysis.models.train and cached, then intra-model CKA on the test digits):
  python -m vit_analysis.main --config=configs/skip_removal.py --workdir=/tmp/skip_removal
  python -m vit_analysis.main --config=configs/skip_removal.py:smoke --workdir=/tmp/sr_smoke
Full size (TPU VM; ViT-B/32 trained from scratch on TFDS imagenet2012 with the training loop,
blocks 1, 7, 10 removed as in Fig 8; a long training job per model):
  python -m vit_analysis.main --config=configs/skip_removal.py:full --workdir=$WORKDIR \
      --config.models.vit.train.num_epochs=300
"""
import ml_collections

from vit_analysis import analyses, config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("full",))
  config = config_lib.base_config(flags)
  del config.models["resnet"]
  config.analyses = ("skip_removal",)
  config.skip_removal = analyses.default_config("skip_removal")  # options and paper defaults
  # The 8-block digits ViT: an early and a middle block (the paper: 1, 7, 10 of 12).
  config.skip_removal.update(dict(blocks=(1, 3), num_examples=768, minibatch_size=128,
                                  repeats=3))
  if flags.smoke:
    config.skip_removal.update(dict(blocks=(1,), num_examples=32, minibatch_size=8, repeats=1,
                                    figure_formats=("png",)))
  if flags.get("full", False):
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
    config.models.vit = ml_collections.ConfigDict(dict(
        name="ViT-B_32", num_classes=1000, checkpoint="",
        train=ml_collections.ConfigDict(dict(
            optimizer="adamw", learning_rate=3e-3, weight_decay=0.3, warmup_steps=10_000,
            batch_size=4096, num_epochs=300, label_smoothing=0.0, augment_shift=0)),
        overrides=dict(dropout_rate=0.1)))
    config.skip_removal.update(dict(blocks=(1, 7, 10), num_examples=10240, minibatch_size=1024,
                                    repeats=20))
  return config
