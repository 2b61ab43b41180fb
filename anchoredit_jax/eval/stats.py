"""Intervals for multi-turn numbers (numpy only), so that a table says how sure each number is.

  * a success rate k of n gets the Wilson 95% score interval (right at 0 and n, unlike k/n +- 2 se);
  * a mean PSNR over sequences gets a percentile bootstrap 95% interval: 2000 resamples of the
    sequences with a fixed seed (every turn of a resampled sequence goes with it, so intervals of
    one run are reproducible and turns are resampled jointly);
  * conditional success at turn t: success among the sequences whose turns 1..t-1 all succeeded
    (its n shrinks with t); all correct so far: the share of sequences with turns 1..t all right.

`summarize_turns(success [N,T], identity_psnr [N,T])` gives all of them per turn (the multi-turn
benchmark and the evaluation inside training both report it); `turn_scalars` flattens it to
`{name}_turn{t}` keys for a training run's one-line summary.

Letters: N sequences, T turns, B bootstrap resamples.
"""
import contextlib
import warnings

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
RESAMPLES = 2000


def wilson(k, n, z: float = Z95):
  """Wilson score interval (lo, hi) for k successes of n trials (arrays broadcast); NaN where n = 0."""
  k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
  with _quiet():
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def bootstrap_mean(x, *, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95):
  """Percentile bootstrap interval (lo, hi) of the mean over axis 0 of x [N] or [N,T] (NaNs are
  left out of each mean). Resampling counts [B,N] are drawn once, so every column of x is
  resampled with the same sequences."""
  x = np.asarray(x, np.float64)
  col = x.reshape(x.shape[0], -1)                                         # [N, T]
  n = col.shape[0]
  if n == 0:
    nan = np.full(x.shape[1:], np.nan)
    return nan, nan.copy()
  counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)  # [B,N]
  finite = np.isfinite(col)
  tail = 100 * (1 - level) / 2
  with _quiet():  # an all-NaN column gives NaN bounds
    means = (counts @ np.where(finite, col, 0.0)) / (counts @ finite)     # [B, T]
    lo, hi = np.nanpercentile(means, [tail, 100 - tail], axis=0)
  return lo.reshape(x.shape[1:]), hi.reshape(x.shape[1:])


def conditional_success(success):
  """success [N,T] -> (k [T], n [T]): at turn t, n sequences had every turn before t succeed and k
  of them succeeded at t (turn 1: all N)."""
  s = np.asarray(success) > 0.5
  before = np.concatenate([np.ones((s.shape[0], 1), bool), np.cumprod(s, axis=1)[:, :-1] > 0], 1)
  return (s & before).sum(0), before.sum(0)


def all_correct(success):
  """success [N,T] -> k [T]: sequences with every turn 1..t correct."""
  return (np.cumprod(np.asarray(success) > 0.5, axis=1) > 0).sum(0)


@contextlib.contextmanager
def _quiet():
  """No warnings for 0/0 and all-NaN reductions: they give NaN, which the report prints as '-'."""
  with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
    warnings.simplefilter("ignore", RuntimeWarning)
    yield


def _rate(k, n) -> dict:
  lo, hi = wilson(k, n)
  with _quiet():
    p = np.asarray(k, np.float64) / n
  return {"value": _list(p), "ci": _pairs(lo, hi), "k": _list(k, int), "n": _list(n, int)}


def _mean(x, seed) -> dict:
  lo, hi = bootstrap_mean(x, seed=seed)
  with _quiet():
    return {"value": _list(np.nanmean(x, axis=0)), "ci": _pairs(lo, hi)}


def mean_turns(x, *, seed: int = 0) -> dict:
  """Per-turn means of x [N,T] over sequences with bootstrap 95% intervals: {"value", "ci"}."""
  return _mean(np.asarray(x, np.float64), seed)


def _list(a, kind=float):
  return [kind(v) for v in np.asarray(a)]


def _pairs(lo, hi):
  return [[float(a), float(b)] for a, b in zip(lo, hi)]


def summarize_turns(success, identity_psnr, preserved_psnr=None, *, seed: int = 0) -> dict:
  """Per-turn statistics of N sequences x T turns. Each entry is {"value": [T], "ci": [T x [lo,hi]]}
  (rates also "k" and "n" [T]); rates are fractions in [0,1] with Wilson intervals, PSNRs means in
  dB with bootstrap intervals:
    success, conditional_success (n = sequences with all earlier turns right), all_correct
    (share of sequences with all edits so far correct), identity_psnr[, preserved_psnr]."""
  success = np.asarray(success, np.float64)
  N = success.shape[0]
  out = {"sequences": int(N),
         "success": _rate((success > 0.5).sum(0), np.full(success.shape[1], N)),
         "conditional_success": _rate(*conditional_success(success)),
         "all_correct": _rate(all_correct(success), np.full(success.shape[1], N)),
         "identity_psnr": _mean(np.asarray(identity_psnr, np.float64), seed)}
  if preserved_psnr is not None:
    out["preserved_psnr"] = _mean(np.asarray(preserved_psnr, np.float64), seed)
  return out


def paired_gap(a, b, *, seed: int = 0) -> dict:
  """Mean per-sequence difference a - b [N,T] (same sequences, e.g. own minus oracle context)
  per turn with its bootstrap interval: {"value": [T], "ci": [T x [lo,hi]]}."""
  return _mean(np.asarray(a, np.float64) - np.asarray(b, np.float64), seed)


def turn_scalars(summary: dict) -> dict:
  """summarize_turns' dict as flat scalars: {name}_turn{t}, {name}_lo_turn{t}, {name}_hi_turn{t}
  (and conditional_success_n_turn{t}), t from 1, for a one-line JSON summary."""
  out = {}
  for name, entry in summary.items():
    if not isinstance(entry, dict):
      continue
    for t, (v, (lo, hi)) in enumerate(zip(entry["value"], entry["ci"]), 1):
      out.update({f"{name}_turn{t}": v, f"{name}_lo_turn{t}": lo, f"{name}_hi_turn{t}": hi})
      if name == "conditional_success":
        out[f"{name}_n_turn{t}"] = entry["n"][t - 1]
  return out
