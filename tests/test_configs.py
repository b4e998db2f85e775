"""Every configs/*.py: the full config validates, and the `:smoke` variant runs end to end.

Config files are discovered by glob, so a new config is tested as soon as it exists. All smoke
runs share one model cache (the folder test_main.py uses too): the tiny models train once.
"""
import glob
import importlib.util
import json
import os

import ml_collections
import pytest

from vit_analysis import config_lib, main, options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def load_config_module(path):
  spec = importlib.util.spec_from_file_location(
      f"_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_configs_exist():
  names = [os.path.basename(p) for p in CONFIGS]
  assert "train_digits.py" in names and "finetune.py" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_full_config_validates(path):
  config = load_config_module(path).get_config(None)
  options.validate_config(config)
  assert not any(m.name.startswith(("ViT-smoke", "R-smoke", "Mixer-smoke"))
                 for m in config.models.values()), "the full config must not use smoke models"


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_smoke_config_runs(path, tmp_path, model_cache):
  config = load_config_module(path).get_config("smoke")
  options.validate_config(config)
  config.model_cache = model_cache
  workdir = str(tmp_path / "work")
  results = main.run(config, workdir)
  assert [r.name for r in results] == list(config.analyses)
  for r in results:
    assert os.path.exists(os.path.join(workdir, "results", f"{r.name}.json"))
    for fig in r.figures:
      assert os.path.exists(os.path.join(workdir, fig)), fig
  summaries = _read_json(os.path.join(workdir, "models.json"))
  assert {s["key"] for s in summaries} >= set(config.models)
  for s in summaries:
    assert s["test_accuracy"] is None or 0 <= s["test_accuracy"] <= 1


def test_official_models_paths_and_overrides():
  from vit_analysis import config_lib
  flags = config_lib.parse_arg("ckpt_dir=/ckpt,vit=ViT-H_14", ("ckpt_dir", "vit"))
  models = config_lib.official_models(flags, {"vit": "ViT-L_16", "resnet": "R50x1",
                                              "mixer": "Mixer-S_16"})
  assert (models.vit.name, models.vit.checkpoint) == ("ViT-H_14", "/ckpt/ViT-H_14.npz")
  assert models.resnet.checkpoint == "/ckpt/BiT-M-R50x1.npz"  # BiT files carry the BiT-M- prefix
  assert models.mixer.checkpoint == "/ckpt/Mixer-S_16.npz"
  assert all(m.num_classes == 21843 and m.train is None for m in models.values())


def _param_count(entry, image_size=32):
  import jax
  import jax.numpy as jnp

  from vit_analysis.models import create_model
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(entry.overrides).items()}
  module = create_model(entry.name, entry.num_classes, **overrides)
  images = jnp.zeros((1, image_size, image_size, 3))
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), images))
  logits, out = jax.eval_shape(lambda v: module.apply(v, images), variables)
  assert logits.shape == (1, entry.num_classes)
  return sum(x.size for x in jax.tree.leaves(variables)), out


def test_digits_models_match_the_readme():
  """train_digits.py's fast models are the ones README.md measures (parameter counts), and the
  demo's ResNet keeps a 4x4 final grid for localisation and per-token probes."""
  digits = load_config_module(os.path.join(REPO, "configs", "train_digits.py")).get_config(None)
  assert _param_count(digits.models.vit)[0] == 148_170
  assert _param_count(digits.models.resnet)[0] == 882_394
  assert digits.models.vit.train.num_epochs == 50 and digits.models.resnet.train.num_epochs == 15
  contract = load_config_module(os.path.join(REPO, "configs", "train_digits.py")).get_config(
      "contract")
  assert all(not dict(m.overrides) for m in contract.models.values())
  demo = load_config_module(os.path.join(REPO, "configs", "demo.py")).get_config(None)
  _, out = _param_count(demo.models.resnet)
  assert out["block4/unit01"].shape[1:3] == (4, 4)
  _, out = _param_count(demo.models.vit_gap)
  assert out["block03"].shape[1] == 16  # 4x4 patch tokens of 8 px, no CLS


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_arguments_are_checked(path):
  module = load_config_module(path)
  with pytest.raises(ValueError, match=r"unknown config argument 'smok'; did you mean 'smoke'\? "
                                       r"valid: smoke"):
    module.get_config("smok")
  with pytest.raises(ValueError, match="unknown config argument 'no_such_option'"):
    module.get_config("no_such_option=1")


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_full_configs_read_official_checkpoints_from_ckpt_dir(path):
  from vit_analysis import config_lib
  try:
    config = load_config_module(path).get_config("full,ckpt_dir=/ckpt")
  except ValueError as e:  # configs without a full-size version say so, naming what they take
    assert "unknown config argument" in str(e) and "valid: smoke" in str(e)
    return
  for key, m in config.models.items():
    if m.checkpoint and m.train is None and m.name in config_lib.OFFICIAL_FILES:
      assert m.checkpoint == f"/ckpt/{config_lib.OFFICIAL_FILES[m.name]}", (key, m.checkpoint)


def test_cka_protocol_sizes_each_kind_of_run():
  sizes = lambda s: (s.num_examples, s.minibatch_size, s.repeats)
  for arg, want in ((None, (768, 128, 5)), ("smoke", (64, 16, 2)),
                    ("full,ckpt_dir=/ck", (10240, 1024, 20))):
    flags = config_lib.parse_arg(arg, ("full", "ckpt_dir"))
    config = config_lib.base_config(flags)
    sub = ml_collections.ConfigDict(dict(num_examples=0, minibatch_size=0, repeats=0))
    config_lib.cka_protocol(config, sub, flags, {"vit": "ViT-L_16"})
    assert sizes(sub) == want, arg
    if arg and arg.startswith("full"):
      assert config.data.name == "tfds:imagenet2012" and list(config.models) == ["vit"]
      assert config.models.vit.checkpoint.startswith("/ck/")
