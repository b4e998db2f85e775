r"""Pre-training data scale (paper Fig 12) and fine-tuning (Fig G.1): per-block CKA.

Offline (digits): ViT-demo_4 trained on all 4,000 training digits is the reference; copies are
trained on nested class-balanced 3/10/30 % subsets with the same number of steps, and fine-tuned
on two digit tasks (inverted images; parity labels with a new 2-way head). All training runs go
through vit_analysis.models.train and are cached under <workdir>/dataset_scale/.
  python -m vit_analysis.main --config=configs/dataset_scale.py --workdir=/tmp/dataset_scale
  python -m vit_analysis.main --config=configs/dataset_scale.py:smoke --workdir=/tmp/ds_smoke
Full size (TPU VM; Fig G.1 with the official ViT-B/16 ImageNet-21k checkpoint fine-tuned on TFDS
tasks at 224 px; Fig 12 additionally needs from-scratch training on subsets: add
fractions=(0.03, 0.1, 0.3) and a from-scratch reference, docs/method.md#dataset-scale-and-fine-tuning):
  python -m vit_analysis.main --config=configs/dataset_scale.py:full,ckpt_dir=$CKPT \
      --workdir=$WORKDIR
Fig 12 as a sweep (digits): two ViT sizes x the 3/10/30 % subsets, one point each, the
reference models shared through the sweep's model cache:
  python -m vit_analysis.sweep --config=configs/dataset_scale.py --workdir=/tmp/fig12
"""
import ml_collections

from vit_analysis import analyses, config_lib


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("full", "ckpt_dir"))
  config = config_lib.base_config(flags)
  del config.models["resnet"]
  config.analyses = ("dataset_scale",)
  config.dataset_scale = analyses.default_config("dataset_scale")  # options and paper defaults
  # Offline fine-tuning tasks on the digits (stand-ins for the paper's datasets).
  config.dataset_scale.finetune = ml_collections.ConfigDict({
      "inverted": dict(data="digits:inverted"), "parity": dict(data="digits:parity")})
  config.dataset_scale.finetune_train = ml_collections.ConfigDict(
      dict(num_steps=150, learning_rate=3e-4, warmup_steps=10))
  config.dataset_scale.update(dict(num_examples=768, minibatch_size=128, repeats=3))
  if flags.smoke:
    # Nested dicts are replaced, not merged (ConfigDict.update would merge them).
    config.dataset_scale.finetune = ml_collections.ConfigDict(
        {"parity": dict(data="digits:parity")})
    config.dataset_scale.finetune_train = ml_collections.ConfigDict(
        dict(num_steps=4, warmup_steps=1))
    config.dataset_scale.update(dict(fractions=(0.1,), num_examples=64, minibatch_size=16,
                                     repeats=1))
  if flags.get("full", False):
    ckpt = flags.get("ckpt_dir", "checkpoints")
    config.data = config_lib.tfds_data("imagenet2012", 224, test_split="validation")
    config.models = ml_collections.ConfigDict(dict(
        vit=config_lib.official_model("ViT-B_16", f"{ckpt}/ViT-B_16.npz", 21843)))
    tasks = {name: dict(data=f"tfds:{name}", test_split=split) for name, split in (
        ("cifar10", "test"), ("cifar100", "test"), ("oxford_iiit_pet", "test"),
        ("oxford_flowers102", "test"), ("resisc45", "train[90%:]"),
        ("diabetic_retinopathy_detection/btgraham-300", "validation"))}
    tasks["retinopathy"] = tasks.pop("diabetic_retinopathy_detection/btgraham-300")
    tasks["resisc45"]["train_split"] = "train[:90%]"  # resisc45 has a train split only
    config.dataset_scale.finetune = ml_collections.ConfigDict(tasks)
    config.dataset_scale.finetune_train = ml_collections.ConfigDict(dict(
        optimizer="sgd", learning_rate=0.01, num_steps=10_000, warmup_steps=500,
        batch_size=512, grad_clip_norm=1.0))
    config.dataset_scale.update(dict(fractions=(), num_examples=10240, minibatch_size=1024,
                                     repeats=20))
  return config


def get_hyper(hyper, arg=None):
  """Fig 12's data-scale sweep: model size x data fraction, one subset model per point.

  Fine-tuning (Fig G.1) is left out of these points. `:smoke` sweeps two fractions of the tiny
  ViT. At `:full` the subset models would need a from-scratch ImageNet reference, which this
  config does not define (module docstring), so there is no full-size sweep.
  """
  flags = config_lib.parse_arg(arg, ("full", "ckpt_dir"))
  if flags.get("full", False):
    raise ValueError("configs/dataset_scale.py:full has no Fig 12 sweep: the subset models "
                     "need a from-scratch reference trained on ImageNet (see the docstring)")
  names = ("ViT-smoke_8",) if flags.smoke else ("ViT-demo_4", "ViT-Ti_4")
  fractions = ((0.1,), (0.3,)) if flags.smoke else ((0.03,), (0.1,), (0.3,))
  return hyper.product([
      hyper.sweep("config.models.vit.name", names),
      hyper.sweep("config.dataset_scale.fractions", fractions),
      hyper.fixed("config.dataset_scale.finetune", {}),
  ])
