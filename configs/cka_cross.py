r"""Cross-model CKA heatmaps (paper Figs 2, B.1; G.2 ViT vs ViT; H.2 Mixer vs ViT/ResNet).

Offline (digits):
  python -m vit_analysis.main --config=configs/cka_cross.py --workdir=/tmp/cka_cross
  python -m vit_analysis.main --config=configs/cka_cross.py:smoke --workdir=/tmp/cka_cross_smoke
  (smoke: every similarity measure of vit_analysis.similarity.measures and a 2-permutation null)
Full size (official checkpoints + TFDS imagenet2012 validation, 10,240 x 20 repeats, m=1,024):
  python -m vit_analysis.main --config=configs/cka_cross.py:full,ckpt_dir=$CKPT --workdir=$WORKDIR
  (flags vit=ViT-H_14, resnet=R101x1 change the models; --config.cka_cross.layers=coarse for G.2)
"""
from vit_analysis import analyses, config_lib
from vit_analysis.similarity import measures


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("full", "rehearsal", "ckpt_dir", "data", "vit", "resnet"))
  config = config_lib.base_config(flags)
  config.analyses = ("cka_cross",)
  config.cka_cross = analyses.default_config("cka_cross")  # options and paper defaults
  config.cka_cross.update(dict(pairs=(("vit", "resnet"),)))
  config_lib.cka_protocol(config, config.cka_cross, flags, {"vit": "ViT-L_16", "resnet": "R50x1"})
  if flags.smoke:
    # The smoke run exercises every similarity measure and the shuffle null on the same pass
    # (docs/method.md#other-similarity-measures), with the options that read features
    # (PWCCA's L1 weights) and per-example moments (RSA's correlation distance); k-NN's k and
    # ridge's alphas sized for minibatches of 16; coarse layers keep its compile time short.
    config.cka_cross.update(dict(
        layers="coarse", measures=measures.MEASURES, null_permutations=2,
        measure_options={"mutual_knn": {"k": 3}, "rsa": {"distance": "correlation"},
                         "linear_predictivity": {"alphas": (0.1, 10.0)}}))
  return config
