r"""The one-command offline demo: every analysis of the paper on two small digits models.

  python -m vit_analysis.main --config=configs/demo.py --workdir=runs/demo
  python -m vit_analysis.main --config=configs/demo.py:smoke --workdir=/tmp/demo_smoke

Trains (or reuses from `<workdir>/models`) a small ViT (CLS token), its GAP twin and a small BiT
ResNet on the 5,000 embedded MNIST digits (DEMO_MODELS), then runs intra/cross-model CKA, head
subsets, localisation, attention distance, receptive fields, skip norms, skip removal, dataset
scale and the layer-wise probes at demo size, and writes `<workdir>/report.html`. Offline, 7-9
minutes on 2 CPU cores. Each analysis' sub-config is taken from its own file in this folder (the
one place its options are documented), then shrunk to demo size here.
"""
import importlib.util
import os

from vit_analysis import config_lib

# Analysis name -> the config file that defines its sub-config, in report order.
_ANALYSES = {
    "cka_intra": "cka_intra.py",
    "cka_cross": "cka_cross.py",
    "attention_distance": "attention_distance.py",
    "head_subsets": "head_subsets.py",
    "receptive_field": "receptive_field.py",
    "skip_norms": "skip_norms.py",
    "localization": "localization.py",
    "probe": "probe_digits.py",
    "skip_removal": "skip_removal.py",
    "dataset_scale": "dataset_scale.py",
}

# key -> (registry name, create_model overrides, train keys on top of the family recipe).
# The ViT is train_digits.py's, trained for 20 epochs instead of 50 (~96% instead of 97%). The
# ResNet keeps R-demo's full-resolution small stem, so its last stage still has the 4x4 grid
# that localisation and per-token probes read (train_digits.py's BiT-stem ResNet ends at 1x1),
# and has one unit per stage at width 8 to stay within the budget. Its SGD at 0.5 needs global-norm
# clipping at 1 and label smoothing 0.1: without them it stalled at the peak learning rate on some
# seeds (90.4 / 96.7 / 95.8% for seeds 0 / 1 / 2 on one 2-core machine, and 95.6% for seed 0 on
# another); with them 97.6 / 97.8 / 97.9% at the same cost (~155 CPU-seconds).
_SMALL_VIT = {"patch_size": 8, "hidden_size": 64, "num_layers": 4, "mlp_dim": 128}
_VIT_TRAIN = {"num_epochs": 20, "learning_rate": 2e-3}
DEMO_MODELS = {
    "vit": ("ViT-demo_4", _SMALL_VIT, _VIT_TRAIN),
    "vit_gap": ("ViT-demo_4-gap", _SMALL_VIT, _VIT_TRAIN),
    "resnet": ("R-demo", {"width": 8, "num_groups": 4, "block_units": (1, 1, 1, 1)},
               {"optimizer": "sgd", "learning_rate": 0.5, "weight_decay": 0.0,
                "grad_clip_norm": 1.0, "label_smoothing": 0.1, "augment_shift": 1,
                "num_epochs": 6}),
}

# Demo sizes (examples, minibatch size, repeats, images): minutes on 2 CPU cores in total.
_DEMO_SIZES = {
    "cka_intra": dict(num_examples=512, minibatch_size=128, repeats=2),
    # Every similarity measure and a shuffle null on the cross-model comparison. Procrustes of
    # the rank-32 PCA approximations (pair cost 32^3 instead of 128^3; docs/method.md): the
    # full-rank SVDs of 26 x 34 layer pairs x (1 + 4 permutations) double the demo's time on CPU.
    "cka_cross": dict(num_examples=512, minibatch_size=128, repeats=2,
                      measures=("linear_cka", "rbf_cka", "procrustes", "mutual_knn"),
                      measure_options={"procrustes": {"max_rank": 32}}, null_permutations=4),
    "attention_distance": dict(num_images=500),
    "head_subsets": dict(distance_examples=500, num_examples=512, minibatch_size=128, repeats=2),
    # One pull-back per layer: per-channel ERFs cost one backward pass per channel (CPU minutes).
    "receptive_field": dict(num_images=16, per_channel=False),
    "skip_norms": dict(num_images=500),
    "localization": dict(num_examples=512, minibatch_size=128, repeats=1),
    # The demo ResNet has one unit per stage, so per-token probes read unit01s.
    "probe": dict(token_layers={"ViT": ("block??",), "R": ("block?/unit01",)}),
    "skip_removal": dict(blocks=(2,), num_examples=512, minibatch_size=128, repeats=1),
    "dataset_scale": dict(fractions=(0.1,), same_steps=False,
                          finetune={"parity": dict(data="digits:parity")},
                          finetune_train=dict(num_steps=60, learning_rate=3e-4, warmup_steps=6),
                          num_examples=512, minibatch_size=128, repeats=1),
}


def _load(filename: str, arg):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
  spec = importlib.util.spec_from_file_location(f"_vit_analysis_config_{filename[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ())
  config = config_lib.base_config(flags)
  config.models = {}
  for key, (name, overrides, train) in DEMO_MODELS.items():
    config.models[key] = (config_lib.digits_model(key, name, smoke=True) if flags.smoke else
                          config_lib.digits_model(key, name, overrides=overrides, **train))
  config.analyses = tuple(_ANALYSES)
  for name, filename in _ANALYSES.items():
    sub = _load(filename, "smoke" if flags.smoke else None)[name]
    if not flags.smoke:
      for key, value in _DEMO_SIZES[name].items():
        sub[key] = value  # assignment, not update(): update() merges into dict-valued fields
    elif name == "cka_cross":  # the smoke run (and its multi-process test) covers every measure
      sub.measures = _DEMO_SIZES[name]["measures"]
      sub.null_permutations = 2
    config[name] = sub
  config.description = ("Offline demo: a small ViT (CLS), its GAP twin and a small BiT ResNet "
                        "trained on the embedded digits; every analysis at demo size.")
  return config
