"""`checkpoints.check_file`: a checkpoint checked before a run from its headers (issue #26).

The check must say what the loader would say (the same mapping and message) without reading the
arrays: the npz tests count the bytes read from the zip members, the safetensors tests make
every way of reading tensor data fail.
"""
import zipfile

import flax
import numpy as np
import pytest
import safetensors.numpy
from etils import epath

# Independent key lists of the three layouts (tests/ is on sys.path under pytest).
from test_checkpoints import SMOKE_VIT, random_file, vit_keys, write
from test_checkpoints_big_vision import _model as bv_model
from test_checkpoints_big_vision import bv_params, scan
from test_checkpoints_timm import TINY, timm_state

from vit_analysis.models import checkpoints, create_model


@pytest.fixture
def member_bytes_read(monkeypatch):
  """A list whose sum is every byte read from a zip member (npz arrays are zip members)."""
  counted, read = [], zipfile.ZipExtFile.read

  def counting_read(self, n=-1):
    data = read(self, n)
    counted.append(len(data))
    return data

  monkeypatch.setattr(zipfile.ZipExtFile, 'read', counting_read)
  return counted


def _message(fn, *args, **kwargs):
  with pytest.raises(ValueError) as e:
    fn(*args, **kwargs)
  return str(e.value)


def test_npz_is_checked_from_headers_with_the_loaders_mapping(tmp_path, member_bytes_read):
  # An ImageNet-21k style export: prefix, pre_logits, 1000 classes, 8x8 grid (64 px).
  arrays = random_file(vit_keys(**SMOKE_VIT, grid=8, num_classes=1000, rep=16))
  path = write(tmp_path, 'vit.npz', arrays, prefix='opt/target/')
  data_bytes = sum(a.nbytes for a in arrays.values())
  model = create_model('ViT-smoke_8', 5)  # 32 px: the position embedding is resized
  options = dict(fresh_head=True, drop_pre_logits=True)
  checkpoints.check_file(path, model, image_size=32, **options)
  assert 0 < sum(member_bytes_read) < 0.05 * data_bytes  # the .npy headers only
  member_bytes_read.clear()
  checkpoints.load_file(path, model, image_size=32, **options)
  assert sum(member_bytes_read) >= data_bytes  # what the counter sees when arrays are read
  # Without the options: the loader's every-mismatch message, word for word.
  message = _message(checkpoints.check_file, path, model, image_size=32)
  assert message == _message(checkpoints.load_file, path, model, image_size=32)
  assert 'representation_size=16' in message and 'num_classes=1000' in message
  # Refusing the resize is checked as the loader does.
  assert 'resize_posemb_ok=True' in _message(checkpoints.check_file, path, model,
                                             resize_posemb_ok=False, **options)


def test_big_vision_layouts_are_checked_from_headers(tmp_path, member_bytes_read):
  rng = np.random.default_rng(0)
  flat = {f'params/img/{k}': v for k, v in scan(bv_params(rng, pool='map')).items()}
  np.savez(tmp_path / 'siglip.npz', **flat)
  checkpoints.check_file(tmp_path / 'siglip.npz', bv_model('map'))
  assert sum(member_bytes_read) < 0.05 * sum(a.nbytes for a in flat.values())
  tok = bv_model('tok')  # a file of another pooling: the loader's message
  assert (_message(checkpoints.check_file, tmp_path / 'siglip.npz', tok)
          == _message(checkpoints.load_file, tmp_path / 'siglip.npz', tok))


def test_broken_npz_files_are_refused_like_the_loader_does(tmp_path):
  model = create_model('ViT-smoke_8', 7)
  good = write(tmp_path, 'good.npz', random_file(vit_keys(**SMOKE_VIT, grid=4, num_classes=7)))
  data = epath.Path(good).read_bytes()
  (tmp_path / 'cut.npz').write_bytes(data[:len(data) // 2])  # the zip directory is at the end
  with zipfile.ZipFile(tmp_path / 'short.npz', 'w') as z:  # a member shorter than its header
    with z.open('cls.npy', 'w') as f:
      np.lib.format.write_array_header_1_0(
          f, {'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 32)})
      f.write(np.zeros(31, np.float32).tobytes())
  np.save(tmp_path / 'single.npz', np.zeros(3))  # np.save writes .npy whatever the name
  (tmp_path / 'single.npz.npy').rename(tmp_path / 'single.npz')
  for name, why in [('cut.npz', 'a zip that numpy cannot read as arrays'),
                    ('short.npz', 'cls.npy holds 252 bytes, its header (float32 (1, 1, 32)) '
                                  '256: the file is truncated or corrupt'),
                    ('single.npz', 'it is a single .npy array')]:
    message = _message(checkpoints.check_file, tmp_path / name, model)
    assert message.startswith(f"{tmp_path / name} is not an .npz checkpoint") and why in message
    _message(checkpoints.load_file, tmp_path / name, model)  # the loader refuses it too


def test_safetensors_are_checked_from_the_json_header(tmp_path, monkeypatch):
  sd = timm_state(np.random.default_rng(0), grid_tokens=64, classes=1000)  # 64 px, 1000 classes
  path = tmp_path / 'timm.safetensors'
  safetensors.numpy.save_file(sd, str(path))
  model = create_model('timm:vit_base_patch16_224', 5, **TINY, patch_size=8, image_size=32)
  message = _message(checkpoints.load_file, path, model)
  assert 'num_classes=1000 or fresh_head=True' in message

  def refuse(*args, **kwargs):
    raise AssertionError('tensor data read')

  with monkeypatch.context() as m:
    m.setattr(safetensors.numpy, 'load', refuse)
    m.setattr(type(epath.Path(path)), 'read_bytes', refuse)
    checkpoints.check_file(path, model, fresh_head=True)  # resized grid, zero head: fits
    assert _message(checkpoints.check_file, path, model) == message
    with pytest.raises(AssertionError, match='tensor data read'):  # the loader's own reads
      checkpoints.load_file(path, model, fresh_head=True)
  data = path.read_bytes()
  (tmp_path / 'cut.safetensors').write_bytes(data[:-100])
  (tmp_path / 'text.safetensors').write_text('{"a": 1}')
  assert 'truncated or corrupt' in _message(checkpoints.check_file,
                                            tmp_path / 'cut.safetensors', model)
  assert 'no JSON header); it is text' in _message(checkpoints.check_file,
                                                   tmp_path / 'text.safetensors', model)
  for name in ('cut', 'text'):
    _message(checkpoints.load_file, tmp_path / f'{name}.safetensors', model)


def test_msgpack_is_read_whole_and_checked_like_npz(tmp_path):
  arrays = random_file(vit_keys(**SMOKE_VIT, grid=4, num_classes=7))
  arrays['embedding/bias'] = np.zeros(31, np.float32)
  path = tmp_path / 'vit.msgpack'
  path.write_bytes(flax.serialization.msgpack_serialize(
      {'params': flax.traverse_util.unflatten_dict(arrays, sep='/')}))
  model = create_model('ViT-smoke_8', 7)
  message = _message(checkpoints.check_file, path, model)
  assert 'embedding/bias: file (31,) vs model (32,)' in message
  assert message == _message(checkpoints.load_file, path, model)
