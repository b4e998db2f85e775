"""Linear probes on every layer (Figs 11, 13, D.4, F.1-F.3): `run(config, ctx)`.

For each model: pool every selected layer in the configured ways (CLS, token means, single
tokens, every token position, ResNet space-to-depth as in Appendix A), extract all of them in one
streamed pass over the training examples the probes need, solve the probes of all layers x all
regularisers (x all seeds) per width group in one compiled call, and measure test accuracy in a
second streamed pass that never stores test features.

Sub-config `config.probe` (defaults in `default_config()`):
  kind: 'fewshot' (k-shot closed-form ridge, the paper), 'ridge' (closed form on all training
    examples, CIFAR F.x), or 'logistic' (multinomial logistic regression, L-BFGS).
  layers: {family: globs} over capture names (family 'ViT', 'R', 'Mixer'); layers_by_model
    overrides per model key.
  poolings: {model_key: methods}; default: CLS ViT ('cls', 'mean_no_cls', 'mean'), GAP ViT
    ('first', 'mean'), ResNet ('s2d',), Mixer ('mean',).
  token_layers: {family: globs} whose every token position gets its own probe (Fig 11a, D.4).
  shots, holdout_per_class, seeds, l2_exponents (grid 2^k, k in [lo, hi]).
  num_train, num_val, train_order (full probes: fit on num_train - num_val examples, validate on
    the other num_val; 'given' takes the split's first num_train in order, 'shuffle' a seeded
    random subset),
  weight_decays, num_steps (logistic), num_test (0: whole test split), batch_size.
"""
from __future__ import annotations

import fnmatch
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vit_analysis import config_lib
from vit_analysis.analyses.base import AnalysisResult, Context, LoadedModel
from vit_analysis.models import capture
from vit_analysis.models import layers as layers_lib
from vit_analysis.plotting import probes as plots
from vit_analysis.probing import probes as probing

NAME = "probe"


def default_config() -> ml_collections.ConfigDict:
  """Every option of the probe analysis, with the paper's defaults."""
  c = ml_collections.ConfigDict()
  c.kind = "fewshot"
  c.layers = {"ViT": ("embedding", "block??"), "R": ("root", "block?/unit??"),
              "Mixer": ("stem", "block??")}
  c.layers_by_model = {}
  c.poolings = {}
  c.token_layers = {}  # {family: globs}, e.g. {'ViT': ('block??',), 'R': ('block?/unit01',)}
  c.grid_layers = ()  # token_layers shown as D.4 grids; () = up to 5 spread over token_layers.
  c.shots = 10
  c.holdout_per_class = 10
  c.seeds = 3
  c.l2_exponents = (-10, 20)
  c.num_train = 0
  c.num_val = 0
  c.train_order = "shuffle"  # full probes: 'shuffle' (seeded) or 'given' (split order)
  c.weight_decays = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
  c.num_steps = 300
  c.num_test = 0
  c.batch_size = 64
  # Test features up to this size are cached on the host (one compiled feature step serves train
  # and test); larger test sets are streamed through the probes without being stored.
  c.max_cached_mb = 512.0
  c.max_train_mb = 4096.0  # training features per pass; more specs -> several passes.
  c.fast_compile = None  # XLA:CPU optimisation level 0; None: config.train.fast_compile.
  c.checkpoint_every_s = 60.0  # extracted features saved this often (resumable)
  c.figure_formats = ("png", "pdf")
  return c


# Config keys of `layers` / `token_layers` per model family (`models.describe`); the hybrid's
# probed layers are its transformer's.
_FAMILY_KEYS = {"vit": "ViT", "hybrid": "ViT", "resnet": "R", "mixer": "Mixer"}


def _family(lm: LoadedModel) -> str:
  family = lm.info.family
  if family not in _FAMILY_KEYS:
    raise ValueError(f"probe: no default layers for model {lm.key!r} ({lm.name}, family "
                     f"{family!r}); give probe.layers_by_model[{lm.key!r}]")
  return _FAMILY_KEYS[family]


def _has_cls(lm: LoadedModel) -> bool:
  return lm.info.has_cls


def _specs(lm: LoadedModel, cfg) -> tuple[list[probing.FeatureSpec], dict, dict]:
  """Feature specs of one model, plus {method: [spec key per layer]} and {token layer: spec key}."""
  names = capture.layer_names(lm.module, (lm.image_size, lm.image_size, 3))
  family = _family(lm)
  layers = capture.select(names, config_lib.names(
      cfg.layers_by_model.get(lm.key, cfg.layers[family])))
  shapes = capture.layer_shapes(lm.module, (lm.image_size, lm.image_size, 3))
  if family == "R":
    final = shapes[[n for n in layers_lib.block_outputs(names)
                    if layers_lib.parse(n).kind == "unit"][-1]].shape
  default = {"ViT": ("cls", "mean_no_cls", "mean") if _has_cls(lm) else ("first", "mean"),
             "R": ("s2d",), "Mixer": ("mean",)}[family]
  methods = tuple(cfg.poolings.get(lm.key, default))
  if "cls" in methods and not _has_cls(lm):
    raise ValueError(f"pooling 'cls' asked for model {lm.key!r} ({lm.name}), which has no CLS "
                     "token")

  def pooling(layer, method):
    shape = shapes[layer].shape
    if len(shape) == 2:
      return probing.Pooling("identity")
    if len(shape) == 4 and method in ("s2d", "s2d_tokens"):
      return probing.resnet_pooling(shape, final, per_token=method == "s2d_tokens")
    return probing.Pooling(method)

  agg = {m: [probing.FeatureSpec(l, pooling(l, m)) for l in layers] for m in methods}
  token_globs = cfg.token_layers.get(family, ())
  token_layers = capture.select(names, token_globs) if token_globs else []
  token_method = "s2d_tokens" if family == "R" else "tokens"
  tokens = {l: probing.FeatureSpec(l, pooling(l, token_method)) for l in token_layers
            if len(shapes[l].shape) > 2}
  specs = {s.key: s for s in [s for v in agg.values() for s in v] + list(tokens.values())}
  return (list(specs.values()), {m: [s.key for s in v] for m, v in agg.items()},
          {l: s.key for l, s in tokens.items()})


def _label_pool(src, num_classes: int, per_class: int, seed: int) -> np.ndarray:
  """Indices of up to `per_class` examples per class (all of them if the source lists labels)."""
  labels = getattr(src, "labels", None)
  if labels is not None:
    return np.arange(len(src))
  # Sources without a label array (TFDS, folders): read a random order until every class is full.
  order, counts, keep = np.random.default_rng(seed).permutation(len(src)), np.zeros(num_classes), []
  for i in order:
    c = int(src[int(i)]["label"])
    if counts[c] < per_class:
      counts[c] += 1
      keep.append(i)
      if counts.min() >= per_class:
        break
  return np.sort(np.asarray(keep, np.int64))


def _labels_of(src, indices: np.ndarray) -> np.ndarray:
  labels = getattr(src, "labels", None)
  if labels is not None:
    return np.asarray(labels)[indices]
  return np.asarray([src[int(i)]["label"] for i in indices])


def _chunks(specs, shapes: dict, n: int, max_mb: float) -> list[list]:
  """Consecutive spec lists whose train features (n examples, float32) fit in max_mb each."""
  chunks, size = [[]], 0.0
  for s in specs:
    mb = n * 4 * int(np.prod(shapes[s.key])) / 2**20
    if chunks[-1] and size + mb > max_mb:
      chunks.append([])
      size = 0.0
    chunks[-1].append(s)
    size += mb
  return chunks


def _solve(cfg, feats, labels, fit_idx, val_idx, num_classes, fast):
  """Probes of every width group of `feats`: {d: (units, probes, val_acc, best)}, grid."""
  out = {}
  for d, units in probing.group_units({k: v.shape[1:] for k, v in feats.items()}).items():
    x = jnp.asarray(probing.stack_units(feats, units))
    if cfg.kind == "logistic":
      grid = np.asarray(cfg.weight_decays, np.float32)
      va, b, p = probing.logistic_all(x[:, fit_idx[0]], jnp.asarray(labels[fit_idx[0]]),
                                      x[:, val_idx[0]], jnp.asarray(labels[val_idx[0]]),
                                      jnp.asarray(grid), num_classes=num_classes,
                                      num_steps=cfg.num_steps, fast=fast)
      va, b, p = va[None], b[None], jax.tree.map(lambda a: a[None], p)
    else:
      grid = 2.0 ** np.arange(cfg.l2_exponents[0], cfg.l2_exponents[1] + 1)
      va, b, p = probing.fewshot_all(x, jnp.asarray(labels), jnp.asarray(fit_idx),
                                     jnp.asarray(val_idx), jnp.asarray(grid, x.dtype),
                                     num_classes=num_classes, fast=fast)
    out[d] = (units, p, np.asarray(va), np.asarray(b))
  return out, grid


def probe_model(lm: LoadedModel, cfg: ml_collections.ConfigDict, ctx: Context,
                seed: int) -> dict:
  """Every probe of one model; returns per-unit arrays (see `run`).

  Specs are processed in chunks whose training features fit in `cfg.max_train_mb` (per-token
  probes of a large model on 10-shot ImageNet would otherwise need ~100 GB); each chunk is one
  pass over the training examples and one over the test examples.
  """
  train, test = ctx.sources["train"], ctx.sources["test"]
  num_classes = train.num_classes
  specs, agg, tokens = _specs(lm, cfg)
  common = dict(image_size=lm.image_size, batch_size=cfg.batch_size, mesh=ctx.mesh,
                fast=ctx.fast_compile, normalization=lm.info.normalization)
  if cfg.kind == "fewshot":
    pool = _label_pool(train, num_classes, 3 * (cfg.shots + cfg.holdout_per_class), seed)
    splits = [probing.fewshot_split(_labels_of(train, pool), num_classes, cfg.shots,
                                    cfg.holdout_per_class, seed * 1000 + s)
              for s in range(cfg.seeds)]
    needed = np.unique(np.concatenate([np.concatenate(sp) for sp in splits]))  # pool positions
    row = np.zeros(len(pool), np.int64)
    row[needed] = np.arange(len(needed))  # pool position -> row of the extracted features
    fit_idx = np.stack([row[f] for f, _ in splits])
    val_idx = np.stack([row[v] for _, v in splits])
    train_idx = pool[needed]
  else:
    n = cfg.num_train or len(train)
    if not 0 < cfg.num_val < n:
      raise ValueError(f"probe.num_val={cfg.num_val} must be in (0, num_train={n})")
    # 'given': the split's own order (paper's CIFAR protocol: first 45k fit, last 5k validate);
    # 'shuffle': a seeded random subset/order, needed for class-sorted sources (the digits).
    if cfg.train_order == "given":
      train_idx = np.arange(n)
    elif cfg.train_order == "shuffle":
      train_idx = np.random.default_rng(seed).permutation(len(train))[:n]
    else:
      raise ValueError(f"probe.train_order must be 'given' or 'shuffle', got {cfg.train_order!r}")
    fit_idx, val_idx = np.arange(n - cfg.num_val)[None], np.arange(n - cfg.num_val, n)[None]
  test_idx = np.arange(len(test))
  if cfg.num_test:
    test_idx = np.sort(np.random.default_rng(seed).permutation(len(test))[:cfg.num_test])
  shapes = probing.feature_shapes(lm.module, lm.variables, specs, lm.image_size)
  seconds = dict(extract=0.0, solve=0.0, test=0.0)
  names, acc, val_acc, best_reg = [], [], [], []
  for c, chunk in enumerate(_chunks(specs, shapes, len(train_idx), cfg.max_train_mb)):
    t0 = time.time()
    feats, labels = probing.extract(lm.module, lm.variables, train, train_idx, chunk, **common,
                                    resume=ctx.checkpointer(f"{lm.key}_train{c}"))
    for k, v in feats.items():
      probing.check_features(v.reshape(v.shape[0], -1), labels, num_classes, what=f"{lm.key}/{k}")
    t1 = time.time()
    solved, grid = _solve(cfg, feats, labels, fit_idx, val_idx, num_classes, common["fast"])
    jax.block_until_ready([p for _, p, _, _ in solved.values()])
    t2 = time.time()
    groups = {d: u for d, (u, _, _, _) in solved.items()}
    probes = {d: p for d, (_, p, _, _) in solved.items()}
    per_example = sum(v[0].size * v.itemsize for v in feats.values())
    del feats
    if len(test_idx) * per_example <= cfg.max_cached_mb * 2**20:
      test_feats, test_labels = probing.extract(lm.module, lm.variables, test, test_idx, chunk,
                                                **common,
                                                resume=ctx.checkpointer(f"{lm.key}_test{c}"))
      chunk_acc = {d: (np.asarray(probing.predict_all(probes[d], jnp.asarray(
          probing.stack_units(test_feats, u)), fast=common["fast"])) == test_labels).mean(-1)
                   for d, u in groups.items()}
    else:
      chunk_acc = probing.evaluate(lm.module, lm.variables, test, test_idx, chunk, groups, probes,
                                   **common)
    seconds["extract"] += t1 - t0
    seconds["solve"] += t2 - t1
    seconds["test"] += time.time() - t2
    for d, (units, _, va, b) in solved.items():
      names += [k if t is None else f"{k}@{t}" for k, t in units]
      acc.append(chunk_acc[d])
      val_acc.append(va)
      best_reg.append(np.asarray(grid)[b])
  return dict(
      units=names, acc=np.concatenate(acc, axis=1),                   # [S, U]
      val_acc=np.concatenate(val_acc, axis=1),                         # [S, U, K]
      best_reg=np.concatenate(best_reg, axis=1), grid=np.asarray(grid),  # [S, U], [K]
      agg=agg, tokens=tokens, has_cls=_has_cls(lm), family=_family(lm), seconds=seconds,
      num_fit=int(fit_idx.shape[1]), num_test=len(test_idx))


def _summaries(r: dict) -> dict:
  """Per-layer curves (mean ± std over seeds) and per-token grids from one model's unit arrays."""
  col = {u: i for i, u in enumerate(r["units"])}
  out = {"aggregated": {}, "tokens": {}, "grids": {}}
  for method, keys in r["agg"].items():
    cols = [col[k] for k in keys]
    a = r["acc"][:, cols]  # [S, L]
    out["aggregated"][method] = dict(layers=[k.split(":")[0] for k in keys],
                                     acc_mean=a.mean(0), acc_std=a.std(0),
                                     best_reg=np.median(r["best_reg"][:, cols], 0))
  for layer, key in r["tokens"].items():
    positions = sorted(int(u.split("@")[1]) for u in r["units"] if u.startswith(key + "@"))
    if r["has_cls"]:
      positions = positions[1:]  # CLS excluded from per-token averages and grids (Fig 11a).
    a = r["acc"][:, [col[f"{key}@{t}"] for t in positions]]  # [S, P]
    out["tokens"][layer] = dict(acc_mean=float(a.mean(1).mean()), acc_std=float(a.mean(1).std()))
    side = int(round(np.sqrt(len(positions))))
    if side * side == len(positions):
      out["grids"][layer] = a.mean(0).reshape(side, side)
  return out


def run(ctx: Context, cfg: ml_collections.ConfigDict) -> AnalysisResult:
  """Probes every configured layer of every model.

  Writes results/probe.npz (per model: 'units' names '<layer>:<pooling>[@token]', 'acc' [S, U]
  test accuracy per seed, 'val_acc' [S, U, K] held-out accuracy per regulariser, 'best_reg'
  [S, U], 'grid' [K]), results/probe.json (the summary below) and figures/probe_*.png.
  """
  if cfg.kind not in ("fewshot", "ridge", "logistic"):
    raise ValueError(f"probe.kind must be 'fewshot', 'ridge' or 'logistic', got {cfg.kind!r}")
  raw, summary, arrays = {}, {}, {}
  for key, lm in ctx.models.items():
    logging.info("probe: model %s (%s)", key, lm.name)
    r = raw[key] = probe_model(lm, cfg, ctx, ctx.seed)
    summary[key] = _summaries(r)
    for field in ("units", "acc", "val_acc", "best_reg", "grid"):
      arrays[f"{key}/{field}"] = np.asarray(r[field])
  metrics = {}
  for key, s in summary.items():
    r = raw[key]
    metrics[key] = dict(
        name=ctx.models[key].name, kind=cfg.kind, num_fit=r["num_fit"], num_test=r["num_test"],
        seconds={k: round(v, 2) for k, v in r["seconds"].items()},
        aggregated={m: dict(layers=c["layers"], acc_mean=np.round(c["acc_mean"], 4).tolist(),
                            acc_std=np.round(c["acc_std"], 4).tolist(),
                            best_reg=c["best_reg"].tolist())
                    for m, c in s["aggregated"].items()},
        tokens={l: {k: round(v, 4) for k, v in c.items()} for l, c in s["tokens"].items()})
  ctx.save_arrays(NAME, **arrays)
  curves = [dict(label=f"{key} ({_head(raw[key])}); {m}", layers=c["layers"],
                 mean=c["acc_mean"], std=c["acc_std"])
            for key, s in summary.items() for m, c in s["aggregated"].items()]
  shots = f"{cfg.shots}-shot " if cfg.kind == "fewshot" else ""
  figures = [ctx.save_figure(f"{NAME}_layers", plots.layer_curves, curves=curves,
                             title=f"{shots}{cfg.kind} probes, aggregated representations")]
  token_curves = [dict(label=f"{key} ({_head(raw[key])})", layers=list(s["tokens"]),
                       mean=np.array([c["acc_mean"] for c in s["tokens"].values()]),
                       std=np.array([c["acc_std"] for c in s["tokens"].values()]))
                  for key, s in summary.items() if s["tokens"]]
  if token_curves:
    figures.append(ctx.save_figure(f"{NAME}_tokens", plots.layer_curves, curves=token_curves,
                                   title=f"{shots}per-token probes (mean over tokens)"))
    rows = [(f"{key} ({_head(raw[key])})", _pick(s["grids"], cfg.grid_layers))
            for key, s in summary.items() if s["grids"]]
    if rows:
      figures.append(ctx.save_figure(f"{NAME}_token_grids", plots.token_grids, rows=rows))
  result = AnalysisResult(
      name=NAME, title="Linear probes per layer (Figs 11, 13, D.4, F.1-F.3)",
      caption=("Test accuracy of linear probes on each layer's pooled features (mean ± std over "
               "seeds), and of one probe per token position. The paper finds CLS-model tokens "
               "stay poor while GAP-model and ResNet tokens become good in top layers, and large "
               "ViTs have stronger intermediate layers than ResNets."),
      figures=figures, metrics=metrics)
  return result


def _head(r: dict) -> str:
  return {"ViT": "CLS" if r["has_cls"] else "GAP", "R": "ResNet", "Mixer": "Mixer"}[r["family"]]


def _pick(grids: dict, patterns) -> list:
  """(layer, grid) for layers matching `patterns`, else up to 5 spread over all grid layers."""
  layers = list(grids)
  if patterns:
    layers = [l for l in layers if any(fnmatch.fnmatchcase(l, p) for p in patterns)]
  elif len(layers) > 5:
    layers = [layers[i] for i in np.linspace(0, len(layers) - 1, 5).round().astype(int)]
  return [(l, grids[l]) for l in layers]
