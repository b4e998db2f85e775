"""Probe maths against scikit-learn / NumPy float64 references, plus the probe analysis end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge, RidgeClassifier

from vit_analysis.probing import probes as probing


def _augment_np(x_fit, x):
  """big_vision feature map in float64 NumPy: z-score with fit stats (+1e-5), bias column 100."""
  mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-5
  z = (x - mu) / sd
  return np.concatenate([z, np.full((len(z), 1), 100.0)], axis=1)


@pytest.mark.parametrize("n,d", [(80, 12), (24, 40)])  # primal (n >= d+1) and dual (d+1 > n).
def test_ridge_equals_sklearn(n, d):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, d)) * rng.uniform(0.1, 30, size=d) + 1e3  # offsets and scales differ.
  y = np.arange(n) % 4
  xa = _augment_np(x, x)
  for l2 in (2.0**-3, 2.0**4):
    with jax.enable_x64(True):
      w = np.asarray(probing.ridge_weights(probing.ridge_cache(jnp.asarray(x), jnp.asarray(y), 4),
                                           l2))
    ridge = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(xa, 2 * np.eye(4)[y] - 1)
    clf = RidgeClassifier(alpha=l2, fit_intercept=False, solver="cholesky").fit(xa, y)
    np.testing.assert_allclose(w, ridge.coef_.T, atol=1e-5, rtol=0)
    np.testing.assert_allclose(w, clf.coef_.T, atol=1e-5, rtol=0)


def test_fewshot_all_matches_sklearn_selection_and_predictions():
  """Two layers x two seeds x l2 grid in one call == per-(seed, layer, l2) RidgeClassifier loops."""
  rng = np.random.default_rng(0)
  n, d, c = 120, 6, 3
  labels = np.arange(n) % c
  centers = rng.normal(size=(c, d))
  feats = np.stack([centers[labels] + rng.normal(size=(n, d)) * s for s in (0.7, 2.0)])
  grid = 2.0 ** np.arange(-4, 8, 3)
  splits = [probing.fewshot_split(labels, c, shots=5, holdout=10, seed=s) for s in (0, 1)]
  fit_idx = np.stack([f for f, _ in splits])
  val_idx = np.stack([v for _, v in splits])
  with jax.enable_x64(True):
    val_acc, best, probes = probing.fewshot_all(jnp.asarray(feats), jnp.asarray(labels),
                                                jnp.asarray(fit_idx), jnp.asarray(val_idx),
                                                jnp.asarray(grid), num_classes=c, fast=True)
    preds = np.asarray(probing.predict_all(probes, jnp.asarray(feats), fast=True))
  assert val_acc.shape == (2, 2, len(grid)) and preds.shape == (2, 2, n)
  for s, (fi, vi) in enumerate(splits):
    assert len(set(fi) & set(vi)) == 0 and np.all(np.bincount(labels[fi]) == 5)
    for g in range(2):
      accs = []
      for l2 in grid:
        clf = RidgeClassifier(alpha=l2, fit_intercept=False).fit(_augment_np(feats[g][fi],
                                                                             feats[g][fi]),
                                                                 labels[fi])
        accs.append(clf.score(_augment_np(feats[g][fi], feats[g][vi]), labels[vi]))
      np.testing.assert_allclose(np.asarray(val_acc[s, g]), accs, atol=1e-12)
      k = len(grid) - 1 - int(np.argmax(np.asarray(accs)[::-1]))  # ties -> strongest l2.
      assert int(best[s, g]) == k
      clf = RidgeClassifier(alpha=grid[k], fit_intercept=False).fit(
          _augment_np(feats[g][fi], feats[g][fi]), labels[fi])
      np.testing.assert_array_equal(preds[s, g], clf.predict(_augment_np(feats[g][fi], feats[g])))


def test_separable_layer_is_perfect_and_noise_layer_is_chance():
  rng = np.random.default_rng(1)
  c, per_class = 5, 60
  labels = np.repeat(np.arange(c), per_class)
  d = 16
  separable = np.zeros((len(labels), d))
  separable[np.arange(len(labels)), labels] = 5.0  # class c lives on axis c.
  separable += rng.uniform(-0.5, 0.5, size=separable.shape)  # margin 4 on the class axes.
  noise = rng.normal(size=(len(labels), d))
  feats = np.stack([separable, noise]).astype(np.float32)
  fit, val = probing.fewshot_split(labels, c, shots=10, holdout=10, seed=0)
  test = np.setdiff1d(np.arange(len(labels)), np.concatenate([fit, val]))
  _, _, probes = probing.fewshot_all(jnp.asarray(feats), jnp.asarray(labels), jnp.asarray(fit[None]),
                                     jnp.asarray(val[None]), 2.0 ** jnp.arange(-10, 21),
                                     num_classes=c, fast=True)
  preds = np.asarray(probing.predict_all(probes, jnp.asarray(feats[:, test]), fast=True))[0]
  acc = (preds == labels[test]).mean(axis=-1)
  assert acc[0] == 1.0
  # 200 test examples at chance 0.2: binomial std 0.028; 4.5 std either side.
  assert abs(acc[1] - 1 / c) < 0.13, acc


def test_logistic_probe_matches_sklearn_accuracy():
  rng = np.random.default_rng(2)
  n, d, c = 600, 20, 4
  w_true = rng.normal(size=(d, c))
  x = rng.normal(size=(2 * n, d)) * 3 + 7
  y = np.argmax(x @ w_true / 3 + rng.gumbel(size=(2 * n, c)), axis=1)
  xf, yf, xt, yt = x[:n], y[:n], x[n:], y[n:]
  wd_grid = np.array([1e-4, 1e-2])
  val_acc, best, probes = probing.logistic_all(
      jnp.asarray(xf[None], jnp.float32), jnp.asarray(yf), jnp.asarray(xt[None], jnp.float32),
      jnp.asarray(yt), jnp.asarray(wd_grid, jnp.float32), num_classes=c, fast=True)
  mu, sd = xf.mean(0), xf.std(0) + 1e-5
  for k, wd in enumerate(wd_grid):
    ref = LogisticRegression(C=1 / (wd * n), max_iter=2000, tol=1e-8).fit((xf - mu) / sd, yf)
    assert abs(float(val_acc[0, k]) - ref.score((xt - mu) / sd, yt)) <= 0.01
  assert 0.5 < float(val_acc[0].max()) <= 1.0


def test_bad_inputs_raise():
  labels = np.array([0, 0, 1, 1, 1])
  with pytest.raises(ValueError, match="class 0 has 2 examples"):
    probing.fewshot_split(labels, 2, shots=2, holdout=1, seed=0)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    probing.check_features(np.zeros((5, 3)), np.array([0, 1, 2, 1, 0]), 2)
  feats = np.zeros((5, 3))
  feats[3, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    probing.check_features(feats, labels, 2)
  with pytest.raises(ValueError, match="shape"):
    probing.check_features(np.zeros((4, 3)), labels, 2)
  with pytest.raises(ValueError, match="unknown pooling"):
    probing.Pooling("max")
  with pytest.raises(ValueError, match="token 9 out of range"):
    probing.pool(jnp.zeros((2, 5, 3)), probing.Pooling("token", token=9))


def test_pooling_against_numpy():
  rng = np.random.default_rng(3)
  tok = rng.normal(size=(2, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(probing.pool(tok, probing.Pooling("cls")), tok[:, 0])
  np.testing.assert_allclose(probing.pool(tok, probing.Pooling("mean")), tok.mean(1), rtol=1e-6)
  np.testing.assert_allclose(probing.pool(tok, probing.Pooling("mean_no_cls")), tok[:, 1:].mean(1),
                             rtol=1e-6)
  np.testing.assert_allclose(probing.pool(tok, probing.Pooling("token", token=3)), tok[:, 3])
  # Space-to-depth s=2 then average-pool an 8x8 map to 2x2: loop reference.
  m = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  ref = np.zeros((2, 2, 2, 12))
  for i in range(2):
    for j in range(2):
      for a in range(2):
        for b in range(2):  # channel block (a, b) = pixel offset inside each 2x2 patch.
          ref[:, i, j, (a * 2 + b) * 3:(a * 2 + b + 1) * 3] = m[:, 4 * i + a:4 * i + 4:2,
                                                                4 * j + b:4 * j + 4:2].mean((1, 2))
  got = probing.pool(m, probing.Pooling("s2d_tokens", block=2, grid=(2, 2)))
  np.testing.assert_allclose(got, ref.reshape(2, 4, 12), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probing.pool(m, probing.Pooling("s2d", block=2, grid=(2, 2))),
                             ref.mean((1, 2)), rtol=1e-5, atol=1e-6)
  # Appendix A block sizes for R50 at 224 px (final stage 7x7x2048).
  final = (1, 7, 7, 2048)
  for shape, s in [((1, 56, 56, 64), 4), ((1, 56, 56, 256), 2), ((1, 28, 28, 512), 2),
                   ((1, 14, 14, 1024), 1), ((1, 7, 7, 2048), 1)]:
    p = probing.resnet_pooling(shape, final)
    assert (p.block, p.grid) == (s, (7, 7)), shape


def test_run_end_to_end(tmp_path):
  """run(config, ctx) on two tiny random models: files, shapes, and per-token == CLS consistency."""
  import ml_collections
  from helpers import run_analysis

  from vit_analysis import models
  from vit_analysis.analyses import Context, LoadedModel
  from vit_analysis.input import data
  from vit_analysis.runtime import compilation, sharding

  loaded = {}
  for key, name in [("vit", "ViT-smoke_8"), ("resnet", "R-smoke")]:
    module = models.create_model(name, 10)
    # One jitted init with RBG keys: eager threefry initialisers compile one program per tensor.
    variables = jax.jit(lambda m=module: m.init(jax.random.key(0, impl="rbg"),
                                                 jnp.zeros((1, 32, 32, 3)), train=False),
                        compiler_options=compilation.FAST_COMPILE_OPTIONS)()
    loaded[key] = LoadedModel(key=key, name=name, module=module, variables=variables,
                              image_size=32)
  ctx = Context(workdir=str(tmp_path), models=loaded, mesh=sharding.make_mesh(),
                sources={"train": data.digits_source("train"), "test": data.digits_source("test")})
  config = ml_collections.ConfigDict(dict(seed=0, probe=dict(
      shots=2, holdout_per_class=1, seeds=2, num_test=48, batch_size=16, l2_exponents=(-2, 6),
      layers={"ViT": ("block??", "pre_logits"), "R": ("block?/unit??",), "Mixer": ("block??",)},
      token_layers={"ViT": ("block01",), "R": ("block4/unit01",)},
      fast_compile=True)))
  result = run_analysis("probe", config, ctx)
  npz = np.load(tmp_path / "results" / "probe.npz")
  assert (tmp_path / "results" / "probe.json").exists()
  assert all((tmp_path / f).exists() for f in result.figures) and len(result.figures) == 3
  units = list(npz["vit/units"])
  # CLS model: 2 blocks x 3 poolings + pre_logits + 17 token positions of block01.
  assert len(units) == 2 * 3 + 1 + 17 and npz["vit/acc"].shape == (2, len(units))
  assert len(npz["resnet/units"]) == 4 + 16 and np.all(npz["resnet/acc"] <= 1)
  acc = npz["vit/acc"]
  assert np.all((acc >= 0) & (acc <= 1))
  # Token 0 of the CLS model is the CLS token: same features, same splits -> same test accuracy.
  np.testing.assert_array_equal(acc[:, units.index("block01:tokens@0")],
                                acc[:, units.index("block01:cls")])
  m = result.metrics["vit"]["aggregated"]
  assert set(m) == {"cls", "mean_no_cls", "mean"} and m["cls"]["layers"] == ["block00", "block01",
                                                                             "pre_logits"]
  assert set(result.metrics["resnet"]["aggregated"]) == {"s2d"}
  # The streamed test pass (no stored features, used for large test sets) == predictions on
  # extracted features, for random stacked probes [S=2, G=2].
  vit = loaded["vit"]
  specs = [probing.FeatureSpec("block01", probing.Pooling(m)) for m in ("cls", "mean")]
  common = dict(image_size=32, batch_size=16, mesh=ctx.mesh, fast=True)
  idx = np.arange(40)  # 40 = 2 full batches + a padded one.
  feats, labels = probing.extract(vit.module, vit.variables, ctx.sources["test"], idx, specs,
                                  **common)
  groups = probing.group_units({k: v.shape[1:] for k, v in feats.items()})
  rng = np.random.default_rng(0)
  probe = probing.Probe(*(jnp.asarray(rng.normal(size=(2, 2) + s), jnp.float32)
                          for s in [(1, 32), (1, 32), (32, 10), (1, 10)]))
  probe = probe._replace(std=jnp.abs(probe.std) + 0.5)
  streamed = probing.evaluate(vit.module, vit.variables, ctx.sources["test"], idx, specs, groups,
                              {32: probe}, **common)[32]
  cached = np.asarray(probing.predict_all(probe, jnp.asarray(probing.stack_units(feats, groups[32])),
                                          fast=True))
  np.testing.assert_allclose(streamed, (cached == labels).mean(-1))


def test_configs_and_chunking():
  """Both probe configs (full and :smoke) validate; specs are split so each pass fits the budget."""
  import importlib.util
  import pathlib

  from vit_analysis import options
  from vit_analysis.analyses import probes
  root = pathlib.Path(__file__).resolve().parents[1] / "configs"
  for name, args in [("probe_digits", (None, "smoke", "kind=logistic")),
                     ("probe_imagenet", (None, "smoke", "fig=13", "data=cifar10"))]:
    spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg in args:
      config = module.get_config(arg)
      options.validate_config(config)
      assert config.analyses == ("probe",) and set(config.probe) <= set(probes.default_config())
  specs = [probing.FeatureSpec(f"block{i:02d}", probing.Pooling("tokens")) for i in range(5)]
  shapes = {s.key: (50, 768) for s in specs}  # 1000 examples: 146.5 MB per layer.
  chunks = probes._chunks(specs, shapes, 1000, max_mb=300.0)
  assert [len(c) for c in chunks] == [2, 2, 1] and sum(chunks, []) == specs


def test_extract_resumes_from_saved_features(tmp_path):
  from helpers import loaded, random_source

  from vit_analysis import models
  from vit_analysis.probing import probes as probing
  from vit_analysis.runtime import resume, sharding
  lm = loaded(models.create_model("ViT-smoke_8", 10), 32)
  src = random_source(40, 32, num_classes=4)
  specs = [probing.FeatureSpec("block01", probing.Pooling("cls"))]
  common = dict(image_size=32, batch_size=16, mesh=sharding.make_mesh(), fast=True)
  full, labels = probing.extract(lm.module, lm.variables, src, np.arange(40), specs, **common)
  # A run stopped after its first batch of 16: only that batch's features were saved.
  partial = {k: np.where(np.arange(40)[:, None] < 16, v, 0) for k, v in full.items()}
  ckpt = resume.Checkpointer(str(tmp_path / "p"), every_s=0.0)
  ckpt.maybe_save({"feats": partial, "labels": np.where(np.arange(40) < 16, labels, 0)}, 1,
                  force=True)
  again, labels2 = probing.extract(lm.module, lm.variables, src, np.arange(40), specs, **common,
                                   resume=ckpt)
  for k in full:
    np.testing.assert_array_equal(again[k], full[k])
  np.testing.assert_array_equal(labels2, labels)
  assert ckpt.restore()[1] == 3  # 40 examples = 3 batches of 16, all done

