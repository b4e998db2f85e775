"""Entry point: config validation, model cache, analysis dispatch, workdir guard, CLI."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from vit_analysis import analyses as analyses_lib
from vit_analysis import config_lib, main, options
from vit_analysis.analyses import base
from vit_analysis.models import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _smoke_config(model_cache, **changes):
  config = config_lib.base_config("smoke")
  config.model_cache = model_cache
  config.update(changes)
  return config


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c, "analysis", ("cka_intra",)), "'analysis'"),
    (lambda c: setattr(c, "analyses", ("cka_intr",)), "cka_intr"),
    (lambda c: setattr(c.data, "img_size", 3), "data.img_size"),
    (lambda c: setattr(c.models.vit, "overides", {}), "models.vit.overides"),
    (lambda c: setattr(c.models.vit.train, "lr", 0.1), "lr"),
    (lambda c: setattr(c.train, "batchsize", 4), "batchsize"),
])
def test_validate_config_names_the_bad_key(mutate, message):
  config = config_lib.base_config("smoke")
  options.validate_config(config)
  mutate(config)
  with pytest.raises(KeyError, match=message):
    options.validate_config(config)


def test_command_line_override_of_unknown_key_is_an_error(monkeypatch):
  path = os.path.join(REPO, "configs", "train_digits.py")

  def parse(override):
    argv = ["prog", f"--config={path}:smoke", override]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    fv(argv)
    return fv.config

  config = parse("--config.train.batch_size=64")
  assert config.train.batch_size == 64 and config.models.vit.name == "ViT-smoke_8"
  with pytest.raises(Exception, match="batch_sze"):
    parse("--config.train.batch_sze=64")


def test_model_hash_is_content_based():
  config = config_lib.base_config("smoke")
  same = build.model_hash(config, config_lib.digits_model("other_key", "ViT-demo_4", smoke=True))
  assert same == build.model_hash(config, config.models.vit)
  assert build.model_hash(config, config.models.vit) != build.model_hash(config, config.models.resnet)
  config.train.learning_rate = 0.5
  assert build.model_hash(config, config.models.vit) != same
  config.train.learning_rate = config_lib.train_defaults(True).learning_rate
  config.seed = 1
  assert build.model_hash(config, config.models.vit) != same


def test_run_dispatches_analyses_trains_skip_removed_and_guards_workdir(
    tmp_path, model_cache, monkeypatch):
  seen = {}

  def fake_analysis(ctx, cfg):
    # cfg: the analysis' defaults updated by the config's values.
    assert sorted(ctx.models) == ["resnet", "vit"] and cfg.repeats == 7
    assert cfg.minibatch_size == 1024 and ctx.name == "cka_intra"
    seen["calls"] = seen.get("calls", 0) + 1
    assert len(ctx.sources["train"]) == 4000 and len(ctx.sources["test"]) == 1000
    for m in ctx.models.values():
      assert 0 <= m.test_accuracy <= 1 and m.image_size == 32
    # train_fn (extra models for skip removal, dataset scale) goes through the same cache:
    # the same content under another key is restored, not retrained.
    again = ctx.train_fn("again", ctx.model_entry("vit").to_dict())
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.variables),
                 jax.device_get(ctx.models["vit"].variables))
    seen["again_acc"] = again.test_accuracy
    return base.AnalysisResult(name="cka_intra", title="t", caption="c", figures=[],
                               metrics={"n": 1})

  real_get = analyses_lib.get
  monkeypatch.setattr(analyses_lib, "get",
                      lambda n: fake_analysis if n == "cka_intra" else real_get(n))
  config = _smoke_config(model_cache, analyses=("cka_intra",))
  config.cka_intra = ml_collections.ConfigDict({"repeats": 7})
  workdir = str(tmp_path / "run")
  results = main.run(config, workdir)
  assert [r.name for r in results] == ["cka_intra"] and results[0].seconds > 0
  saved = _read_json(os.path.join(workdir, "results", "cka_intra.json"))
  assert saved["metrics"] == {"n": 1}
  summaries = _read_json(os.path.join(workdir, "models.json"))
  assert [s["key"] for s in summaries] == ["resnet", "vit", "again"]
  assert seen["again_acc"] == summaries[1]["test_accuracy"]
  assert len(os.listdir(model_cache)) >= 2
  assert os.path.exists(os.path.join(workdir, "report.html"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["cka_intra"] == {"repeats": 7}
  # Same config again: reuses the cached models and the finished analysis' saved result.
  again = main.run(config, workdir)
  assert seen["calls"] == 1 and again[0].metrics == {"n": 1}
  other = _smoke_config(model_cache, analyses=("cka_intra",), seed=5)
  other.cka_intra = ml_collections.ConfigDict({"repeats": 7})
  with pytest.raises(ValueError, match="seed"):
    main.run(other, workdir)
  other.models = ml_collections.ConfigDict()  # keeps the allowed overwrite below cheap
  other.analyses = ()
  other.overwrite = True
  assert main.run(other, workdir) == []
  assert _read_json(os.path.join(workdir, "config.json"))["seed"] == 5


def test_unknown_analysis_option_and_missing_files_fail_before_training(tmp_path):
  config = config_lib.base_config("smoke")
  config.analyses = ("cka_intra",)
  config.cka_intra = ml_collections.ConfigDict({"repeat": 3})
  with pytest.raises(KeyError, match="cka_intra.repeat.*did you mean 'repeats'"):
    options.validate_config(config)
  # A missing checkpoint of the SECOND model is reported before the first one trains.
  config = config_lib.base_config("smoke")
  config.models.resnet = config_lib.official_model("R50x1", str(tmp_path / "BiT.npz"), 10)
  config.model_cache = str(tmp_path / "cache")
  with pytest.raises(FileNotFoundError, match="models.resnet.checkpoint.*official-format"):
    main.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "cache")
  config = config_lib.base_config("smoke")
  config.data = config_lib.digits_data()
  config.data.name = f"folder:{tmp_path / 'nowhere'}"
  with pytest.raises(FileNotFoundError, match="subfolder of images per class"):
    options.check_files(config)


def test_analysis_config_merges_defaults_and_replaces_dicts():
  config = ml_collections.ConfigDict({"cka_intra": {"repeats": 3,
                                                    "layers_per_model": {"vit": "coarse"}}})
  merged = options.analysis_config(config, "cka_intra")
  assert merged.repeats == 3 and merged.num_examples == 10240  # the paper's default
  assert dict(merged.layers_per_model) == {"vit": "coarse"}
  assert options.analysis_config(ml_collections.ConfigDict(), "probe").kind == "fewshot"


def test_cli_list_options_and_config_arguments(monkeypatch):
  path = os.path.join(REPO, "configs", "cka_intra.py")

  def parse(arg, *overrides):
    argv = ["prog", f"--config={path}:{arg}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    fv(argv)
    return fv.config

  config = parse("smoke", "--config.cka_intra.layers=block*/+sa,block??",
                 "--config.cka_intra.models=vit")
  from vit_analysis.similarity import representations
  assert representations.layer_spec(config.cka_intra.layers) == ("block*/+sa", "block??")
  assert representations.layer_spec("coarse") == "coarse"
  assert config_lib.names(config.cka_intra.models) == ("vit",)
  with pytest.raises(Exception, match="unknown config argument 'ful'.*did you mean 'full'"):
    parse("ful,ckpt_dir=/x")


def test_cli_smoke_run(tmp_path, model_cache):
  workdir = tmp_path / "cli"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "vit_analysis.main", "--config=configs/train_digits.py:smoke,model=vit",
       f"--workdir={workdir}", f"--config.model_cache={model_cache}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summaries = _read_json(workdir / "models.json")
  assert [s["name"] for s in summaries] == ["ViT-smoke_8"]
  assert os.path.exists(workdir / "report.html")
