"""Minimum-cost bipartite matching (the Hungarian problem) on device, and DETR's matcher.

DETR assigns every ground-truth object of an image to one of its Q predictions (queries) by
solving a linear assignment problem on a [G, Q] cost matrix. The reference implementation
copies the matrices to the host and runs `scipy.optimize.linear_sum_assignment` on each image:
a device-to-host round trip, and a Python loop, every batch. Here the assignment is solved in
pure JAX with static shapes (`lax.fori_loop` / `lax.while_loop`, no host callback), so it runs
on the device inside the jitted train step and is `jax.vmap`-able over the batch.

    linear_sum_assignment  exact minimum-cost assignment of the rows of a cost matrix [N, M]
                           (N <= M) to distinct columns, with `valid_rows` / `valid_cols`
                           masks for padding: the same optimum as scipy's
    detr_match             DETR's (Carion et al. 2020) HungarianMatcher on padded targets

The solver is the shortest-augmenting-path method with dual potentials (Jonker & Volgenant
1987; the O(N^2 M) form of the Hungarian method): rows are added one at a time, and each
addition runs a Dijkstra search over reduced costs (non-negative thanks to the potentials) from
the new row to the nearest free column, then flips the matching along that path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvision.detection.boxes import convert, pairwise_giou


def linear_sum_assignment(cost: jax.Array, valid_rows: jax.Array | None = None,
                          valid_cols: jax.Array | None = None) -> jax.Array:
  """Column int32 [N] of each row in a minimum-cost assignment of cost [N, M] (-1: invalid row).

  `valid_rows` [N] bool marks the rows to assign (padded ground truth: False rows take no
  column and get -1); `valid_cols` [M] bool the columns that may be taken. Needs at least as
  many valid columns as valid rows; a row that can reach no free valid column (too few of
  them, or infinite costs) gets -1 instead of an error.
  """
  if cost.ndim != 2:
    raise ValueError(f"linear_sum_assignment: cost must be [N, M], got shape {cost.shape}")
  n, m = cost.shape
  if n > m:
    raise ValueError(f"linear_sum_assignment: needs N <= M rows to assign, got {n} x {m} "
                     "(pass the transposed matrix)")
  if not jnp.issubdtype(cost.dtype, jnp.floating):
    cost = cost.astype(jnp.float32)
  if valid_rows is None:
    valid_rows = jnp.ones((n,), bool)
  if valid_cols is None:
    valid_cols = jnp.ones((m,), bool)
  inf = jnp.array(jnp.inf, cost.dtype)
  # Column m is a virtual column: the start of every search, "matched" to the row being added,
  # so the search and the path flip need no special case for their first step.
  start = m
  cols = jnp.arange(m + 1)
  takeable = jnp.append(valid_cols, True)

  def add_row(i, state):
    # Column potentials v, column -> row (-1: free), and the potential of the row each column
    # holds: keeping row potentials by column makes every update elementwise (no scatter).
    v, row_of, u_of = state
    # A padded row starts with no row on the virtual column: its search never runs and it
    # takes nothing, so it can never take a column from a valid row.
    row_of = row_of.at[start].set(jnp.where(valid_rows[i], i, -1))
    u_of = u_of.at[start].set(0)  # a new row's potential

    def searching(s):
      _, row_of, _, _, _, _, j0, stuck = s
      return (row_of[j0] >= 0) & ~stuck  # stop on reaching a free column

    def dijkstra_step(s):
      v, row_of, u_of, dist, prev, used, j0, _ = s
      used = used.at[j0].set(True)
      # Reduced costs from the row of the column just settled to every column.
      reduced = jnp.append(cost[row_of[j0]], inf) - u_of[j0] - v
      better = ~used & takeable & (reduced < dist)
      dist = jnp.where(better, reduced, dist)
      prev = jnp.where(better, j0, prev)
      masked = jnp.where(used, inf, dist)
      j1 = jnp.argmin(masked)
      # Nothing left in reach (no free valid column): give up on this row. A finite delta keeps
      # the potentials feasible for the rows after it.
      stuck = ~jnp.isfinite(masked[j1])
      delta = jnp.where(stuck, 0, masked[j1])
      # Shift the potentials so that the edges of the search tree keep zero reduced cost and
      # the unsettled columns' tentative distances stay relative to the new potentials.
      u_of = jnp.where(used, u_of + delta, u_of)
      v = jnp.where(used, v - delta, v)
      dist = jnp.where(used, dist, dist - delta)
      return v, row_of, u_of, dist, prev, used, j1, stuck

    init = (v, row_of, u_of, jnp.full((m + 1,), inf), jnp.full((m + 1,), start),
            jnp.zeros((m + 1,), bool), jnp.asarray(start), jnp.asarray(False))
    v, row_of, u_of, _, prev, _, j, stuck = jax.lax.while_loop(searching, dijkstra_step, init)
    j = jnp.where(stuck, start, j)  # a stuck search flips nothing

    # Flip the augmenting path: each column on it takes the row (and its potential) of its
    # predecessor, walking back from the free column to the virtual one.
    def flip(s):
      row_of, u_of, j = s
      jp = prev[j]
      return row_of.at[j].set(row_of[jp]), u_of.at[j].set(u_of[jp]), jp

    row_of, u_of, _ = jax.lax.while_loop(lambda s: s[2] != start, flip, (row_of, u_of, j))
    return v, row_of, u_of

  state = (jnp.zeros((m + 1,), cost.dtype), jnp.full((m + 1,), -1, jnp.int32),
           jnp.zeros((m + 1,), cost.dtype))
  _, row_of, _ = jax.lax.fori_loop(0, n, add_row, state)
  row_of = row_of[:m]
  # Invert column -> row into row -> column; free columns write to a dropped index.
  col_of = jnp.full((n,), -1, jnp.int32)
  return col_of.at[jnp.where(row_of >= 0, row_of, n)].set(cols[:m].astype(jnp.int32),
                                                          mode="drop")


def detr_cost(pred_logits: jax.Array, pred_boxes: jax.Array, gt_classes: jax.Array,
              gt_boxes: jax.Array, *, class_weight: float = 1.0, l1_weight: float = 5.0,
              giou_weight: float = 2.0) -> jax.Array:
  """DETR's matching cost [G, Q] of one image: ground-truth rows against query columns."""
  prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)  # [Q, K + 1]
  cost_class = -prob[:, gt_classes].T  # [G, Q]
  pred = pred_boxes.astype(jnp.float32)
  gt = gt_boxes.astype(jnp.float32)
  cost_l1 = jnp.abs(gt[:, None, :] - pred[None, :, :]).sum(-1)
  giou = pairwise_giou(convert(gt, "cxcywh", "xyxy"), convert(pred, "cxcywh", "xyxy"))
  return class_weight * cost_class + l1_weight * cost_l1 - giou_weight * giou


def detr_match(pred_logits: jax.Array, pred_boxes: jax.Array, gt_classes: jax.Array,
               gt_boxes: jax.Array, gt_valid: jax.Array, *, class_weight: float = 1.0,
               l1_weight: float = 5.0, giou_weight: float = 2.0) -> jax.Array:
  """Matched query int32 [B, G] of each padded ground-truth box (-1 for padding), as DETR's."""
  def one_image(logits, boxes, classes, targets, valid):
    cost = detr_cost(logits, boxes, classes, targets, class_weight=class_weight,
                     l1_weight=l1_weight, giou_weight=giou_weight)
    # Padded rows are never read by the solver; zeroing them keeps NaN garbage out anyway.
    cost = jnp.where(valid[:, None], cost, 0.0)
    return linear_sum_assignment(cost, valid)

  # The matching picks targets: no gradient flows through it.
  pred_logits, pred_boxes, gt_boxes = jax.lax.stop_gradient((pred_logits, pred_boxes, gt_boxes))
  return jax.vmap(one_image)(pred_logits, pred_boxes, gt_classes, gt_boxes, gt_valid)
