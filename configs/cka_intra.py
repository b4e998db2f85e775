r"""Intra-model CKA heatmaps (paper Figs 1, B.1; H.1 with a Mixer).

Offline (digits, small models trained on the fly and cached):
  python -m vit_analysis.main --config=configs/cka_intra.py --workdir=/tmp/cka_intra
  python -m vit_analysis.main --config=configs/cka_intra.py:smoke --workdir=/tmp/cka_intra_smoke
Full size (TPU/GPU VM; official checkpoints + TFDS imagenet2012 validation, paper protocol
10,240 examples in minibatches of 1,024, 20 repeats, fine granularity):
  gsutil cp gs://vit_models/imagenet21k/ViT-L_16.npz gs://bit_models/BiT-M-R50x1.npz $CKPT/
  python -m vit_analysis.main --config=configs/cka_intra.py:full,ckpt_dir=$CKPT \
      --workdir=$WORKDIR  # optionally vit=ViT-H_14, resnet=R101x1 (Fig 1's R152 is not public)
Every model of Fig 1 (ViT-B/32, B/16, L/16, H/14, R50x1, R152x2), one sweep point each:
  python -m vit_analysis.sweep --config=configs/cka_intra.py:full,ckpt_dir=$CKPT --workdir=$W/fig1
"""
from vit_analysis import analyses, config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("full", "rehearsal", "ckpt_dir", "data", "vit", "resnet"))
  config = config_lib.base_config(flags)
  config.analyses = ("cka_intra",)
  config.cka_intra = analyses.default_config("cka_intra")  # options and paper defaults
  config.cka_intra.update(dict(models=("vit", "resnet")))
  config_lib.cka_protocol(config, config.cka_intra, flags, {"vit": "ViT-L_16", "resnet": "R50x1"})
  return config


def get_hyper(hyper, arg=None):
  """Fig 1's models, one point each: the point analyses only the model it sets.

  `:full` the official checkpoints under `ckpt_dir`; `:smoke` two tiny ViTs and the tiny ResNet;
  otherwise the digits models. Each model is swept under its own key (ViTs as 'vit', ResNets as
  'resnet'), its checkpoint zipped with its name.
  """
  flags = config_lib.parse_arg(arg, ("full", "rehearsal", "ckpt_dir", "data", "vit", "resnet"))
  if flags.get("full", False):
    vits, resnets = ("ViT-B_32", "ViT-B_16", "ViT-L_16", "ViT-H_14"), ("R50x1", "R152x2")
  elif flags.smoke:
    vits, resnets = ("ViT-smoke_8", "ViT-smoke_8-gap"), ("R-smoke",)
  else:
    vits, resnets = ("ViT-demo_4", "ViT-Ti_4"), ("R-demo",)

  def models(key, names):
    swept = [hyper.sweep(f"config.models.{key}.name", names)]
    if flags.get("full", False):
      ckpt = flags.get("ckpt_dir", "checkpoints")
      swept.append(hyper.sweep(f"config.models.{key}.checkpoint", [
          f"{ckpt}/{config_lib.OFFICIAL_FILES.get(n, n + '.npz')}" for n in names]))
    swept.append(hyper.fixed("config.cka_intra.models", (key,), len(names)))
    return hyper.zipit(swept)

  return hyper.chainit([models("vit", vits), models("resnet", resnets)])
