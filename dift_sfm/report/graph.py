"""The match graph: images as nodes, verified pairs as edges (wider and darker: more inliers).

Registered images sit where their cameras are, seen along the direction in which the camera
centres spread least (their two principal axes); unregistered images sit on a ring around
them, in red, with the reason in their hover text.
"""

from __future__ import annotations

import numpy as np

from .sources import SceneData

__all__ = ["graph_figure", "node_positions"]


def node_positions(data: SceneData) -> dict[str, np.ndarray]:
    """name -> (2,) position of every image of ``data.names`` and ``data.reasons``."""
    pos: dict[str, np.ndarray] = {}
    if data.views:
        centres = np.asarray([v.centre for v in data.views], float)
        mean = centres.mean(0)
        if len(centres) >= 3:
            _, _, vt = np.linalg.svd(centres - mean, full_matrices=False)
            xy = (centres - mean) @ vt[:2].T
        else:
            xy = np.c_[np.arange(len(centres), dtype=float), np.zeros(len(centres))]
        xy /= max(np.abs(xy).max(), 1e-9)
        pos.update({v.name: xy[i] for i, v in enumerate(data.views)})
    others = [n for n in dict.fromkeys([*data.names, *data.reasons]) if n not in pos]
    for i, name in enumerate(others):
        a = 2 * np.pi * i / max(len(others), 1)
        pos[name] = np.array([1.25 * np.cos(a), 1.25 * np.sin(a)])
    return pos


def graph_figure(data: SceneData, max_edges: int = 20_000):
    """A plotly figure of the verified pairs (at most ``max_edges``, the strongest); node trace
    meta ``graph_nodes`` (one customdata entry per image)."""
    import plotly.graph_objects as go

    pos = node_positions(data)
    verified = sorted((p for p in data.pairs if p.verified), key=lambda p: -p.num_inliers)
    shown = verified[:max_edges]
    fig = go.Figure()
    if shown:
        inl = np.array([p.num_inliers for p in shown], float)
        edges = np.quantile(inl, [0.25, 0.5, 0.75]) if len(inl) > 3 else np.array([])
        bucket = np.searchsorted(edges, inl, side="right")
        shades = ["#c6dbef", "#6baed6", "#2171b5", "#08306b"]
        for b in range(4):
            sel = [p for p, k in zip(shown, bucket, strict=True) if k == b]
            if not sel:
                continue
            xy = np.full((3 * len(sel), 2), np.nan, np.float32)
            xy[0::3] = [pos[p.name0] for p in sel]
            xy[1::3] = [pos[p.name1] for p in sel]
            lo, hi = min(p.num_inliers for p in sel), max(p.num_inliers for p in sel)
            fig.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="lines", hoverinfo="skip",
                                     line=dict(width=0.6 + 0.9 * b, color=shades[b]),
                                     name=f"{lo}-{hi} inliers ({len(sel)} pairs)"))
    degree: dict[str, int] = {}
    best: dict[str, int] = {}
    for p in verified:
        for n in (p.name0, p.name1):
            degree[n] = degree.get(n, 0) + 1
            best[n] = max(best.get(n, 0), p.num_inliers)
    names = list(pos)
    xy = np.asarray([pos[n] for n in names], np.float32)
    registered = data.registered
    colours = ["#2ca02c" if n in registered else "#d62728" for n in names]
    text = [f"{n}<br>{degree.get(n, 0)} verified pairs, best {best.get(n, 0)} inliers"
            + ("" if n in registered else f"<br>not registered: {data.reasons.get(n, '?')}")
            for n in names]
    size = [5 + min(10, 2 * np.sqrt(degree.get(n, 0))) for n in names]
    scatter = go.Scatter if len(names) <= 5000 else go.Scattergl  # SVG while it stays fast
    fig.add_trace(scatter(
        x=xy[:, 0], y=xy[:, 1], mode="markers", meta="graph_nodes", customdata=names, text=text,
        hovertemplate="%{text}<extra></extra>", name="images (red: not registered)",
        marker=dict(size=size, color=colours, line=dict(width=0.5, color="#333"))))
    title = (f"{len(verified)} verified pairs" + (f" (strongest {len(shown)} drawn)"
                                                    if len(shown) < len(verified) else ""))
    fig.update_layout(title=dict(text=title, x=0.01), margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(visible=False), plot_bgcolor="#fff",
                      yaxis=dict(visible=False, scaleanchor="x"), legend=dict(x=1, xanchor="right"))
    return fig
