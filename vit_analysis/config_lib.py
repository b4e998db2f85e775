"""Builders shared by every file in configs/: flags, the digits data, trained-on-digits models.

A config file typically reads

  def get_config(arg=None):
    config = config_lib.base_config(arg)          # seed, data, models {vit, resnet}, train, ...
    config.analyses = ('cka_intra',)
    config.cka_intra = ml_collections.ConfigDict({...})
    return config

Models trained on the digits are cached under `config.model_cache` (default '<workdir>/models')
by a content hash of everything that determines their parameters (model, effective train
config, data, seed), so several configs, or the tests, share one trained model. This module
imports no JAX, so loading a config stays cheap.
"""
from __future__ import annotations

import ml_collections

# Full-size CPU demo model -> its tiny twin for smoke runs (trains in seconds, tests and `:smoke`).
SMOKE_NAMES = {
    "ViT-demo_4": "ViT-smoke_8",
    "ViT-demo_4-gap": "ViT-smoke_8-gap",
    "ViT-Ti_4": "ViT-smoke_8",
    "ViT-Ti_4-gap": "ViT-smoke_8-gap",
    "R-demo": "R-smoke",
    "R26x1-small": "R-smoke",
    "Mixer-demo_4": "Mixer-smoke_8",
}

# Keys a model entry of `config.models` may have.
# `checkpoint_options` are keyword arguments of `checkpoints.load_npz` (fresh_head, ...).
MODEL_KEYS = ("name", "num_classes", "checkpoint", "checkpoint_options", "train", "overrides")

# Top-level keys every experiment config may have (besides one sub-config per analysis name).
TOP_LEVEL_KEYS = ("seed", "data", "models", "train", "analyses", "model_cache", "overwrite",
                  "distributed", "description")

# Per-family recipes on the digits: AdamW, batch 64 (62 steps per epoch), one epoch of warmup,
# random shifts of up to 2 px (the digits are centred; shifts are the augmentation that helps
# a ViT most on 4,000 images). See configs/train_digits.py for measured times and accuracies.
_COMMON = {"optimizer": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4, "batch_size": 64,
           "warmup_steps": 60, "augment_shift": 2, "eval_batch_size": 200}
_DIGITS_RECIPES = {
    "ViT": dict(_COMMON, num_epochs=10),
    # BiT units (GroupNorm + weight standardisation) learn far faster with SGD-momentum at 0.1,
    # as BiT itself is trained, than with AdamW at 1e-3 (measured on the digits: 87.9% vs 63.2%
    # test accuracy after 4 epochs).
    "R": dict(_COMMON, optimizer="sgd", learning_rate=0.1, weight_decay=0.0, num_epochs=6),
    "Mixer": dict(_COMMON, num_epochs=10),
}


def train_defaults(smoke: bool = False) -> ml_collections.ConfigDict:
  """Every key the training loop reads (vit_analysis.train), with defaults.

  A model's `train` entry only lists keys that differ from `config.train`; unknown keys are
  an error.
  """
  c = ml_collections.ConfigDict()
  c.optimizer = "adamw"         # 'adamw' | 'sgd' (SGD with Nesterov-free momentum)
  c.learning_rate = 1e-3        # peak, after linear warmup; cosine decay to 0 at the last step
  c.warmup_steps = 100
  c.weight_decay = 1e-4         # decoupled (AdamW; added to the SGD update likewise)
  c.momentum = 0.9              # SGD momentum / Adam b1
  c.b2 = 0.999
  c.grad_clip_norm = 1.0        # global-norm clipping; 0 disables
  c.label_smoothing = 0.0
  c.augment_shift = 0           # random translation by up to this many pixels (0: none)
  c.augment_flip = False        # random left-right flips (natural images; not for digits)
  c.batch_size = 128            # global
  c.num_epochs = 10.0           # used when num_steps is 0
  c.num_steps = 0
  c.eval_every_steps = 0        # 0: at the end of every epoch (and always at the end)
  c.eval_batch_size = 256       # global; the last batch is padded and masked
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.fast_compile = False        # XLA:CPU optimisation level 0: compiles ~2x faster, runs slower
  if smoke:
    c.fast_compile = True
    c.num_steps = 12
    c.batch_size = 32
    c.warmup_steps = 2
    c.log_every_steps = 4
    c.checkpoint_every_steps = 1000  # only the final save
    c.eval_batch_size = 200
  return c


def parse_arg(arg: str | None) -> ml_collections.ConfigDict:
  """'smoke,model=vit,steps=10' -> ConfigDict(smoke=True, model='vit', steps=10).

  Bare words are True; values that parse as int/float/bool become those types. `smoke` is
  always present (False unless given).
  """
  flags = {"smoke": False}
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    key, sep, value = part.partition("=")
    flags[key.strip()] = _parse_value(value.strip()) if sep else True
  return ml_collections.ConfigDict(flags)


def _parse_value(v: str):
  if v.lower() in ("true", "false"):
    return v.lower() == "true"
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return v


def digits_data(image_size: int = 32) -> ml_collections.ConfigDict:
  """The embedded offline 5,000 MNIST digits (4,000 train / 1,000 test)."""
  return ml_collections.ConfigDict({
      "name": "digits", "image_size": image_size, "train_split": "train", "test_split": "test"})


def tfds_data(name: str, image_size: int, *, train_split: str = "train",
              test_split: str = "test", data_dir: str = "") -> ml_collections.ConfigDict:
  """A TFDS dataset read with tfds.data_source (e.g. 'cifar10', 'imagenet2012')."""
  return ml_collections.ConfigDict({
      "name": f"tfds:{name}", "image_size": image_size, "train_split": train_split,
      "test_split": test_split, "data_dir": data_dir})


def model_family(name: str) -> str:
  """'ViT', 'R' or 'Mixer' from a registry name."""
  for family in ("ViT", "Mixer", "R"):
    if name.startswith(family):
      return family
  raise KeyError(f"cannot tell the family of model {name!r}")


def digits_model(key: str, name: str, *, smoke: bool = False, train_steps: int | None = None,
                 overrides: dict | None = None, **train) -> ml_collections.ConfigDict:
  """A `config.models[key]` entry: `name` trained on the digits through vit_analysis.train.

  Args:
    key: the entry's key in config.models (for messages only).
    name: registry name of the full demo model ('ViT-demo_4', 'R-demo', ...); with smoke=True
      its tiny twin from SMOKE_NAMES is used instead.
    smoke: tiny model and a few training steps.
    train_steps: fixed number of steps (default: the family's recipe in epochs).
    overrides: create_model overrides, e.g. {'skip_removed': (1,)}.
    **train: further train-config keys for this model (see train_defaults()).
  """
  if not key:
    raise ValueError("model key must be non-empty")
  recipe = {} if smoke else dict(_DIGITS_RECIPES[model_family(name)])
  if train_steps is not None:
    recipe["num_steps"] = train_steps
  recipe.update(train)
  unknown = sorted(set(recipe) - set(train_defaults()))
  if unknown:
    raise KeyError(f"unknown train keys {unknown} for model {key!r}")
  return ml_collections.ConfigDict({
      "name": SMOKE_NAMES.get(name, name) if smoke else name,
      "num_classes": 10,
      "checkpoint": "",
      "train": ml_collections.ConfigDict(recipe),
      "overrides": dict(overrides or {}),
  })


def official_model(name: str, checkpoint: str, num_classes: int,
                   overrides: dict | None = None, **load_options) -> ml_collections.ConfigDict:
  """A model entry loaded from an official npz checkpoint, without training.

  `load_options` go to `checkpoints.load_npz` (e.g. fresh_head=True, drop_pre_logits=True).
  """
  return ml_collections.ConfigDict({
      "name": name, "num_classes": num_classes, "checkpoint": checkpoint,
      "checkpoint_options": dict(load_options), "train": None, "overrides": dict(overrides or {})})


def finetune_model(name: str, checkpoint: str, num_classes: int, *,
                   overrides: dict | None = None, **train) -> ml_collections.ConfigDict:
  """An official checkpoint fine-tuned through vit_analysis.train: a fresh zero head of
  `num_classes`, the ImageNet-21k pre_logits layer dropped (as vit_jax fine-tuning), the
  position embedding resized to the data's image size.
  """
  unknown = sorted(set(train) - set(train_defaults()))
  if unknown:
    raise KeyError(f"unknown train keys {unknown}")
  return ml_collections.ConfigDict({
      "name": name, "num_classes": num_classes, "checkpoint": checkpoint,
      "checkpoint_options": {"fresh_head": True, "drop_pre_logits": True},
      "train": ml_collections.ConfigDict(train), "overrides": dict(overrides or {})})


# Official upstream checkpoints (ImageNet-21k, paper.md §3.2 stand-ins for the JFT models): file
# names under `ckpt_dir`, by registry name; other names default to '<name>.npz'.
OFFICIAL_FILES = {
    "ViT-B_32": "ViT-B_32.npz", "ViT-B_16": "ViT-B_16.npz", "ViT-L_16": "ViT-L_16.npz",
    "ViT-H_14": "ViT-H_14.npz", "R50x1": "BiT-M-R50x1.npz", "R101x1": "BiT-M-R101x1.npz",
    "R152x2": "BiT-M-R152x2.npz", "Mixer-B_16": "Mixer-B_16.npz", "Mixer-L_16": "Mixer-L_16.npz",
}


def official_models(flags: ml_collections.ConfigDict,
                    defaults: dict[str, str]) -> ml_collections.ConfigDict:
  """`config.models` of official 21,843-class checkpoints: key -> name from `defaults`, each name
  overridable by the flag of the same key (e.g. 'vit=ViT-H_14'), files under flag `ckpt_dir`."""
  models = ml_collections.ConfigDict()
  ckpt_dir = flags.get("ckpt_dir", "checkpoints")
  for key, name in defaults.items():
    name = flags.get(key, name)
    models[key] = official_model(
        name, f"{ckpt_dir}/{OFFICIAL_FILES.get(name, name + '.npz')}", 21843)
  return models


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Seed, digits data, a ViT ('vit': ViT-demo_4) and a ResNet ('resnet': R-demo) trained on
  the digits, train defaults, no analyses. Smoke: 'ViT-smoke_8' / 'R-smoke', a few steps.
  """
  flags = parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = digits_data()
  config.models = ml_collections.ConfigDict()
  config.models.vit = digits_model("vit", "ViT-demo_4", smoke=flags.smoke)
  config.models.resnet = digits_model("resnet", "R-demo", smoke=flags.smoke)
  config.train = train_defaults(flags.smoke)
  config.analyses = ()
  config.model_cache = ""   # '' -> <workdir>/models
  config.overwrite = False  # True: allow a different config in a workdir that has results
  config.distributed = "auto"  # 'auto' (environment decides) | 'yes' | 'no'
  config.description = ""
  return config
