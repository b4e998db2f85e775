"""Checkpoint files on non-local paths (etils.epath) and files that are not what they claim.

The non-local path is `gs://` served from memory: `etils.epath.testing.mock_epath` replaces
epath's backends, so the reading code runs exactly as on a TPU VM without any network.
"""
import io
import pickle
import zipfile

import flax
import numpy as np
import pytest
import safetensors.numpy
from etils import epath
from etils.epath import testing as epath_testing

from vit_analysis.models import checkpoints, create_model


@pytest.fixture
def gcs():
  """An in-memory `gs://` file system: {path: bytes}."""
  files: dict[str, bytes] = {}

  def _open(_, path, mode='r'):
    path = str(path)
    if 'w' in mode:
      buf = io.BytesIO()
      buf.close = lambda: files.__setitem__(path, buf.getvalue())
      return buf
    if path not in files:
      raise FileNotFoundError(path)
    return io.BytesIO(files[path])

  with epath_testing.mock_epath(open=_open, exists=lambda _, path: str(path) in files):
    yield files


def _smoke():
  model = create_model('ViT-smoke_8', 10)
  shapes = checkpoints.param_shapes(model)
  rng = np.random.default_rng(0)
  flat = {k: rng.normal(0, 0.1, s.shape).astype(np.float32) for k, s in shapes.items()}
  return model, flat


def test_npz_msgpack_and_safetensors_from_gs(gcs):
  model, flat = _smoke()
  buf = io.BytesIO()
  np.savez(buf, **flat)
  gcs['gs://bucket/vit.npz'] = buf.getvalue()
  tree = {'params': flax.traverse_util.unflatten_dict(flat, sep='/')}
  gcs['gs://bucket/vit.msgpack'] = flax.serialization.msgpack_serialize(tree)
  for path, load in [('gs://bucket/vit.npz', checkpoints.load_npz),
                     ('gs://bucket/vit.msgpack', checkpoints.load_msgpack)]:
    got = flax.traverse_util.flatten_dict(load(path, model)['params'], sep='/')
    assert set(got) == set(flat), path
    for k, v in flat.items():
      np.testing.assert_array_equal(got[k], v, err_msg=f'{path} {k}')
  timm = create_model('timm:vit_base_patch16_224', 0, hidden_size=32, num_layers=1, num_heads=2,
                      mlp_dim=64, patch_size=8, image_size=16)
  sd = {'patch_embed.proj.weight': np.ones((32, 3, 8, 8), np.float32),
        'patch_embed.proj.bias': np.zeros(32, np.float32),
        'cls_token': np.zeros((1, 1, 32), np.float32),
        'pos_embed': np.zeros((1, 5, 32), np.float32),
        'norm.weight': np.ones(32, np.float32), 'norm.bias': np.zeros(32, np.float32)}
  for n in ('norm1', 'norm2'):
    sd.update({f'blocks.0.{n}.weight': np.ones(32, np.float32),
               f'blocks.0.{n}.bias': np.zeros(32, np.float32)})
  for n, shape in [('attn.qkv', (96, 32)), ('attn.proj', (32, 32)), ('mlp.fc1', (64, 32)),
                   ('mlp.fc2', (32, 64))]:
    sd.update({f'blocks.0.{n}.weight': np.zeros(shape, np.float32),
               f'blocks.0.{n}.bias': np.zeros(shape[0], np.float32)})
  gcs['gs://bucket/timm.safetensors'] = safetensors.numpy.save(sd)
  v = checkpoints.load_safetensors('gs://bucket/timm.safetensors', timm)
  np.testing.assert_array_equal(v['params']['embedding']['kernel'], np.ones((8, 8, 3, 32)))
  assert epath.Path('gs://bucket/vit.npz').exists()


def test_missing_file_on_gs(gcs):
  model, _ = _smoke()
  with pytest.raises(FileNotFoundError, match='gs://bucket/none.npz'):
    checkpoints.load_npz('gs://bucket/none.npz', model)


def _write(tmp_path, name, data):
  path = tmp_path / name
  path.write_bytes(data)
  return path


def test_files_that_are_not_npz_say_what_they_are(tmp_path):
  model, flat = _smoke()
  pickled = _write(tmp_path, 'a.npz', pickle.dumps({'a': np.zeros(3)}, protocol=4))
  npy = io.BytesIO()
  np.save(npy, np.zeros(3))
  cases = {
      pickled: 'pickle',
      _write(tmp_path, 'b.npz', safetensors.numpy.save({'x': np.zeros(2, np.float32)})):
          'load_safetensors',
      _write(tmp_path, 'c.npz', npy.getvalue()): 'single .npy array',
      _write(tmp_path, 'd.npz', b''): 'empty',
      _write(tmp_path, 'e.npz', b'{"not": "weights"}'): 'text',
      _write(tmp_path, 'f.npz', b'PK\x03\x04 truncated zip'): 'cannot read',
  }
  torch_like = io.BytesIO()
  with zipfile.ZipFile(torch_like, 'w') as z:
    z.writestr('archive/data.pkl', b'\x80\x02}q\x00.')
    z.writestr('archive/data/0', b'\x00' * 8)
  cases[_write(tmp_path, 'g.pth', torch_like.getvalue())] = 'PyTorch zip'
  for path, words in cases.items():
    for fn in (checkpoints.read_npz, lambda p: checkpoints.load_npz(p, model)):
      with pytest.raises(ValueError) as e:
        fn(path)
      msg = str(e.value)
      assert 'is not an .npz checkpoint' in msg and words in msg, (path, msg)
      assert 'allow_pickle' not in msg
  with pytest.raises(ValueError, match='not a safetensors file'):
    checkpoints.load_safetensors(pickled, create_model('timm:vit_base_patch16_224', 0))
  with pytest.raises(ValueError, match='not a Flax msgpack file'):
    checkpoints.load_msgpack(_write(tmp_path, 'h.msgpack', b'\xc1junk'), model)
  # A real npz still loads, and an ordinary missing file is a FileNotFoundError.
  np.savez(tmp_path / 'ok.npz', **flat)
  assert set(checkpoints.read_npz(tmp_path / 'ok.npz')) == set(flat)
  with pytest.raises(FileNotFoundError, match='not found'):
    checkpoints.read_npz(tmp_path / 'missing.npz')
