"""Mutual nearest neighbour matching of descriptors, chunked to bound memory.

``mutual_nearest_neighbours`` is the typed functional core; ``MNN`` is the thin matcher that a
conf's ``matcher`` section (``name: mnn``) builds, with its defaults in ``MNN.default_conf``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _similarity(d0: torch.Tensor, d1: torch.Tensor, metric: str) -> torch.Tensor:
    """Similarity of rows (higher is better): cosine, or negative squared L2 distance."""
    sim = d0 @ d1.T
    if metric == "l2":
        # -(|a|^2 + |b|^2 - 2 a.b): the ordering of -distance without the sqrt.
        sim = 2 * sim - (d0 * d0).sum(1, keepdim=True) - (d1 * d1).sum(1)[None]
    return sim


def _top2_merge(vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor,
                new_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two (k, M) top-k lists into the top-k of their union, per column."""
    v = torch.cat([vals, new_vals])
    i = torch.cat([idx, new_idx])
    top = v.topk(vals.shape[0], dim=0)
    return top.values, i.gather(0, top.indices)


def _nearest_both_ways(d0: torch.Tensor, d1: torch.Tensor, metric: str, chunk: int, k: int):
    """Top-k similarities of every row of d0 in d1 and of every row of d1 in d0, in one pass.

    The (N0, N1) similarity is computed once, ``chunk`` rows at a time; the column-wise top-k
    is merged across chunks. Returns (vals01 (k, N0), idx01, vals10 (k, N1), idx10).
    """
    n1 = d1.shape[0]
    vals01, idx01 = [], []
    vals10 = torch.full((k, n1), -float("inf"), device=d0.device)
    idx10 = torch.zeros((k, n1), dtype=torch.long, device=d0.device)
    for start in range(0, d0.shape[0], chunk):
        sim = _similarity(d0[start:start + chunk], d1, metric)
        kr = min(k, sim.shape[1])
        top = sim.topk(kr, dim=1)
        vals01.append(top.values.T)
        idx01.append(top.indices.T)
        kc = min(k, sim.shape[0])
        col = sim.topk(kc, dim=0)
        if kc < k:
            pad = torch.full((k - kc, n1), -float("inf"), device=d0.device)
            col_vals = torch.cat([col.values, pad])
            col_idx = torch.cat([col.indices, torch.zeros_like(pad, dtype=torch.long)])
        else:
            col_vals, col_idx = col.values, col.indices
        vals10, idx10 = _top2_merge(vals10, idx10, col_vals, col_idx + start)
    return torch.cat(vals01, 1), torch.cat(idx01, 1), vals10, idx10


def mutual_nearest_neighbours(
    desc0: np.ndarray | torch.Tensor,
    desc1: np.ndarray | torch.Tensor,
    metric: str = "cosine",
    ratio_threshold: float | None = None,
    min_score: float | None = None,
    chunk: int = 2048,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours between descriptor sets (N0, D) and (N1, D).

    Args:
        metric: 'cosine' (rows are L2-normalised first) or 'l2' (Euclidean distance).
        ratio_threshold: Lowe's ratio test on distances (kept if d1st < ratio * d2nd), both ways.
        min_score: minimum cosine similarity ('cosine') or maximum distance ('l2').
        chunk: rows per similarity block; memory is O(chunk * max(N0, N1)), never N0 * N1.
        device: where to compute ('cuda' for GPU); default: where desc0 lives.

    Returns:
        matches0: (N0,) int64, index into desc1 or -1.
        scores0: (N0,) float32, cosine similarity (cosine) or exp(-distance) (l2), 0 if unmatched.
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"Unknown metric '{metric}', expected 'cosine' or 'l2'.")
    d0 = torch.as_tensor(np.asarray(desc0) if not torch.is_tensor(desc0) else desc0)
    d1 = torch.as_tensor(np.asarray(desc1) if not torch.is_tensor(desc1) else desc1)
    if device is not None:
        d0, d1 = d0.to(device), d1.to(device)
    d0, d1 = d0.float(), d1.float()
    n0, n1 = d0.shape[0], d1.shape[0]
    matches0 = np.full(n0, -1, np.int64)
    scores0 = np.zeros(n0, np.float32)
    if n0 == 0 or n1 == 0:
        return matches0, scores0
    if d0.shape[1] != d1.shape[1]:
        raise ValueError(f"Descriptor sizes differ: {d0.shape[1]} vs {d1.shape[1]}.")
    if metric == "cosine":
        d0, d1 = F.normalize(d0, dim=1), F.normalize(d1, dim=1)
    need_second = ratio_threshold is not None
    k = 2 if need_second else 1
    vals01, idx01, vals10, idx10 = _nearest_both_ways(d0, d1, metric, chunk, k)
    best0, nn01, best1, nn10 = vals01[0], idx01[0], vals10[0], idx10[0]
    inf = torch.tensor(-float("inf"), device=d0.device)
    second0 = vals01[1] if vals01.shape[0] > 1 else inf.expand(n0)
    second1 = vals10[1] if need_second else None

    ar = torch.arange(n0, device=d0.device)
    keep = nn10[nn01] == ar

    def dist(sim: torch.Tensor) -> torch.Tensor:
        if metric == "cosine":
            return (2 - 2 * sim).clamp_min(0).sqrt()
        return (-sim).clamp_min(0).sqrt()

    if metric == "l2":  # exact distances of the chosen pairs (the expansion loses precision)
        best0 = -((d0 - d1[nn01]) ** 2).sum(1)
    if need_second:
        keep &= dist(best0) < ratio_threshold * dist(second0)
        keep &= (dist(best1) < ratio_threshold * dist(second1))[nn01]
    if min_score is not None:
        keep &= best0 >= min_score if metric == "cosine" else dist(best0) <= min_score
    score = best0 if metric == "cosine" else torch.exp(-dist(best0))
    keep_np = keep.cpu().numpy()
    matches0[keep_np] = nn01.cpu().numpy()[keep_np]
    scores0[keep_np] = score.cpu().numpy()[keep_np]
    return matches0, scores0


class MNN:
    """Mutual nearest neighbour matcher (conf ``matcher.name: mnn``).

    Conf fields: ``metric`` ('cosine' | 'l2'), ``ratio_threshold`` (Lowe's ratio, both ways, or
    None), ``min_score`` (minimum cosine similarity / maximum L2 distance, or None), ``device``
    ('auto': CUDA when available).
    """

    default_conf: dict = {"name": "mnn", "metric": "cosine", "ratio_threshold": None,
                          "min_score": None, "device": "auto"}

    def __init__(self, conf: dict | None = None):
        self.conf = {**self.default_conf, **(conf or {})}
        if self.conf["metric"] not in ("cosine", "l2"):
            raise ValueError(f"Unknown metric '{self.conf['metric']}', expected 'cosine' or 'l2'.")
        from ..featurizers.base import resolve_device

        self.device = resolve_device(self.conf["device"])

    def __call__(self, desc0: np.ndarray | torch.Tensor,
                 desc1: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Match (N0, D) against (N1, D): (matches0 (N0,) int64 or -1, scores0 (N0,) float32)."""
        c = self.conf
        return mutual_nearest_neighbours(desc0, desc1, metric=c["metric"],
                                         ratio_threshold=c["ratio_threshold"],
                                         min_score=c["min_score"], device=self.device)
