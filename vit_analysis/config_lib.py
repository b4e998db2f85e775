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

import difflib
from typing import Any, Iterable

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
# A user's own Flax module instead of a registry model: `module='package.path:ClassName'`
# built with `module_kwargs`, its parameters from `checkpoint` (a flax msgpack file, or any file
# read by `load_fn='package.path:function'`, called as `load_fn(path, module) -> params`).
MODEL_KEYS = ("name", "num_classes", "checkpoint", "checkpoint_options", "train", "overrides",
              "module", "module_kwargs", "load_fn")

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
  """Every key the training loop reads (vit_analysis.models.train), with defaults.

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


def parse_arg(arg: str | None, accepted: Iterable[str]) -> ml_collections.ConfigDict:
  """'smoke,model=vit,steps=10' -> ConfigDict(smoke=True, model='vit', steps=10).

  Bare words are True; values that parse as int/float/bool become those types. `smoke` is
  always accepted and present (False unless given).

  Args:
    arg: the text after ':' in `--config=configs/NAME.py:ARG` (None or '' for none).
    accepted: the argument names this config takes (besides `smoke`).

  Raises:
    ValueError: for an argument the config does not take, with the closest valid name and all
      valid ones (so a typo such as 'ful' never silently runs another configuration).
  """
  valid = ["smoke"] + [a for a in accepted if a != "smoke"]
  flags = {"smoke": False}
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    key, sep, value = part.partition("=")
    key = key.strip()
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
      hint = f"; did you mean {close[0]!r}?" if close else ";"
      raise ValueError(f"unknown config argument {key!r}{hint} valid: {', '.join(valid)}")
    flags[key] = _parse_value(value.strip()) if sep else True
  return ml_collections.ConfigDict(flags)


def names(value: Any) -> tuple[str, ...]:
  """A tuple of names from a tuple/list or a comma-separated string ('vit,resnet').

  A tuple option set on the command line arrives as a 1-tuple of the comma-separated string
  (`--config.cka_cross.measures=linear_cka,rbf_cka`), so every element is split at commas too.
  """
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(n for v in (value or ()) for n in names(str(v)))


def pairs(value: Any) -> list[tuple[str, str]]:
  """(row, column) model-key pairs from a sequence of pairs or a string 'vit:resnet,vit:mixer'.

  Raises:
    ValueError: for an entry that is not a pair.
  """
  if isinstance(value, str):
    entries = [tuple(p.strip() for p in e.split(":")) for e in names(value)]
  else:
    entries = [tuple(e) for e in (value or ())]
  for e in entries:
    if len(e) != 2 or not all(e):
      raise ValueError(f"model pairs must be (row_key, column_key) or 'row:column', got {e}")
  return entries


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


def _recipe_family(name: str) -> str:
  """The digits training recipe of a registry name: 'ViT', 'R' or 'Mixer' (its prefix)."""
  for family in ("ViT", "Mixer", "R"):
    if name.startswith(family):
      return family
  raise KeyError(f"no digits training recipe for model {name!r} (names start with ViT, R or Mixer)")


def digits_model(key: str, name: str, *, smoke: bool = False, train_steps: int | None = None,
                 overrides: dict | None = None, **train) -> ml_collections.ConfigDict:
  """A `config.models[key]` entry: `name` trained on the digits through vit_analysis.models.train.

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
  recipe = {} if smoke else dict(_DIGITS_RECIPES[_recipe_family(name)])
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


def user_model(name: str, module: str, checkpoint: str = "", *, load_fn: str = "",
               **module_kwargs: Any) -> ml_collections.ConfigDict:
  """A model entry for any Flax linen module: `module='package.path:ClassName'`.

  Its layers are captured by method interception (every submodule's output under its scope
  path); the representation analyses (CKA family, probes, localisation) run on it.
  """
  return ml_collections.ConfigDict({
      "name": name, "num_classes": 0, "checkpoint": checkpoint, "checkpoint_options": {},
      "train": None, "overrides": {}, "module": module, "module_kwargs": dict(module_kwargs),
      "load_fn": load_fn})


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
  """An official checkpoint fine-tuned through vit_analysis.models.train: a fresh zero head of
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


# A model entry's `checkpoint` that names no file but an architecture whose random-weights
# official-format npz the run writes into its model cache (smoke runs of fine-tuning).
SYNTHETIC_CHECKPOINT = "synthetic:"


def synthetic_checkpoint(name: str, **options: Any) -> str:
  """'synthetic:<name>:k=v,...': an upstream-like npz of `name` (create_model options, e.g.
  num_classes=100, representation_size=32, image_size=16) that the run materialises."""
  args = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
  return f"{SYNTHETIC_CHECKPOINT}{name}:{args}"


def parse_synthetic_checkpoint(spec: str) -> tuple[str, dict[str, Any]]:
  """The (name, options) of a `synthetic_checkpoint` spec."""
  if not spec.startswith(SYNTHETIC_CHECKPOINT):
    raise ValueError(f"not a synthetic checkpoint spec: {spec!r}")
  name, _, args = spec[len(SYNTHETIC_CHECKPOINT):].partition(":")
  options = {}
  for part in filter(None, args.split(",")):
    key, sep, value = part.partition("=")
    if not sep:
      raise ValueError(f"synthetic checkpoint option {part!r} is not key=value in {spec!r}")
    options[key] = _parse_value(value)
  return name, options


# Official upstream checkpoints (ImageNet-21k stand-ins for the JFT models, README): file
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


def base_config(flags: ml_collections.ConfigDict | str | None = None
                ) -> ml_collections.ConfigDict:
  """Seed, digits data, a ViT ('vit': ViT-demo_4) and a ResNet ('resnet': R-demo) trained on
  the digits, train defaults, no analyses. `flags` come from `parse_arg` (or are its text, where
  only 'smoke' is accepted); with `flags.smoke`: 'ViT-smoke_8' / 'R-smoke', a few steps.
  """
  if not isinstance(flags, ml_collections.ConfigDict):
    flags = parse_arg(flags, ())
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


def rehearsal(config: ml_collections.ConfigDict, sub: ml_collections.ConfigDict,
              flags: ml_collections.ConfigDict) -> None:
  """Turns a CKA config into the dress rehearsal at real size (in place).

  ViT-B/16 and R50x1 at 224 px with the fine presets on a folder of real-size JPEGs
  (`data=folder:DIR`), m = 64, 2 repeats of 2 minibatches: the paper's code path end to end on
  one CPU host. Weights come from the official npz files under `ckpt_dir` when given, else are
  random.

  Raises:
    ValueError: without `data=folder:DIR`.
  """
  data = str(flags.get("data", ""))
  if not data.startswith("folder:"):
    raise ValueError("rehearsal needs data=folder:DIR, a folder of real-size JPEGs in class "
                     f"subfolders (got data={data!r})")
  config.data = ml_collections.ConfigDict({
      "name": data, "image_size": 224, "train_split": "train", "test_split": "test"})
  names = {"vit": flags.get("vit", "ViT-B_16"), "resnet": flags.get("resnet", "R50x1")}
  config.models = ml_collections.ConfigDict()
  for key, name in names.items():
    if flags.get("ckpt_dir", ""):
      path = f"{flags.ckpt_dir}/{OFFICIAL_FILES.get(name, name + '.npz')}"
      config.models[key] = official_model(name, path, 21843)
    else:
      config.models[key] = ml_collections.ConfigDict({
          "name": name, "num_classes": 1000, "checkpoint": "", "checkpoint_options": {},
          "train": None, "overrides": {}})
  sub.update(dict(layers="fine", num_examples=128, minibatch_size=64, repeats=2))
  config.description = f"dress rehearsal at 224 px on {data}: {names['vit']} and {names['resnet']}"


def cka_protocol(config: ml_collections.ConfigDict, sub: ml_collections.ConfigDict, flags: Any,
                 full_models: dict[str, str]) -> None:
  """Sizes a CKA-family analysis' sub-config `sub` for the run `flags` asks for, in place.

  Digits (default): 768 examples in minibatches of 128, 5 repeats; `:smoke`: 64 in 16, 2
  repeats; `:full`: ImageNet validation with the official checkpoints `full_models` (key ->
  name) and the paper's protocol, 10,240 examples in minibatches of 1,024, 20 repeats
  (docs/method.md#protocol-defaults); `:rehearsal` as `rehearsal`.
  """
  sub.update(dict(num_examples=768, minibatch_size=128, repeats=5))
  if flags.smoke:
    sub.update(dict(num_examples=64, minibatch_size=16, repeats=2))
  if flags.get("full", False):
    config.data = tfds_data("imagenet2012", 224, test_split="validation")
    config.models = official_models(flags, full_models)
    sub.update(dict(num_examples=10240, minibatch_size=1024, repeats=20))
  if flags.get("rehearsal", False):
    rehearsal(config, sub, flags)
