r"""10-shot ImageNet linear probes of official checkpoints (paper Figs 11, 13, D.4, F.1-F.3).

Paper setting (docs/method.md#linear-probes): 10-shot ridge probes on ImageNet train (regulariser 2^k,
k in [-10, 20], tuned on 10 further train images per class), tested on the 50,000 validation
images at 224 px, 3 seeds; ViT probes on CLS / token means / single tokens, ResNet unit outputs
space-to-depth + average-pooled to the final 7x7 grid (Appendix A).

  # Fig 11 (+D.4): ViT-B/32 CLS, ViT-B/32 GAP, R50x1; per-token probes at every block/stage.
  python -m vit_analysis.main --config=configs/probe_imagenet.py:ckpt_dir=$CKPT,gap_ckpt=$GAP \
      --workdir=$WORKDIR
  # Fig 13 right: B/32, B/16, L/16, H/14, R50x1, R101x1 (no public R152x1), R152x2; token means.
  python -m vit_analysis.main --config=configs/probe_imagenet.py:fig=13,ckpt_dir=$CKPT \
      --workdir=$WORKDIR
  # F.2/F.3 (CIFAR): data=cifar10 or cifar100 switches to all 45,000 training images, closed
  # form, validated on the last 5,000 (docs/method.md#full-probes), tested on the 10,000 test images.
  python -m vit_analysis.main --config=configs/probe_imagenet.py:data=cifar10,ckpt_dir=$CKPT ...
  # Offline smoke (digits + tiny random-init/briefly trained models):
  python -m vit_analysis.main --config=configs/probe_imagenet.py:smoke --workdir=/tmp/pi_smoke
Checkpoints: gs://vit_models/imagenet21k/ViT-{B_32,B_16,L_16,H_14}.npz,
gs://bit_models/BiT-M-R{50x1,101x1,152x2}.npz; GAP B/32: gap_ckpt= (e.g. from gs://vit_models/gsam/).
"""
from vit_analysis import config_lib


def _probe_config(smoke: bool):
  # Shared with the digits config (same keys and defaults); imported by path-free name.
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe_digits.py")
  spec = importlib.util.spec_from_file_location("probe_digits_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.probe_config(smoke)


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("ckpt_dir", "gap_ckpt", "fig", "data", "vit", "resnet",
                                     "vit_b32", "vit_b16", "vit_l16", "vit_h14", "r50", "r101",
                                     "r152x2"))
  config = config_lib.base_config(flags)  # smoke: digits, tiny models, offline.
  config.analyses = ("probe",)
  config.probe = _probe_config(flags.smoke)
  if flags.smoke:
    config.models.vit_gap = config_lib.digits_model("vit_gap", "ViT-demo_4-gap", smoke=True)
    return config
  ckpt = flags.get("ckpt_dir", "checkpoints")
  fig = int(flags.get("fig", 11))
  dataset = flags.get("data", "imagenet2012")
  if dataset == "imagenet2012":
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
  else:  # CIFAR (F.2, F.3): first 45,000 train images fit, last 5,000 validate, closed form.
    config.data = config_lib.tfds_data(dataset, 224, test_split="test")
    config.probe.update(dict(kind="ridge", num_train=50000, num_val=5000, train_order="given"))
  if fig == 11:
    config.models = config_lib.official_models(flags, {"vit": "ViT-B_32", "resnet": "R50x1"})
    config.models.vit_gap = config_lib.official_model(
        "ViT-B_32-gap-norep", flags.get("gap_ckpt", f"{ckpt}/ViT-B_32-gap.npz"), 1000)
    # D.4: block1..4 unit1 and block4 unit3 of R50; every ViT block.
    config.probe.token_layers = {"ViT": ("block??",), "R": ("block?/unit01", "block4/unit03")}
    config.probe.grid_layers = ("block00", "block01", "block05", "block10", "block11",
                                "block?/unit01", "block4/unit03")
  else:
    vits = {"vit_b32": "ViT-B_32", "vit_b16": "ViT-B_16", "vit_l16": "ViT-L_16",
            "vit_h14": "ViT-H_14"}
    config.models = config_lib.official_models(
        flags, {**vits, "r50": "R50x1", "r101": "R101x1", "r152x2": "R152x2"})
    for key in vits:
      config.probe.poolings[key] = ("mean",)  # aggregated ViT input = token mean (method.md).
    config.probe.token_layers = {}
  config.probe.update(dict(batch_size=256, layers={"ViT": ("block??",), "R": ("block?/unit??",),
                                                   "Mixer": ("block??",)}))
  return config
