"""Mutual nearest neighbour matching of descriptors, chunked to bound memory."""

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


def _best_two(d0: torch.Tensor, d1: torch.Tensor, metric: str, chunk: int,
              need_second: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For each row of d0: best similarity, its index in d1, and the second best (optional)."""
    best, idx, second = [], [], []
    k = 2 if need_second and d1.shape[0] > 1 else 1
    for start in range(0, d0.shape[0], chunk):
        sim = _similarity(d0[start:start + chunk], d1, metric)
        top = sim.topk(k, dim=1)
        best.append(top.values[:, 0])
        idx.append(top.indices[:, 0])
        if need_second:
            second.append(top.values[:, 1] if k == 2 else torch.full_like(top.values[:, 0],
                                                                         -float("inf")))
    return torch.cat(best), torch.cat(idx), (torch.cat(second) if need_second else None)


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
    best0, nn01, second0 = _best_two(d0, d1, metric, chunk, need_second)
    best1, nn10, second1 = _best_two(d1, d0, metric, chunk, need_second)

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


def dense_mutual_nearest_neighbours(desc0: np.ndarray, desc1: np.ndarray) -> np.ndarray:
    """Reference MNN with the full (N0, N1) similarity matrix in memory (for tests/benchmarks)."""
    d0 = F.normalize(torch.as_tensor(desc0).float(), dim=1)
    d1 = F.normalize(torch.as_tensor(desc1).float(), dim=1)
    sim = d0 @ d1.T
    nn01, nn10 = sim.argmax(1), sim.argmax(0)
    mutual = nn10[nn01] == torch.arange(len(d0))
    return torch.where(mutual, nn01, torch.full_like(nn01, -1)).numpy()
