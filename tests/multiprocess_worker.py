"""One process of the 2-process runs in tests/test_multiprocess.py.

Usage: python tests/multiprocess_worker.py PORT PROCESS_ID WORKDIR MODEL_CACHE CONFIG_ARG OUT
Joins a 2-process jax.distributed run (2 CPU devices each, gloo collectives), runs
`configs/demo.py:CONFIG_ARG` through `main.run` with the given model cache, then trains a tiny ViT
for a few steps in `OUT/train` and saves its parameters to `OUT/params{PROCESS_ID}.npz`. Process 1
records every file it opens for writing (or replaces) under WORKDIR in `OUT/writes1.json`: only
process 0 may write results.
"""
import builtins
import json
import os
import sys


def main(port: int, process_id: int, workdir: str, cache: str, arg: str, out: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=120)
  import importlib.util  # pylint: disable=g-import-not-at-top

  import flax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  # pylint: disable=g-import-not-at-top
  from vit_analysis import config_lib, models
  from vit_analysis import main as main_lib
  from vit_analysis.input import data
  from vit_analysis.models import train as train_lib
  from vit_analysis.runtime import sharding
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()

  writes = []
  if process_id == 1:
    root = os.path.abspath(workdir)
    real_open, real_replace = builtins.open, os.replace

    def recording_open(file, mode="r", *args, **kwargs):
      if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
        if os.path.abspath(file).startswith(root):
          writes.append(os.fspath(file))
      return real_open(file, mode, *args, **kwargs)

    def recording_replace(src, dst, *args, **kwargs):
      if os.path.abspath(dst).startswith(root):
        writes.append(os.fspath(dst))
      return real_replace(src, dst, *args, **kwargs)

    builtins.open, os.replace = recording_open, recording_replace

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "demo_config", os.path.join(repo, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.model_cache = cache
  main_lib.run(config, workdir)
  if process_id == 1:
    builtins.open, os.replace = real_open, real_replace
    with open(os.path.join(out, "writes1.json"), "w") as f:
      json.dump(writes, f)

  # Training under 2 processes: a few steps of the tiny ViT on the digits.
  module = models.create_model("ViT-smoke_8", 10)
  cfg = train_lib.effective_config(config_lib.train_defaults(True),
                                   {"num_steps": 3, "batch_size": 16})
  outcome = train_lib.train(module, cfg, train_source=data.digits_source("train"),
                            test_source=data.digits_source("test"), image_size=32,
                            mesh=sharding.make_mesh(), workdir=os.path.join(out, "train"),
                            seed=0)
  flat = flax.traverse_util.flatten_dict(jax.device_get(outcome.params), sep="/")
  np.savez(os.path.join(out, f"params{process_id}.npz"), **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:7])
