r"""Fine-tunes an official ImageNet-21k checkpoint on CIFAR-10 or ImageNet (TPU VM recipe).

  gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .
  python -m vit_analysis.main --config=configs/finetune.py:checkpoint=ViT-B_16.npz \
      --workdir=$HOME/ft_cifar10
  python -m vit_analysis.main \
      --config=configs/finetune.py:dataset=imagenet2012,model=ViT-B_32,checkpoint=ViT-B_32.npz \
      --workdir=$HOME/ft_imagenet

The recipe is vit_jax's: SGD with momentum 0.9, no weight decay, gradient clipping at global norm
1, linear warmup then cosine decay, batch 512, fine-tuned at 384 px (the position embedding is
resized on load; a zero head replaces the 21k head and the pre_logits layer is dropped). Data
come from `tfds.data_source` (prepare them once with `tfds build`). Multi-host pod slices join
automatically (VIT_ANALYSIS_DISTRIBUTED=1 or the JAX_COORDINATOR_* environment).

`:smoke` fine-tunes a tiny ViT from an "upstream" npz with a 100-class head, a pre_logits layer
and a 2x2 position grid (random weights; the run writes it into its model cache,
`config_lib.synthetic_checkpoint`) on the digits at 32 px: it exercises the same head
replacement, pre_logits drop and pos-emb resize.
"""
from vit_analysis import config_lib

# (tfds name, test split, classes, steps, warmup) as in vit_jax configs/common.py.
_DATASETS = {
    "cifar10": ("test", 10, 10_000, 500),
    "cifar100": ("test", 100, 10_000, 500),
    "imagenet2012": ("validation", 1000, 20_000, 500),
}


def get_config(arg=None):
  flags = config_lib.parse_arg(arg, ("dataset", "model", "checkpoint", "image_size", "data_dir"))
  config = config_lib.base_config(flags)
  del config.models["resnet"]
  if flags.smoke:
    config.models.vit = config_lib.finetune_model(
        "ViT-smoke_8", config_lib.synthetic_checkpoint(
            "ViT-smoke_8", num_classes=100, representation_size=32, image_size=16), 10,
        num_steps=6, optimizer="sgd",
        learning_rate=0.03, weight_decay=0.0)
    config.description = "smoke fine-tuning of a tiny upstream npz on the digits"
    return config
  dataset = flags.get("dataset", "cifar10")
  if dataset not in _DATASETS:
    raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(_DATASETS)}")
  test_split, num_classes, steps, warmup = _DATASETS[dataset]
  image_size = int(flags.get("image_size", 384))
  config.data = config_lib.tfds_data(dataset, image_size, test_split=test_split,
                                     data_dir=flags.get("data_dir", ""))
  model = flags.get("model", "ViT-B_16")
  config.models.vit = config_lib.finetune_model(
      model, flags.get("checkpoint", f"{model}.npz"), num_classes,
      optimizer="sgd", learning_rate=0.03, momentum=0.9, weight_decay=0.0, grad_clip_norm=1.0,
      augment_flip=True, num_steps=steps, warmup_steps=warmup, batch_size=512, eval_batch_size=512,
      checkpoint_every_steps=1000, log_every_steps=50)
  config.description = f"{model} (ImageNet-21k) fine-tuned on {dataset} at {image_size} px"
  return config
