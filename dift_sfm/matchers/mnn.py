"""Mutual nearest neighbour matching of descriptors, chunked to bound memory.

``mutual_nearest_neighbours`` is the typed functional core; ``MNN`` is the thin matcher that a
conf's ``matcher`` section (``name: mnn``) builds, with its defaults in ``MNN.default_conf``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import cache_budget, resolve_device, resolve_flag

_NEG_INF = float("-inf")
#: distances the MNN matcher knows (``matcher.metric``; the conf bound reads this)
METRICS = ("cosine", "l2")


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, M, D) x (B, D, N) -> (B, M, N) float32; half inputs accumulate and return in fp32."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    try:  # CUDA: fp16 tensor cores, fp32 accumulation and output (no fp16 rounding of sims)
        return torch.bmm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return torch.bmm(a, b).float()


#: Columns per block when locating row maxima (similarity blocks are padded to a multiple).
_BLOCK = 64


def _row_best_two(sim: torch.Tensor, need_second: bool):
    """Per row of ``sim`` (B, R, C), C a multiple of ``_BLOCK``: the best value, the first
    column holding it, and the second best value counting ties (the best again if it occurs
    twice). Lines of -inf (padding) give -inf and index 0.

    Only value reductions and small arg-reductions: CPU ``max(dim)``/``topk`` with indices
    cost a third of the product. Rows are cut into blocks: the first block holding the
    maximum, then the first column in it. ``sim`` is modified for the second best and
    restored exactly.
    """
    bsz, rows, cols = sim.shape
    blocks = sim.view(bsz, rows, cols // _BLOCK, _BLOCK)
    block_max = blocks.amax(3)  # (B, R, C / _BLOCK)
    first, block = block_max.max(2)  # first block holding the maximum
    inner = blocks.gather(2, block[..., None, None].expand(-1, -1, 1, _BLOCK)).argmax(3)
    idx = block * _BLOCK + inner.squeeze(2)
    second = None
    if need_second:
        at = idx.unsqueeze(2)
        sim.scatter_(2, at, _NEG_INF)
        second = sim.amax(2)
        sim.scatter_(2, at, first.unsqueeze(2))  # exactly the value that was there
    return first, idx, second


def _col_best_two(sim: torch.Tensor, need_second: bool):
    """Per column of ``sim`` (B, R, C): best and second best value (counting ties), by a
    pairwise tournament of rows (elementwise max/min only)."""
    if not need_second:
        return sim.amax(1), None
    first, second = sim, None
    while first.shape[1] > 1:
        h = first.shape[1] // 2
        fa, fb = first[:, :h], first[:, h:2 * h]
        low = torch.minimum(fa, fb)
        new_second = low if second is None else torch.maximum(
            low, torch.maximum(second[:, :h], second[:, h:2 * h]))
        new_first = torch.maximum(fa, fb)
        if first.shape[1] % 2:  # odd: the last row goes on to the next round as it is
            rest = first[:, 2 * h:]
            new_first = torch.cat([new_first, rest], 1)
            new_second = torch.cat([new_second, torch.full_like(rest, _NEG_INF)
                                    if second is None else second[:, 2 * h:]], 1)
        first, second = new_first, new_second
    if second is None:
        second = torch.full_like(first, _NEG_INF)
    return first[:, 0], second[:, 0]


@torch.no_grad()
def mnn_batch(
    desc0: Sequence[torch.Tensor],
    desc1: Sequence[torch.Tensor],
    metric: str = "cosine",
    ratio_threshold: float | None = None,
    min_score: float | None = None,
    chunk: int | None = None,
    half: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mutual nearest neighbours of many pairs at once: pair b is (desc0[b], desc1[b]).

    The pairs are stacked into zero-padded (B, M0, D) / (B, M1, D) blocks on the device of the
    inputs; one batched product per ``chunk`` rows gives every pair's similarities, padding is
    masked to -inf. Each pair's result is exactly what it gets alone (B = 1) in fp32 on a
    CPU: padding only adds masked rows/columns, the blocks are the same, and scores are exact
    fp32 dot products (or distances) of the chosen pairs.

    Args:
        desc0, desc1: B tensors (N0_b, D) and (N1_b, D), same device; for 'cosine' already
            L2-normalised (``prepare_descriptors``). Any N (0 included) per pair.
        metric, ratio_threshold, min_score: as in ``mutual_nearest_neighbours``.
        chunk: rows of desc0 per product (None: ``default_chunk``); memory is
            O(B * chunk * max N1).
        half: multiply in float16 (CUDA tensor cores, fp32 accumulation); decisions then rest
            on fp16-rounded descriptors.

    Returns:
        per pair, matches0 (N0_b,) int64 (index into desc1[b] or -1) and scores0 (N0_b,)
        float32 (cosine similarity, or exp(-L2 distance); 0 where unmatched).
    """
    if metric not in METRICS:
        raise ValueError(f"Unknown metric '{metric}', expected one of {', '.join(METRICS)}.")
    if len(desc0) != len(desc1):
        raise ValueError(f"{len(desc0)} desc0 blocks but {len(desc1)} desc1 blocks.")
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(desc0)
    live = []
    for b, (d0, d1) in enumerate(zip(desc0, desc1, strict=True)):
        if d0.shape[-1] != d1.shape[-1]:
            raise ValueError(f"Descriptor sizes differ: {d0.shape[-1]} vs {d1.shape[-1]}.")
        if len(d0) == 0 or len(d1) == 0:
            results[b] = (np.full(len(d0), -1, np.int64), np.zeros(len(d0), np.float32))
        else:
            live.append(b)
    if not live:
        return results  # type: ignore[return-value]
    d0s, d1s = [desc0[b].float() for b in live], [desc1[b].float() for b in live]
    device = d0s[0].device
    len0, len1 = [len(d) for d in d0s], [len(d) for d in d1s]  # host-side: no device sync
    n0 = torch.tensor(len0, device=device)
    n1 = torch.tensor(len1, device=device)
    bsz, m0, m1, dim = len(live), max(len0), max(len1), d0s[0].shape[1]
    m1 = -(-m1 // _BLOCK) * _BLOCK  # padded columns are masked
    p0 = d0s[0].new_zeros((bsz, m0, dim))
    p1 = d0s[0].new_zeros((bsz, m1, dim))
    for b in range(bsz):
        p0[b, :len(d0s[b])] = d0s[b]
        p1[b, :len(d1s[b])] = d1s[b]
    q0, q1t = (p0.half(), p1.half().transpose(1, 2)) if half else (p0, p1.transpose(1, 2))
    ar0, ar1 = torch.arange(m0, device=device), torch.arange(m1, device=device)
    rows_ok = ar0[None] < n0[:, None]  # (B, M0)
    # additive masks: 0 on real entries (x + 0 == x exactly), -inf on padding
    col_bias = torch.zeros((bsz, 1, m1), device=device).masked_fill_(
        (ar1[None] >= n1[:, None])[:, None], _NEG_INF) if min(len1) < m1 else None
    row_bias = torch.zeros((bsz, m0, 1), device=device).masked_fill_(
        ~rows_ok[..., None], _NEG_INF) if min(len0) < m0 else None
    if metric == "l2":
        sq0, sq1 = (p0 * p0).sum(2), (p1 * p1).sum(2)
    need_second = ratio_threshold is not None
    chunk = chunk or default_chunk(device, bsz, m1)

    best0, nn01, second0 = [], [], []
    colf = torch.full((bsz, m1), _NEG_INF, device=device)
    cols = torch.full((bsz, m1), _NEG_INF, device=device) if need_second else None
    for s in range(0, m0, chunk):
        e = min(m0, s + chunk)
        sim = _bmm(q0[:, s:e], q1t)  # (B, c, M1)
        if metric == "l2":  # -(|a|^2 + |b|^2 - 2 a.b): -squared distance without the sqrt
            sim.mul_(2).sub_(sq0[:, s:e, None]).sub_(sq1[:, None])
        if col_bias is not None:
            sim.add_(col_bias)
        if row_bias is not None:
            sim.add_(row_bias[:, s:e])
        # rows: best value, its first column, second best
        rf, ri, rs = _row_best_two(sim, need_second)
        best0.append(rf)
        nn01.append(ri)
        second0.append(rs)
        # columns: merge this chunk's best two into the running best two
        cf, cs = _col_best_two(sim, need_second)
        if need_second:
            cols = torch.maximum(torch.minimum(colf, cf), torch.maximum(cols, cs))
        colf = torch.maximum(colf, cf)
        del sim

    best = torch.cat(best0, 1)
    nn = torch.cat(nn01, 1)
    keep = rows_ok & (best == colf.gather(1, nn))  # row i is a best row of its best column
    # a column claimed by several rows (exact ties) keeps the first one
    claim = torch.full((bsz * m1,), m0, dtype=torch.long, device=device)
    flat = (torch.arange(bsz, device=device)[:, None] * m1 + nn)[keep]
    claim.scatter_reduce_(0, flat, ar0.expand(bsz, m0)[keep], "amin")
    keep &= claim.view(bsz, m1).gather(1, nn) == ar0[None]

    def dist(sim: torch.Tensor) -> torch.Tensor:
        if metric == "cosine":
            return (2 - 2 * sim).clamp_min(0).sqrt()
        return (-sim).clamp_min(0).sqrt()

    nn_desc = p1.gather(1, nn[..., None].expand(-1, -1, dim))
    # exact fp32 scores of the chosen pairs, whatever the product's precision and blocking
    best = -((p0 - nn_desc) ** 2).sum(2) if metric == "l2" else (p0 * nn_desc).sum(2)
    if need_second:
        second = torch.cat(second0, 1)
        keep &= dist(best) < ratio_threshold * dist(second)
        keep &= (dist(colf) < ratio_threshold * dist(cols)).gather(1, nn)
    if min_score is not None:
        keep &= best >= min_score if metric == "cosine" else dist(best) <= min_score
    score = best if metric == "cosine" else torch.exp(-dist(best))
    # one device-to-host copy per batch: indices (< 2^31) and the scores' bits as int32
    packed = torch.stack([torch.where(keep, nn, -1).to(torch.int32),
                          torch.where(keep, score.float(), 0.0).view(torch.int32)]).cpu().numpy()
    nn_np, score_np = packed[0], packed[1].view(np.float32)
    for b, i in enumerate(live):
        k = len0[b]
        results[i] = (nn_np[b, :k].astype(np.int64), score_np[b, :k].copy())
    return results  # type: ignore[return-value]


def default_chunk(device: torch.device | str, pairs: int, n1: int) -> int:
    """Rows per product: ~64M similarities per batch on GPUs; on CPUs a block of one pair
    that stays in cache (the same whatever the batch, so batching changes no bit)."""
    if torch.device(device).type == "cuda":
        return max(16, 2**26 // max(1, pairs * n1))
    return max(16, 2**18 // max(1, n1))


def prepare_descriptors(desc: np.ndarray | torch.Tensor, metric: str,
                        device: str | torch.device | None = None) -> torch.Tensor:
    """(N, D) descriptors as the float32 tensor ``mnn_batch`` takes: on ``device``,
    L2-normalised for 'cosine'."""
    d = torch.as_tensor(np.asarray(desc) if not torch.is_tensor(desc) else desc)
    if device is not None:
        d = d.to(device)
    d = d.float()
    if metric == "cosine" and len(d):
        d = F.normalize(d, dim=1)
    return d


def mutual_nearest_neighbours(
    desc0: np.ndarray | torch.Tensor,
    desc1: np.ndarray | torch.Tensor,
    metric: str = "cosine",
    ratio_threshold: float | None = None,
    min_score: float | None = None,
    chunk: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours between descriptor sets (N0, D) and (N1, D).

    Args:
        metric: 'cosine' (rows are L2-normalised first) or 'l2' (Euclidean distance).
        ratio_threshold: Lowe's ratio test on distances (kept if d1st < ratio * d2nd), both ways.
        min_score: minimum cosine similarity ('cosine') or maximum distance ('l2').
        chunk: rows per similarity block (None: a cache-sized block); memory is
            O(chunk * N1), never N0 * N1.
        device: where to compute ('cuda' for GPU); default: where desc0 lives.

    Returns:
        matches0: (N0,) int64, index into desc1 or -1.
        scores0: (N0,) float32, cosine similarity (cosine) or exp(-distance) (l2), 0 if unmatched.

    Ties (equal similarities) go to the lowest index. This is ``mnn_batch`` with one pair.
    """
    d0 = torch.as_tensor(np.asarray(desc0) if not torch.is_tensor(desc0) else desc0)
    device = device if device is not None else d0.device
    d0 = prepare_descriptors(d0, metric, device)
    d1 = prepare_descriptors(desc1, metric, device)
    if d0.ndim != 2 or d1.ndim != 2:
        raise ValueError(f"Descriptors must be (N, D), got {tuple(d0.shape)} and "
                         f"{tuple(d1.shape)}.")
    return mnn_batch([d0], [d1], metric, ratio_threshold, min_score, chunk)[0]


class MNN:
    """Mutual nearest neighbour matcher (conf ``matcher.name: mnn``).

    Conf fields: ``metric`` ('cosine' | 'l2'), ``ratio_threshold`` (Lowe's ratio, both ways, or
    None), ``min_score`` (minimum cosine similarity / maximum L2 distance, or None), ``device``
    ('auto': CUDA when available), ``pair_batch`` (pairs per batched product; 'auto': 32 on
    CUDA, 1 elsewhere, where batching gains nothing), ``prefetch`` (pairs whose descriptors
    are read ahead), ``fp16`` ('auto': on CUDA; products in float16 with fp32 accumulation,
    scores still exact fp32; false: fp32 everywhere, bit-identical to one pair at a time on
    CPUs), ``cache_mb`` (MiB of prepared descriptors kept resident on the device between pairs;
    'auto': 40% of the free CUDA memory at the start of a run, elsewhere 25% of the available
    RAM, 2 GiB if unknown; never less than one batch of pairs needs). Like ``pair_batch`` and
    ``prefetch``, ``cache_mb`` changes speed only: a matches file resumes across its values.
    """

    default_conf: dict = {"name": "mnn", "metric": "cosine", "ratio_threshold": None,
                          "min_score": None, "device": "auto", "pair_batch": "auto",
                          "prefetch": 256, "fp16": "auto", "cache_mb": "auto"}

    def __init__(self, conf: dict | None = None):
        self.conf = {**self.default_conf, **(conf or {})}
        if self.conf["metric"] not in METRICS:
            raise ValueError(f"Unknown metric '{self.conf['metric']}', expected one of "
                             f"{', '.join(METRICS)}.")
        self.device = resolve_device(self.conf["device"])
        cuda = self.device.type == "cuda"
        batch = self.conf["pair_batch"]
        self.pair_batch = max(1, int(32 if cuda else 1) if batch in (None, "auto") else int(batch))
        self.half = resolve_flag(self.conf["fp16"], self.device)
        if self.conf["cache_mb"] not in (None, "auto"):
            cache_budget(self.conf["cache_mb"], "cpu")  # refuse a bad value now, not mid-run

    def __call__(self, desc0: np.ndarray | torch.Tensor,
                 desc1: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Match (N0, D) against (N1, D): (matches0 (N0,) int64 or -1, scores0 (N0,) float32)."""
        return self.match_prepared([self.prepare(desc0)], [self.prepare(desc1)])[0]

    def cache_bytes(self) -> int:
        """The descriptor cache budget in bytes (``cache_mb``; 'auto' measured now)."""
        return cache_budget(self.conf["cache_mb"], self.device)

    def prepare(self, desc: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, D) descriptors as a float32 tensor on the matcher's device, normalised for
        cosine: what ``match_prepared`` takes (keep it to match the image again)."""
        return prepare_descriptors(desc, self.conf["metric"], self.device)

    def match_prepared(self, desc0: Sequence[torch.Tensor], desc1: Sequence[torch.Tensor]
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Match pair b = (desc0[b], desc1[b]) for every b, in one batched computation."""
        c = self.conf
        return mnn_batch(desc0, desc1, metric=c["metric"], ratio_threshold=c["ratio_threshold"],
                         min_score=c["min_score"], half=self.half and self.device.type != "cpu")
