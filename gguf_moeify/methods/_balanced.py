"""Exact balanced assignment and balanced k-means, shared by CMoE, MoEfication and finegrained.

Balanced assignment of n = k * m points to k clusters of exactly m points minimising the total cost is a
transportation problem: n unit supplies, k demands of m. It is solved exactly without the n x n assignment matrix
(each cluster's column replicated m times, as ``scipy.optimize.linear_sum_assignment`` needed: 1.6 GB and O(n^3)
at d_ff 14336) by successive shortest paths on the k clusters:

* cluster prices p (the LP dual): every point takes its cheapest cluster at cost + price. Whatever the loads, such
  an assignment is optimal for its own loads, which are then repaired to exactly m each;
* moving one point i from cluster x to y costs c_iy - c_ix, so the residual graph contracted onto the clusters has
  k nodes and edge x -> y of weight min over x's members of that difference (the member that attains it is the one
  to move). Reduced by the prices these weights are >= 0, so Dijkstra applies (scipy.sparse.csgraph, compiled);
* one multi-source Dijkstra from all overloaded clusters, prices lowered by the distances (Johnson), then every
  underloaded cluster's shortest path is augmented at once as long as the paths move distinct points: after the
  price update every tree edge has reduced cost 0, and moving a point along a zero-reduced-cost edge keeps it on a
  cheapest cluster, so optimality holds for the new loads. Repeated until every cluster holds m.

The end state satisfies complementary slackness with the prices: the result is an optimal solution, the same total
cost as ``linear_sum_assignment`` on the replicated matrix (tests/test_balanced.py; on ties another optimum may be
chosen). Memory O(n k); each pass O(k^2) for the graph plus O(m k) per cluster that changed. Deterministic: numpy
argmin's first index on ties, stable sorts.
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra


def balanced_assign(cost: np.ndarray, prices: np.ndarray | None = None) -> np.ndarray:
    """cost (n, k) with k | n -> labels (n,) in 0..k-1, each label exactly n/k times, total cost minimal."""
    return balanced_assign_with_prices(cost, prices)[0]


def balanced_assign_with_prices(cost: np.ndarray, prices: np.ndarray | None = None
                                ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, cluster prices) of an optimal balanced assignment. ``prices`` (k,): a start for the prices (the
    previous k-means iteration's), which only changes how much repair is needed, never the optimal cost."""
    c = np.asarray(cost, dtype=np.float64)
    n, k = c.shape
    if n % k:
        raise ValueError(f"{n} points cannot be split into {k} equal clusters")
    m = n // k
    p = np.zeros(k) if prices is None else np.array(prices, dtype=np.float64)
    if k == 1:
        return np.zeros(n, dtype=np.int64), p
    labels = (c + p).argmin(1)
    load = np.bincount(labels, minlength=k)
    graph = _MoveGraph(c, labels)
    while (load > m).any():
        over = np.flatnonzero(load > m)
        dist, pred, _ = dijkstra(graph.reduced(p), indices=over, min_only=True, return_predecessors=True)
        p -= dist
        graph.update(_augment(labels, load, m, dist, pred, graph.mover))
    return labels, p


def _augment(labels, load, m, dist, pred, mover) -> set[int]:
    """Move points along the shortest-path tree toward each underloaded cluster (nearest first), one point per
    cluster and paths with distinct points only; the clusters that changed."""
    moved = np.zeros(labels.shape[0], dtype=bool)
    changed: set[int] = set()
    under = np.flatnonzero(load < m)
    for t in under[np.argsort(dist[under], kind="stable")]:
        path, y = [], t
        while pred[y] >= 0:
            x = pred[y]
            path.append((mover[x, y], y))
            y = x
        source = y
        if load[source] <= m or any(moved[i] for i, _ in path):
            continue
        for i, dest in path:
            changed.update((labels[i], dest))
            moved[i] = True
            labels[i] = dest
        load[source] -= 1
        load[t] += 1
    return changed


class _MoveGraph:
    """Cheapest single-point move between every pair of clusters: weight[x, y] = min over x's members i of
    cost[i, y] - cost[i, x], attained by mover[x, y] (the lowest index on ties); rows recomputed for the clusters
    whose members changed."""

    def __init__(self, cost: np.ndarray, labels: np.ndarray):
        self.cost_t = np.ascontiguousarray(cost.T)     # (k, n): one cluster's members are a column slice
        self.labels = labels
        k = cost.shape[1]
        self.weight = np.full((k, k), np.inf)
        self.mover = np.zeros((k, k), dtype=np.int64)
        self._offdiag = ~np.eye(k, dtype=bool)
        self._indptr = np.arange(0, k * (k - 1) + 1, k - 1)
        self._indices = np.nonzero(self._offdiag)[1]
        self.update(range(k))

    def update(self, clusters) -> None:
        k = self.weight.shape[0]
        order = np.argsort(self.labels, kind="stable")          # members of each cluster in index order
        bounds = np.r_[0, np.cumsum(np.bincount(self.labels, minlength=k))]
        rows = np.arange(k)
        for x in clusters:
            members = order[bounds[x]:bounds[x + 1]]
            if members.size == 0:
                self.weight[x] = np.inf                          # an empty cluster has no moves out
                continue
            delta = self.cost_t[:, members] - self.cost_t[x, members]
            best = delta.argmin(1)
            self.weight[x] = delta[rows, best]
            self.mover[x] = members[best]
            self.weight[x, x] = np.inf

    def reduced(self, prices: np.ndarray) -> csr_matrix:
        """The move graph with reduced weights w + p_y - p_x (>= 0 up to rounding, clipped), every off-diagonal
        edge explicit (a zero weight is an edge for csgraph's sparse input)."""
        r = self.weight + prices[None, :] - prices[:, None]
        np.maximum(r, 0, out=r)
        k = r.shape[0]
        return csr_matrix((r[self._offdiag], self._indices, self._indptr), shape=(k, k))


def balanced_kmeans(points: np.ndarray, k: int, seed: int = 0, iters: int = 8) -> np.ndarray:
    """Balanced k-means (squared L2) on points (n, dim): k-means++ initialisation from a seeded generator, then
    alternating exact balanced assignment and centre update until the labels stop changing (at most ``iters``).
    Each assignment starts from the previous one's cluster prices. Returns labels (n,), each cluster of exactly
    n/k points."""
    pts = np.asarray(points, dtype=np.float64)
    rng = np.random.default_rng(seed)
    sq = (pts ** 2).sum(1)
    centres = pts[_kmeans_pp(pts.astype(np.float32), k, rng)]
    labels, prices = None, None
    for _ in range(iters):
        cost = sq[:, None] - 2 * pts @ centres.T + (centres ** 2).sum(1)[None, :]
        new, prices = balanced_assign_with_prices(cost, prices)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centres = _cluster_means(pts, labels, k)
    return labels


def _kmeans_pp(pts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k seeds drawn by k-means++ (each with probability proportional to its squared distance to the
    nearest seed so far). float32 points: one pass over them per seed, which is what it costs at n = 14336."""
    n = pts.shape[0]
    sq = (pts ** 2).sum(1, dtype=np.float64)
    first = int(rng.integers(n))
    seeds = [first]
    d2 = np.maximum(sq - 2 * (pts @ pts[first]) + sq[first], 0)
    for _ in range(1, k):
        total = d2.sum()
        s = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        seeds.append(s)
        d2 = np.minimum(d2, np.maximum(sq - 2 * (pts @ pts[s]) + sq[s], 0))
    return np.array(seeds)


def _cluster_means(pts: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean of each (equal-sized) cluster's points."""
    return pts[np.argsort(labels, kind="stable")].reshape(k, -1, pts.shape[1]).mean(1)


def groups(labels: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """(k, m) sorted neuron indices per cluster."""
    order = np.lexsort((idx, labels))
    return idx[order].reshape(k, -1)
