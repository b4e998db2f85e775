r"""Supervised vs self- and language-supervised ViT-B/16s ("Teaching Matters", Walmer et al. 2023).

One architecture, four training signals: supervised (vit_jax ImageNet-21k upstream), DINO, MAE
and CLIP. Intra-model CKA of each, cross-model CKA of each against the supervised model,
attention distances and 10-shot probes, on ImageNet validation at 224 px; every model gets its
own input normalisation (recorded with the model, `models.describe`).

Full size (files under `ckpt_dir`, see the README's model table for where each comes from):
  ViT-B_16.npz                                   vit_jax, gs://vit_models/imagenet21k/
  vit_base_patch16_224.dino.safetensors          timm's `model.safetensors` of that name
  vit_base_patch16_224.mae.safetensors           likewise
  vit_base_patch16_clip_224.openai.safetensors   likewise
  python -m vit_analysis.main --config=configs/teaching_matters.py:full,ckpt_dir=$CKPT \
      --workdir=$WORKDIR
Offline (tiny random-weight twins of each family on the digits; what the tests run):
  python -m vit_analysis.main --config=configs/teaching_matters.py:smoke --workdir=/tmp/tm
"""
import ml_collections

from vit_analysis import analyses, config_lib

# key -> (registry name, file under ckpt_dir). The timm tag after the dot names the weights
# (and so the normalisation), not the architecture.
MODELS = {
    "supervised": ("ViT-B_16", "ViT-B_16.npz"),
    "dino": ("timm:vit_base_patch16_224.dino", "vit_base_patch16_224.dino.safetensors"),
    "mae": ("timm:vit_base_patch16_224.mae", "vit_base_patch16_224.mae.safetensors"),
    "clip": ("timm:vit_base_patch16_clip_224.openai",
             "vit_base_patch16_clip_224.openai.safetensors"),
}
# The smoke twins: each family's options (CLS, pre-norm, activation, normalisation) at CPU size.
_TINY = {"patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64,
         "image_size": 32}


def _entry(name: str, checkpoint: str, overrides: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": name, "num_classes": 0 if name.startswith("timm:") else 21843,
      "checkpoint": checkpoint, "checkpoint_options": {}, "train": None,
      "overrides": overrides})


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("full", "ckpt_dir"))
  config = config_lib.base_config(flags)
  config.models = ml_collections.ConfigDict()
  for key, (name, filename) in MODELS.items():
    if flags.get("full", False):
      config.models[key] = _entry(name, f"{flags.get('ckpt_dir', 'checkpoints')}/{filename}", {})
    else:  # random weights, no file: the offline twins
      config.models[key] = _entry(name, "", dict(_TINY))
      config.models[key].num_classes = 10
  config.analyses = ("cka_intra", "cka_cross", "attention_distance", "probe")
  config.cka_intra = analyses.default_config("cka_intra")
  config.cka_intra.layers = "blocks"
  config.cka_cross = analyses.default_config("cka_cross")
  config.cka_cross.update(dict(layers="blocks",
                               pairs=tuple(("supervised", k) for k in MODELS if k != "supervised")))
  config.attention_distance = analyses.default_config("attention_distance")
  config.probe = analyses.default_config("probe")
  config.probe.layers = ml_collections.ConfigDict({"ViT": ("block??",)})
  config.probe.poolings = ml_collections.ConfigDict({k: ("mean",) for k in MODELS})
  if flags.get("full", False):
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
  else:
    sizes = dict(num_examples=64, minibatch_size=16, repeats=1, figure_formats=("png",))
    config.cka_intra.update(sizes)
    config.cka_cross.update(sizes)
    config.attention_distance.update(dict(num_images=16, batch_size=8, figure_formats=("png",)))
    config.probe.update(dict(shots=2, holdout_per_class=1, seeds=1, num_test=64, batch_size=32,
                             l2_exponents=(-4, 8), figure_formats=("png",)))
  config.description = "supervised vs DINO, MAE and CLIP ViT-B/16 (Teaching Matters)"
  return config
