"""A user's own Flax module named in a config (`module='package.path:ClassName'`) runs the
representation analyses through method interception, with its weights from a msgpack file."""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis import analyses, config_lib, main


def test_user_module_entry_runs_cka_and_names_what_attention_needs(tmp_path):
  from helpers import TinyNet
  params = jax.jit(TinyNet().init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  path = tmp_path / "tiny.msgpack"
  path.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(params)))
  config = config_lib.base_config("smoke")
  config.models = {"net": config_lib.user_model("TinyNet", "helpers:TinyNet", str(path))}
  config.analyses = ("cka_intra",)
  config.cka_intra = analyses.default_config("cka_intra")
  config.cka_intra.update(dict(layers="Conv_0,Dense_0,head", num_examples=32, minibatch_size=8,
                               repeats=1, figure_formats=("png",)))
  config.model_cache = str(tmp_path / "cache")
  main.run(config, str(tmp_path / "run"))
  saved = np.load(tmp_path / "run" / "results" / "cka_intra_net.npz")
  assert list(saved["names_a"]) == ["Conv_0", "Dense_0", "head"]
  np.testing.assert_allclose(np.diag(saved["mean"]), 1.0, atol=1e-5)
  assert np.all(np.abs(saved["mean"]) <= 1 + 1e-5)
  # Presets and attention analyses need facts a foreign module does not expose: said plainly.
  config.cka_intra.layers = "fine"
  config.overwrite = True
  with pytest.raises(KeyError, match="no layer presets; give glob patterns"):
    main.run(config, str(tmp_path / "run"))
  config.analyses = ("attention_distance",)
  config.attention_distance = analyses.default_config("attention_distance")
  with pytest.raises(ValueError, match="needs a ViT"):
    main.run(config, str(tmp_path / "run2"))
  config.models.net.module = "helpers:NoSuchNet"
  with pytest.raises(ValueError, match="cannot be imported"):
    main.run(config, str(tmp_path / "run3"))
  assert not os.path.exists(tmp_path / "run3" / "results")
