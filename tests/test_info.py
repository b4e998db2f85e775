"""models.describe: the one description of a model, checked against each family's layout."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from vit_analysis import models
from vit_analysis.models import ModelInfo, capture, create_model, describe
from vit_analysis.models.info import to_model_input

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize('name, size, expected', [
    ('ViT-B_16', 224, ModelInfo('vit', True, 1, 16, (14, 14), 12, 12, True, 'vit')),
    ('ViT-B_32-gap', 384, ModelInfo('vit', False, 0, 32, (12, 12), 12, 12, True, 'vit')),
    ('ViT-smoke_8', 32, ModelInfo('vit', True, 1, 8, (4, 4), 2, 2, True, 'vit')),
    ('R50+ViT-B_16', 224, ModelInfo('hybrid', True, 1, 16, (14, 14), 12, 12, True, 'hybrid')),
    ('Mixer-B_16', 224, ModelInfo('mixer', False, 0, 16, (14, 14), 12, None, False, 'mixer')),
    ('R50x1', 224, ModelInfo('resnet', False, 0, None, (7, 7), 16, None, False, 'resnet')),
    ('R50x1', 225, ModelInfo('resnet', False, 0, None, (8, 8), 16, None, False, 'resnet')),
    ('R-smoke', 32, ModelInfo('resnet', False, 0, None, (4, 4), 4, None, False, 'resnet')),
])
def test_describe_registered_families(name, size, expected):
  assert describe(create_model(name, 10), size) == expected


def test_describe_agrees_with_the_traced_layers():
  # The grid and prefix count are those of the actual token / feature arrays.
  for name, size, layer in [('ViT-smoke_8', 32, 'block00'), ('ViT-smoke_8-gap', 32, 'block00'),
                            ('Mixer-smoke_8', 32, 'block00'), ('R-smoke', 32, 'block4/unit01'),
                            ('R26x1', 64, 'block4/unit02')]:
    model = create_model(name, 10)
    info = describe(model, size)
    shape = capture.layer_shapes(model, (size, size, 3))[layer].shape
    if info.family == 'resnet':
      assert shape[1:3] == info.grid, name
    else:
      assert shape[1] == info.num_tokens, name


def test_describe_options_and_defaults():
  model = create_model('ViT-smoke_8', 10, num_registers=4, classifier='gap', class_token=True,
                       normalization=IMAGENET)
  info = describe(model)  # image_size from the module (32)
  assert (info.has_cls, info.num_prefix_tokens, info.grid) == (True, 5, (4, 4))
  assert info.normalization == IMAGENET
  # (0.5, 0.5) standardisation is the [-1, 1] range and is reported as such.
  half = ((0.5,) * 3, (0.5,) * 3)
  assert describe(create_model('ViT-smoke_8', 10, normalization=half)).normalization == (
      'minus_one_one')
  assert describe(create_model('ViT-smoke_8', 10)).normalization == 'minus_one_one'
  with pytest.raises(ValueError, match='normalization'):
    describe(create_model('ViT-smoke_8', 10, normalization=(0.5, 0.5)))
  with pytest.raises(ValueError, match='not divisible'):
    describe(create_model('ViT-smoke_8', 10), 36)


class _Foreign(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_describe_foreign_module():
  info = describe(_Foreign(), 8)
  assert info == ModelInfo('other', False, 0, None, None, 0, None, False, 'other')
  assert models.describe is describe


def test_to_model_input():
  rng = np.random.default_rng(0)
  pixels = rng.uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)
  x = 2 * pixels - 1
  got = to_model_input(x, IMAGENET)
  mean, std = (np.asarray(v) for v in IMAGENET)
  np.testing.assert_allclose(got, (pixels - mean) / std, rtol=1e-5, atol=1e-5)
  assert got.dtype == np.float32
  assert to_model_input(x, 'minus_one_one') is x
  np.testing.assert_allclose(to_model_input(jnp.asarray(x), IMAGENET), got, atol=1e-6)
