r"""Cost of capturing representations: jitted forward with vs without the block outputs.

For each model, three jitted functions of (variables, images), timed side by side:
  forward : logits only.
  blocks  : logits + every block output ('block??' for ViT/Mixer, 'block?/unit??' for ResNet),
            returned as device arrays (what a caller of `capture` gets).
  grams   : logits + the [b, b] Gram x @ x.T of every block output, computed inside the same jit
            via `make_capture_fn(..., reduce=gram)`, so only the Grams leave (the CKA path).
The ratios blocks/forward and grams/forward are printed; the target is <= 1.25x.

  python benchmarks/capture_overhead.py                      # ViT-Ti_16 and R26x1, 224 px, b=64
  python benchmarks/capture_overhead.py --batch=16 --repeats=3
  python benchmarks/capture_overhead.py --models=ViT-smoke_8 --image_size=32
  python benchmarks/capture_overhead.py --smoke   # seconds: ViT-smoke_8 and R-smoke, 32 px, b=4
"""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vit_analysis.models import capture, create_model

_MODELS = flags.DEFINE_list('models', ['ViT-Ti_16', 'R26x1'], 'Registry names.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Input resolution.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per variant (median reported).')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Seconds, every path (tests/test_benchmarks.py): '
                           'ViT-smoke_8 and R-smoke at 32 px, batch 4, 1 repeat.')


def gram(x: jax.Array) -> jax.Array:
  """x: [b, ...] -> [b, b] linear Gram of the flattened features."""
  f = jnp.reshape(x, (x.shape[0], -1))
  return f @ f.T


def _random_variables(model, images):
  """Random params in the model's structure (timing does not depend on trained values)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), shapes)


def _block_pattern(names: list[str]) -> str:
  for pattern in ('block??', 'block?/unit??'):
    try:
      capture.select(names, pattern)
      return pattern
    except KeyError:
      pass
  raise ValueError(f'no block outputs among {names[:5]}...')


def bench_model(name: str, image_size: int, batch: int, repeats: int) -> dict[str, float]:
  """Median seconds per call of the three variants; compile time excluded."""
  model = create_model(name, 1000)
  images = jax.random.uniform(jax.random.key(1), (batch, image_size, image_size, 3),
                              minval=-1, maxval=1)
  variables = _random_variables(model, images)
  pattern = _block_pattern(capture.layer_names(model, images.shape))
  n_blocks = len(capture.select(capture.layer_names(model, images.shape), pattern))
  blocks_fn = capture.make_capture_fn(model, [pattern, 'logits'])
  grams_fn = capture.make_capture_fn(model, pattern, reduce=gram)
  fns = {
      'forward': jax.jit(lambda v, x: model.apply(v, x, train=False)[0]),
      'blocks': jax.jit(blocks_fn),
      'grams': jax.jit(lambda v, x: (model.apply(v, x, train=False)[0], grams_fn(v, x))),
  }
  for label, fn in fns.items():  # Compile and warm up.
    t = time.perf_counter()
    jax.block_until_ready(fn(variables, images))
    print(f'  {name} {label}: compile+first call {time.perf_counter() - t:.1f} s', flush=True)
  times = {label: [] for label in fns}
  for _ in range(repeats):  # Interleaved, so that load changes hit every variant alike.
    for label, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(variables, images))
      times[label].append(time.perf_counter() - t)
  medians = {label: statistics.median(ts) for label, ts in times.items()}
  plan = capture.plan_bytes(model, images.shape, batch, pattern)
  print(f'{name}: {n_blocks} block outputs, {sum(plan.values()) / 2**20:.0f} MiB captured '
        f'per batch of {batch} at {image_size} px', flush=True)
  return medians


def main(argv):
  del argv
  models, image_size, batch, repeats = (
      _MODELS.value, _IMAGE_SIZE.value, _BATCH.value, _REPEATS.value)
  if _SMOKE.value:  # One ViT-like and one ResNet: both block patterns.
    models, image_size, batch, repeats = ['ViT-smoke_8', 'R-smoke'], 32, 4, 1
  print(f'jax {jax.__version__}, devices {jax.devices()}')
  rows = []
  for name in models:
    m = bench_model(name, image_size, batch, repeats)
    rows.append((name, m))
  print(f'\n{"model":<14}{"forward s":>11}{"blocks s":>10}{"grams s":>10}'
        f'{"blocks/fwd":>12}{"grams/fwd":>11}')
  for name, m in rows:
    print(f'{name:<14}{m["forward"]:>11.3f}{m["blocks"]:>10.3f}{m["grams"]:>10.3f}'
          f'{m["blocks"] / m["forward"]:>11.2f}x{m["grams"] / m["forward"]:>10.2f}x')
  print('target: <= 1.25x')


if __name__ == '__main__':
  app.run(main)
