"""The on-device Hungarian solver and DETR matcher against scipy's linear_sum_assignment."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from jaxvision.detection.hungarian import detr_match, linear_sum_assignment

# One compiled solver for the whole file; the counter records every trace per input shape.
TRACES = collections.Counter()


def _counted(cost, valid_rows, valid_cols):
  TRACES[cost.shape] += 1
  return linear_sum_assignment(cost, valid_rows, valid_cols)


SOLVE = jax.jit(jax.vmap(_counted))
# Every masked case is embedded in one shape of batch, so the solver compiles once for them.
BATCH, N, M = 40, 30, 100


def _case(rng, rows, cols, kind):
  """A random cost [rows, cols] of one kind: integer with many ties, or float."""
  if kind == "ties":
    return rng.integers(0, 4, (rows, cols)).astype(np.float32)
  if kind == "int":
    return rng.integers(-50, 50, (rows, cols)).astype(np.float32)
  if kind == "offset":
    return (1000.0 + rng.random((rows, cols))).astype(np.float32)
  return rng.normal(size=(rows, cols)).astype(np.float32)


def _embedded_batch(rng, specs):
  """Cases scattered over random rows / columns of [N, M] matrices, with masks; the padding holds
  a very low cost that would attract any assignment that looked at it. Empty cases fill the
  batch up to BATCH."""
  specs = list(specs) + [(0, 1, "float")] * (BATCH - len(specs))
  costs = np.full((len(specs), N, M), -1e4, np.float32)
  valid_rows = np.zeros((len(specs), N), bool)
  valid_cols = np.zeros((len(specs), M), bool)
  for b, (rows, cols, kind) in enumerate(specs):
    r = np.sort(rng.choice(N, rows, replace=False))
    c = np.sort(rng.choice(M, cols, replace=False))
    costs[b][np.ix_(r, c)] = _case(rng, rows, cols, kind)
    valid_rows[b, r] = True
    valid_cols[b, c] = True
  return costs, valid_rows, valid_cols


def _check_optimal(cost, valid_rows, valid_cols, assigned):
  r = np.flatnonzero(valid_rows)
  c = np.flatnonzero(valid_cols)
  assert (assigned[~valid_rows] == -1).all(), "a padded row took a column"
  taken = assigned[r]
  assert (taken >= 0).all(), "a valid row got no column"
  assert len(np.unique(taken)) == len(taken), "two rows share a column"
  assert valid_cols[taken].all(), "a row took a padded column"
  if len(r) == 0:
    return
  sub = cost[np.ix_(r, c)].astype(np.float64)
  ri, ci = scipy_lsa(sub)
  best = sub[ri, ci].sum()
  ours = cost[r, taken].astype(np.float64).sum()
  assert ours == pytest.approx(best, rel=1e-5, abs=1e-5)


def test_matches_scipy_on_random_padded_cases():
  rng = np.random.default_rng(0)
  kinds = ("ties", "int", "offset", "float")
  # Square and rectangular problems; (30, 100) fills the whole matrix (no padding at all).
  sizes = [(1, 1), (3, 3), (10, 10), (30, 30), (1, 100), (5, 17), (20, 100), (30, 100),
           (0, 40), (12, 13)]
  specs = [(r, c, k) for r, c in sizes for k in kinds]
  costs, valid_rows, valid_cols = _embedded_batch(rng, specs)
  out = np.asarray(SOLVE(costs, valid_rows, valid_cols))
  assert len(specs) == BATCH and out.shape == (BATCH, N) and out.dtype == np.int32
  for b in range(len(specs)):
    _check_optimal(costs[b], valid_rows[b], valid_cols[b], out[b])


def test_fewer_valid_columns_than_rows_terminates():
  # Not a valid problem, but it must not hang: as many rows as valid columns get one, each
  # distinct, and the rest -1.
  rng = np.random.default_rng(2)
  costs, valid_rows, valid_cols = _embedded_batch(rng, [(8, 3, "float"), (30, 29, "ties")])
  out = np.asarray(SOLVE(costs, valid_rows, valid_cols))
  for b, n_cols in enumerate((3, 29)):
    taken = out[b][out[b] >= 0]
    assert len(taken) == n_cols and len(np.unique(taken)) == n_cols
    assert valid_cols[b][taken].all() and valid_rows[b][out[b] >= 0].all()


def test_one_trace_per_shape():
  rng = np.random.default_rng(3)
  for _ in range(3):
    costs, valid_rows, valid_cols = _embedded_batch(rng, [(4, 9, "float")] * BATCH)
    SOLVE(costs, valid_rows, valid_cols).block_until_ready()
  assert TRACES[(N, M)] == 1


def test_rejects_more_rows_than_columns():
  with pytest.raises(ValueError, match="N <= M"):
    linear_sum_assignment(jnp.zeros((5, 4)))


def _np_giou(a, b):
  """Pairwise generalized IoU of xyxy boxes a [G, 4] and b [Q, 4], in float64."""
  a, b = a[:, None, :], b[None, :, :]
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = iw * ih
  union = area(a) + area(b) - inter
  ew = np.maximum(a[..., 2], b[..., 2]) - np.minimum(a[..., 0], b[..., 0])
  eh = np.maximum(a[..., 3], b[..., 3]) - np.minimum(a[..., 1], b[..., 1])
  return inter / union - (ew * eh - union) / (ew * eh)


def _to_xyxy(b):
  return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1)


def test_detr_match_against_numpy_cost_and_scipy():
  rng = np.random.default_rng(4)
  batch, queries, classes, gts = 2, 12, 5, 4
  logits = rng.normal(size=(batch, queries, classes)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, queries, 2)),
                          rng.uniform(0.05, 0.4, (batch, queries, 2))], -1).astype(np.float32)
  gt_classes = rng.integers(0, classes - 1, (batch, gts)).astype(np.int32)
  gt_boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, gts, 2)),
                             rng.uniform(0.05, 0.4, (batch, gts, 2))], -1).astype(np.float32)
  gt_valid = np.array([[True, True, True, True], [True, False, True, False]])
  gt_boxes[~gt_valid] = 0.0  # padding as the data pipeline writes it
  out = np.asarray(jax.jit(detr_match)(logits, boxes, gt_classes, gt_boxes, gt_valid))
  assert out.shape == (batch, gts) and (out[~gt_valid] == -1).all()
  for b in range(batch):
    lg = logits[b].astype(np.float64)
    prob = np.exp(lg - lg.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    r = np.flatnonzero(gt_valid[b])
    tgt, pred = gt_boxes[b][r].astype(np.float64), boxes[b].astype(np.float64)
    cost = (-prob[:, gt_classes[b][r]].T
            + 5.0 * np.abs(tgt[:, None] - pred[None]).sum(-1)
            - 2.0 * _np_giou(_to_xyxy(tgt), _to_xyxy(pred)))
    ri, ci = scipy_lsa(cost)
    # Float costs: the optimum is unique, so the queries themselves must agree.
    np.testing.assert_array_equal(out[b][r[ri]], ci)
