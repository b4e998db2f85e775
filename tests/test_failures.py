"""Expected failures end plainly: one paragraph on stderr, a non-zero exit status, and nothing
non-finite or half-written left behind (issue #26)."""
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from vit_analysis import analyses, config_lib, main, models, options
from vit_analysis.input import data, streaming
from vit_analysis.models import checkpoints
from vit_analysis.models import train as train_lib
from vit_analysis.runtime import errors, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_VIT = "--config=configs/train_digits.py:smoke,model=vit"


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", errors.TRACEBACK_ENV)}
  return dict(env, JAX_PLATFORMS="cpu", **extra)


def _cli(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, "-m", "vit_analysis.main", *args], cwd=REPO,
                        env=env or _env(), capture_output=True, text=True, timeout=timeout,
                        check=False)


def _ending(e):
  """What the command line prints and returns for `e` (in-process runs)."""
  return errors.plain_ending(e, "test", with_traceback=False)


def _smoke_vit(cache, **train):
  config = config_lib.base_config("smoke")
  del config.models["resnet"]
  config.model_cache = str(cache)
  config.train.update({"num_steps": 4, "log_every_steps": 1, **train})
  return config


def test_diverging_training_stops_at_the_first_non_finite_step(tmp_path):
  cache, workdir = tmp_path / "cache", tmp_path / "run"
  proc = _cli(SMOKE_VIT, f"--workdir={workdir}", f"--config.model_cache={cache}",
              "--config.train.learning_rate=1e12", "--config.train.num_steps=8")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  # Step 3 (warm-up of 2 steps, then the full rate), found between two log lines (every 4).
  assert last.startswith("error: training of model 'vit' diverged at step 3: "), last
  assert "last finite loss" in last and "learning rate is most likely too high" in last
  assert "loss nan" not in proc.stderr and "test accuracy" not in proc.stderr
  (entry,) = os.listdir(cache)
  # Nothing of the diverged model: no summary, no checkpoint, only finite metrics lines.
  assert not os.path.exists(cache / entry / "summary.json")
  assert os.listdir(cache / entry / "ckpt") == []
  metrics = cache / entry / "metrics.jsonl"  # none before the first log line (step 4)
  for line in metrics.read_text().splitlines() if metrics.exists() else []:
    assert all(math.isfinite(v) for v in json.loads(line).values()), line
  assert not os.path.exists(workdir / "models.json")
  assert not os.path.exists(workdir / "report.html")


def _poison(folder):
  """Rewrites the last train state of a model cache entry with NaN parameters."""
  manager = ocp.CheckpointManager(os.path.abspath(folder / "ckpt"))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  state = dict(restored["state"])
  state["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), state["params"])
  manager.delete(step)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(restored["data"])))
  manager.wait_until_finished()
  manager.close()


# orbax's aborted reads of the mismatched arrays end as "exception ignored" coroutines.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_poisoned_model_cache_entry_is_refused_with_its_path(tmp_path, capsys):
  cache = tmp_path / "cache"
  config = _smoke_vit(cache, num_steps=2)
  main.run(config, str(tmp_path / "first"))
  (entry,) = os.listdir(cache)
  # Another architecture in the same folder (e.g. after a code change): refused with the path.
  sources = {k: data.get_source(config.data, k) for k in ("train", "test")}
  with pytest.raises(errors.UserError, match=f"does not fit model 'vit'.*delete the folder "
                     f"{cache / entry} and rerun"):
    train_lib.train(models.create_model("ViT-smoke_8", 7),
                    train_lib.effective_config(config.train, config.models.vit.train),
                    train_source=sources["train"], test_source=sources["test"], image_size=32,
                    mesh=sharding.make_mesh(), workdir=str(cache / entry), seed=0, name="vit")
  _poison(cache / entry)
  with pytest.raises(errors.UserError) as e:
    main.run(config, str(tmp_path / "second"))
  assert _ending(e.value) == 1
  text = capsys.readouterr().err.strip()
  assert "holds non-finite parameters" in text
  assert f"delete the folder {cache / entry}" in text and "Traceback" not in text
  assert os.path.exists(cache / entry)  # left for the user to delete, not silently replaced
  assert not os.path.exists(tmp_path / "second" / "models.json")


def test_unknown_config_override_is_one_line_naming_key_match_and_options(tmp_path):
  workdir = tmp_path / "run"
  proc = _cli("--config=configs/cka_intra.py:smoke", f"--workdir={workdir}",
              "--config.cka_intra.repat=3")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
  assert "unknown config key 'cka_intra.repat' (did you mean 'repeats'?)" in proc.stderr
  assert "'num_examples'" in proc.stderr  # the valid options
  assert not os.path.exists(workdir)
  # --verbosity=1 brings the traceback back.
  proc = _cli("--config=configs/cka_intra.py:smoke", f"--workdir={workdir}",
              "--config.cka_intra.repat=3", "--verbosity=1")
  assert proc.returncode == 2 and "Traceback" in proc.stderr
  assert "did you mean 'repeats'" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("traceback", [False, True])
def test_workdir_that_is_a_file_is_one_sentence(tmp_path, traceback):
  workdir, cache = tmp_path / "notadir", tmp_path / "cache"
  workdir.write_text("mine")
  env = _env(**{errors.TRACEBACK_ENV: "1"}) if traceback else _env()
  proc = _cli(SMOKE_VIT, f"--workdir={workdir}", f"--config.model_cache={cache}", env=env)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: workdir '{workdir}' is a file, not a folder: pass another --workdir or move the "
      "file away")
  assert ("Traceback" in proc.stderr) == traceback
  assert workdir.read_text() == "mine" and not os.path.exists(cache)


def test_invalid_config_leaves_no_config_json(tmp_path):
  workdir = tmp_path / "run"
  config = _smoke_vit(tmp_path / "cache")
  config.models.vit.checkpoint = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError) as e:
    main.run(config, str(workdir))
  assert errors.is_expected(e.value) and _ending(e.value) == 1
  assert not os.path.exists(workdir)


def _official_npz(path, name, image_size, num_classes=10, **shapes):
  """An npz of `name`'s parameters (zeros) in the official layout, with some `shapes` changed."""
  keys = checkpoints.param_shapes(models.create_model(name, num_classes), image_size)
  np.savez(path, **{k: np.zeros(shapes.get(k, s.shape), np.float32) for k, s in keys.items()})
  return path


def test_every_bad_checkpoint_is_reported_before_anything_runs(tmp_path, monkeypatch):
  config = config_lib.base_config("smoke")  # 'resnet' (R-smoke) and 'vit' (ViT-smoke_8)
  config.model_cache = str(tmp_path / "cache")
  config.models.resnet.num_classes = None  # from the data, as `build` takes it
  conv = "resnet/block1/unit01/a/standardized_conv2d/kernel"
  config.models.resnet.checkpoint = str(_official_npz(tmp_path / "resnet.npz", "R-smoke", 32,
                                                      **{conv: (3, 3, 5, 7)}))
  vit = _official_npz(tmp_path / "vit.npz", "ViT-smoke_8", 32)
  vit.write_bytes(vit.read_bytes()[:1000])  # an interrupted download
  config.models.vit.checkpoint = str(vit)
  net = tmp_path / "net.msgpack"  # a user module's params: its head of 3 classes, not 10
  from helpers import TinyNet  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(TinyNet(classes=3).init, jax.random.key(0), np.zeros((1, 32, 32, 3)))
  net.write_bytes(flax.serialization.msgpack_serialize(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])))
  config.models.net = config_lib.user_model("TinyNet", "helpers:TinyNet", str(net))
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: pytest.fail("a model was trained"))
  with pytest.raises(errors.Problems) as e:
    main.run(config, str(tmp_path / "run"))
  assert _ending(e.value) == 1
  assert e.value.problems == [
      f"models.net.checkpoint = '{net}': checkpoint '{net}' does not fit TinyNet: head/bias: "
      "(3,) in the file, (10,) in the module; head/kernel: (16, 3) in the file, (16, 10) in the "
      "module",
      f"models.resnet.checkpoint = '{tmp_path / 'resnet.npz'}': checkpoint does not fit ResNetV2 "
      f"(45 model params, 45 file arrays): shape mismatch (1): {conv}: file (3, 3, 5, 7) vs "
      "model (1, 1, 8, 8)",
      f"models.vit.checkpoint = '{vit}': {vit} is not an .npz checkpoint: expected a zip archive "
      "of .npy arrays with '/'-joined parameter names (numpy.savez; the vit_jax, BiT and "
      "big_vision releases); a zip that numpy cannot read as arrays (File is not a zip file)"]
  assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "cache")
  # Fixed files pass; a file of another image size (resized posemb) and head (fresh_head) too.
  _official_npz(tmp_path / "resnet.npz", "R-smoke", 32)
  _official_npz(vit, "ViT-smoke_8", 64, num_classes=1000)
  assert options.file_problems(config)  # the head: 1000 classes in the file, 10 in the model
  config.models.vit.checkpoint_options = {"fresh_head": True}
  net.write_bytes(b"\x93NUMPY")  # a user module's file that is no msgpack at all
  (problem,) = options.file_problems(config)
  assert str(problem).startswith(f"models.net.checkpoint = '{net}': {net} is not a Flax "
                                 "msgpack file")
  del config.models.net
  assert options.file_problems(config) == []


def test_sigterm_saves_says_how_to_resume_and_the_rerun_finishes(tmp_path, model_cache):
  workdir = tmp_path / "run"
  args = ("--config=configs/cka_intra.py:smoke", f"--workdir={workdir}",
          f"--config.model_cache={model_cache}", "--config.cka_intra.checkpoint_every_s=0")
  proc = subprocess.Popen([sys.executable, "-m", "vit_analysis.main", *args], cwd=REPO,
                          env=_env(), stderr=subprocess.PIPE, text=True)
  log, deadline = [], time.time() + 240
  for line in proc.stderr:
    log.append(line)
    if "analysis cka_intra ..." in line:
      proc.send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline, "".join(log[-20:])
  rest = proc.communicate(timeout=120)[1]
  log = "".join(log) + rest
  assert proc.returncode == 143, log[-3000:]
  last = rest.strip().splitlines()[-1]  # the stream's step, once its first images are read
  assert re.fullmatch(r"interrupted at analysis cka_intra(, cka_intra/\S+ repeat \d/\d, step "
                      r"\d/\d)?; rerun the same command to resume", last), last
  assert "Traceback" not in log
  assert not os.path.exists(workdir / "results" / "cka_intra.json")
  proc = _cli(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(workdir / "results" / "cka_intra.json")
  assert os.path.exists(workdir / "report.html")


def test_interrupt_endings(capsys):
  """Ctrl-C ends with 130 and SIGTERM with 143, both with the same one line (the real SIGINT
  path differs from the SIGTERM one above only in the signal: Python raises KeyboardInterrupt)."""
  assert errors.plain_ending(KeyboardInterrupt(), "analysis probes", False) == 130
  assert errors.plain_ending(errors.Interrupted(signal.SIGTERM), "model vit", False) == 143
  assert capsys.readouterr().err.splitlines() == [
      "interrupted at analysis probes; rerun the same command to resume",
      "interrupted at model vit; rerun the same command to resume"]
  assert errors.plain_ending(RuntimeError("a bug"), "x", False) is None  # keeps its traceback


# ---------------------------------------------------------------------------------------------
# Data checked before anything runs; corrupt files and interrupts mid-analysis.


def _image_folder(root, per_class=24, test_per_class=2, size=16):
  """train/ and test/ splits of two classes of random JPEGs, in sorted (source) order."""
  rng = np.random.default_rng(0)
  for split, n in (("train", per_class), ("test", test_per_class)):
    for cls in ("a", "b"):
      os.makedirs(root / split / cls)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / split / cls / f"{i:02d}.jpg", quality=90)
  return root


def _truncate(path):
  path.write_bytes(path.read_bytes()[:160])  # a JPEG header without its scan: PIL fails on load


def _folder_config(root, cache, **data_options):
  """A random-weights ViT (nothing trained) and attention distance over the 48 train images in 6
  steps of 8, partial state saved only at the end unless the run ends early."""
  config = config_lib.base_config("smoke")
  del config.models["resnet"]
  config.models.vit.train = None
  config.model_cache = str(cache)
  config.data = ml_collections.ConfigDict({"name": f"folder:{root}", "image_size": 16,
                                           "train_split": "train", "test_split": "test",
                                           **data_options})
  config.analyses = ("attention_distance",)
  config.attention_distance = ml_collections.ConfigDict(dict(
      split="train", num_images=48, batch_size=8, checkpoint_every_s=1e9,
      figure_formats=("png",)))
  return config


def _saved_position(workdir):
  with np.load(workdir / "partial" / "attention_distance" / "vit" / "state.npz") as z:
    return json.loads(str(z["__meta__"]))["position"]


def _step_3_example(source_len=48):
  """The source index of the 21st image of attention distance's sample (in its 3rd step)."""
  return int(streaming.sample(source_len, source_len, seed=0)[20])


def test_every_problem_of_config_files_data_and_workdir_at_once(tmp_path):
  root = _image_folder(tmp_path / "data", per_class=20)
  files = data.FolderSource(str(root / "train")).files
  _truncate(pathlib.Path(files[0][0]))  # the first file: 'sample' decodes it
  (tmp_path / "notadir").write_text("mine")
  config = _folder_config(root, tmp_path / "cache")
  config.attention_distance.batchsize = 4
  config.models.vit.checkpoint = str(tmp_path / "missing.npz")
  config.data.check_decode = "sample"
  with pytest.raises(errors.Problems) as e:
    main.run(config, str(tmp_path / "notadir"))
  assert _ending(e.value) == 1
  assert e.value.problems == [
      "unknown config key 'attention_distance.batchsize' (did you mean 'batch_size'?); "
      f"attention_distance options: {sorted(analyses.default_config('attention_distance'))}",
      f"models.vit.checkpoint = '{tmp_path / 'missing.npz'}' does not exist; it should be the "
      "official-format checkpoint of ViT-smoke_8 (a vit_jax / BiT / Mixer npz, a big_vision npz "
      "or a timm .safetensors file; see README, 'Reproduce the paper')",
      f"data.name = 'folder:{root}': 1 of 32 sampled images of '{root / 'train'}' do not decode: "
      f"'{files[0][0]}' (example 0: not a JPEG or PNG image PIL recognises); replace or remove "
      "them, or set --config.data.skip_corrupt=True to skip unreadable files "
      "(data.check_decode='all' checks every file)",
      f"workdir '{tmp_path / 'notadir'}' is a file, not a folder: pass another --workdir or move "
      "the file away"]
  assert str(e.value).startswith("4 problems, nothing was run or written:\n  - unknown config")
  # 'sample' decodes 32 of the 40 files, spread over the listing: not the 3rd one.
  shutil.copy(root / "train" / "b" / "00.jpg", files[0][0])
  _truncate(pathlib.Path(files[2][0]))
  config = _folder_config(root, tmp_path / "cache", check_decode="sample")
  assert data.check_data(config.data) == []
  config.data.check_decode = "all"
  (problem,) = data.check_data(config.data)
  assert f"1 of 40 checked images of '{root / 'train'}' do not decode: '{files[2][0]}'" in str(
      problem)
  config.data.skip_corrupt = True  # logged, not refused
  assert data.check_data(config.data) == []
  assert not os.path.exists(tmp_path / "cache")


def test_tfds_split_is_looked_up_as_array_record_files_never_downloaded(tmp_path):
  config = _folder_config(tmp_path, tmp_path / "cache")
  config.data = config_lib.tfds_data("cifar10", 32, data_dir=str(tmp_path / "tfds"))
  (tmp_path / "tfds" / "mnist").mkdir(parents=True)
  assert [str(p) for p in data.check_data(config.data)] == [
      f"data.name = 'tfds:cifar10': no prepared build of 'cifar10' under the data dir "
      f"'{tmp_path / 'tfds'}' (it holds ['mnist']); runs never download or build datasets: "
      f"prepare it first (README, TPU section), e.g. `tfds build cifar10 "
      f"--data_dir={tmp_path / 'tfds'} --file_format=array_record`, or set data.data_dir"] * 2
  build = tmp_path / "tfds" / "cifar10" / "3.0.2"
  build.mkdir(parents=True)
  (build / "cifar10-train.array_record-00000-of-00001").write_bytes(b"")
  (problem,) = data.check_data(config.data)  # the train split is there, the test split not
  assert str(problem) == (f"data.name = 'tfds:cifar10': split 'test' has no ArrayRecord shards "
                          f"under {build} (splits there: ['train']); set data.train_split / "
                          "data.test_split to one of them")
  (build / "cifar10-test.array_record-00000-of-00001").write_bytes(b"")
  assert data.check_data(config.data) == []
  with pytest.raises(FileNotFoundError, match="data_dir"):
    config.data.data_dir = str(tmp_path / "nowhere")
    main.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_bad_config_argument_is_one_line_naming_it_and_the_valid_ones(tmp_path, monkeypatch,
                                                                     capsys):
  """What the command line does before absl parses `--config` (in process: it exits first)."""
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as e:
    main._parse_flags(["main", "--config=configs/cka_intra.py:smok,bogus=3",
                       f"--workdir={tmp_path / 'run'}"])
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      "error: --config=configs/cka_intra.py:smok,bogus=3: unknown config argument 'smok'; did "
      "you mean 'smoke'? valid: smoke, full, rehearsal, ckpt_dir, data, vit, resnet\n")
  assert not os.path.exists(tmp_path / "run")
  # A good argument, or a file that does not load, is left to config_flags.
  for spec in ("configs/cka_intra.py:smoke", "configs/nothing.py:smoke"):
    assert options.config_argument_problem(["main", f"--config={spec}"]) is None


def test_corrupt_image_mid_run_saves_progress_and_skip_corrupt_resumes(tmp_path, monkeypatch):
  root = _image_folder(tmp_path / "data")
  bad = data.FolderSource(str(root / "train")).files[_step_3_example()][0]
  _truncate(pathlib.Path(bad))
  cache, workdir = tmp_path / "cache", tmp_path / "run"
  config = _folder_config(root, cache, check_decode="none")  # the data check would catch it
  with pytest.raises(data.CorruptImageError) as e:
    main.run(config, str(workdir))
  assert _ending(e.value) == 1
  assert errors.message(e.value) == (
      f"cannot decode image file '{bad}' (example {_step_3_example()} of 48 in its folder: not a "
      "JPEG or PNG image PIL recognises). The analysis' progress is saved: rerun the same command "
      "with --config.data.skip_corrupt=True to skip unreadable files (it resumes here; skipped "
      "files are counted and listed in the results), or replace the file with a readable copy "
      "and rerun the same command; removing the file changes the index of every later file, so "
      "then also delete the workdir's partial/ folder")
  assert _saved_position(workdir) == 2  # the two steps before the one holding the file
  assert not os.path.exists(workdir / "results") and not os.path.exists(workdir / "report.html")
  assert not os.path.exists(cache)  # random weights: nothing cached
  config.data.skip_corrupt = True  # not a result key: the same workdir resumes
  decode, decoded = data.FolderSource.decode, []

  def counted(self, i):
    decoded.append(self.files[i][0])
    return decode(self, i)

  monkeypatch.setattr(data.FolderSource, "decode", counted)
  resumed = main.run(config, str(workdir))[0]
  # Steps 3 to 6 only, and the file after the skipped one in its place.
  assert sum(f.startswith(str(root / "train")) for f in decoded) == 4 * 8 + 1
  assert resumed.metrics["skipped_corrupt_files"] == {"count": 1, "files": [bad]}
  assert resumed.metrics["vit"]["num_images"] == 48
  assert not os.path.exists(workdir / "partial" / "attention_distance")
  fresh = main.run(config, str(tmp_path / "fresh"))[0]  # the same skip, from the start
  assert fresh.metrics["skipped_corrupt_files"] == resumed.metrics["skipped_corrupt_files"]
  for w in (workdir, tmp_path / "fresh"):
    assert "skipped_corrupt_files" in (w / "report.html").read_text()
  np.testing.assert_array_equal(
      np.load(workdir / "results" / "attention_distance.npz")["vit"],
      np.load(tmp_path / "fresh" / "results" / "attention_distance.npz")["vit"])


_INTERRUPTING_CLI = """
import os, signal, sys
import jax
from absl import app
jax.config.update("jax_num_cpu_devices", 4)  # as in this process (conftest): the same sums
from vit_analysis import main
from vit_analysis.input import data
decode = data.FolderSource.decode

def interrupting(self, i):  # Ctrl-C as the image at plan position 40 (step 6 of 6) decodes
  if i == {index}:
    os.kill(os.getpid(), signal.SIGINT)
  return decode(self, i)

data.FolderSource.decode = interrupting
sys.argv = ["main", "--config={config}", "--workdir={workdir}"]
app.run(main.main, flags_parser=main._parse_flags)
"""


def test_ctrl_c_saves_the_last_step_and_the_rerun_is_identical(tmp_path):
  """A real SIGINT while the last of 6 steps decodes, with checkpoint_every_s far away: the
  finished steps are saved, the message names the analysis and step, exit 130, and the rerun
  gives the same result as an uninterrupted run."""
  root = _image_folder(tmp_path / "data")
  config = _folder_config(root, tmp_path / "cache", check_decode="none")
  main.run(config, str(tmp_path / "whole"))
  (tmp_path / "config.json").write_text(config.to_json())
  (tmp_path / "config.py").write_text(
      "import json\nimport ml_collections\n\n\ndef get_config():\n  return "
      f"ml_collections.ConfigDict(json.loads(open({str(tmp_path / 'config.json')!r}).read()))\n")
  workdir = tmp_path / "run"
  index = int(streaming.sample(48, 48, seed=0)[40])
  script = _INTERRUPTING_CLI.format(index=index, config=tmp_path / "config.py", workdir=workdir)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  # Decoding runs 2 steps ahead: step 6 decodes once steps 1-3 are done.
  last = proc.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r"interrupted at analysis attention_distance, attention distance vit, "
                      r"step [4-6]/6; rerun the same command to resume", last), last
  assert 3 <= _saved_position(workdir) <= 5
  assert not os.path.exists(workdir / "results") and not os.path.exists(tmp_path / "cache")
  main.run(config, str(workdir))
  np.testing.assert_array_equal(
      np.load(workdir / "results" / "attention_distance.npz")["vit"],
      np.load(tmp_path / "whole" / "results" / "attention_distance.npz")["vit"])
