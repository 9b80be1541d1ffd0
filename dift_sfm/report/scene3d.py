"""The 3D view: the model's points and a frustum per registered camera, as a plotly figure.

Points are coloured by track length (a menu switches to reprojection error or RGB); cameras are
drawn as wire pyramids from the centre to the image corners, sized to the scene.
"""

from __future__ import annotations

import numpy as np

from .sources import SceneData, View

__all__ = ["frustum_lines", "scene_figure"]


def frustum_lines(views: list[View], scale: float) -> np.ndarray:
    """(K, 3) polyline of every frustum, NaN rows separating them (plotly draws gaps)."""
    rows = []
    for v in views:
        w, h = v.size
        corners = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], float)
        rays = corners @ np.linalg.inv(v.K).T  # camera frame, z = 1
        rays *= scale / max(np.linalg.norm(rays[:, :2], axis=1).max(), 1e-9) * 0.5
        world = rays @ v.world_from_cam.T + v.centre
        c = v.centre
        rows += [world[0], world[1], world[2], world[3], world[0], c, world[1], [np.nan] * 3,
                 c, world[2], [np.nan] * 3, c, world[3], [np.nan] * 3]
    return np.asarray(rows, np.float32).reshape(-1, 3)


def _scene_scale(data: SceneData) -> float:
    """A frustum size: the median distance of a camera to its nearest neighbour, at most 5%
    of the robust extent of cameras and points."""
    centres = np.asarray([v.centre for v in data.views], float).reshape(-1, 3)
    pts = np.r_[centres, data.xyz[:: max(1, len(data.xyz) // 5000)].astype(float)]
    if len(pts) < 2:
        return 1.0
    lo, hi = np.percentile(pts, 5, axis=0), np.percentile(pts, 95, axis=0)
    extent = float(np.linalg.norm(hi - lo))
    if len(centres) >= 2:
        sample = centres[np.linspace(0, len(centres) - 1, min(len(centres), 2000)).astype(int)]
        d = np.linalg.norm(sample[:, None] - centres[None], axis=2)
        d[d == 0] = np.inf
        spacing = float(np.median(d.min(1)))
        if np.isfinite(spacing):
            return max(min(0.05 * extent, spacing), 1e-6)
    return max(0.05 * extent, 1e-6)


def scene_figure(data: SceneData, point_size: float = 1.5) -> dict:
    """A plotly figure dict (numpy arrays are sent as typed arrays): points (trace meta
    ``points``), frusta, camera centres (meta ``cameras``: one customdata entry, the image
    name, per registered camera). Built as plain dicts: plotly's validation of 200k-point
    menus costs seconds."""
    traces: list[dict] = []
    buttons: list[dict] = []
    if len(data.xyz):
        track = data.track_length.astype(np.float32)
        # colour scales clipped at robust maxima so a few long tracks do not wash out the rest
        tmax = float(max(np.percentile(track, 98), 3))
        emax = float(max(np.percentile(data.error, 98), 1e-3))
        styles = {
            "track": dict(
                marker=dict(size=point_size, color=track.astype(int).tolist(),
                            colorscale="Viridis", reversescale=False, cmin=2, cmax=tmax,
                            showscale=True,
                            colorbar=dict(title=dict(text="track length"), thickness=12)),
                hovertemplate="track %{marker.color:.0f}<extra></extra>"),
            "error": dict(
                marker=dict(size=point_size, showscale=True,
                            color=np.round(data.error.astype(float), 2).tolist(),
                            colorscale="YlOrRd", reversescale=True, cmin=0, cmax=emax,
                            colorbar=dict(title=dict(text="reproj. error [px]"), thickness=12)),
                hovertemplate="error %{marker.color:.2f} px<extra></extra>"),
            "RGB": dict(
                marker=dict(size=point_size, showscale=False,
                            color=[f"#{r:02x}{g:02x}{b:02x}" for r, g, b in data.rgb.tolist()]),
                hovertemplate="<extra></extra>"),
        }
        first = styles["track"]
        traces.append(dict(
            type="scatter3d", mode="markers", meta="points",
            name=f"points ({len(data.xyz)} of {data.num_points})",
            x=data.xyz[:, 0].copy(), y=data.xyz[:, 1].copy(), z=data.xyz[:, 2].copy(),
            marker={**first["marker"], "color": track},
            hovertemplate=first["hovertemplate"]))
        buttons = [dict(label=label, method="restyle", args=[_flat(style), [0]])
                   for label, style in styles.items()]
    if data.views:
        lines = frustum_lines(data.views, _scene_scale(data))
        traces.append(dict(type="scatter3d", mode="lines", name="frusta", hoverinfo="skip",
                           x=lines[:, 0].copy(), y=lines[:, 1].copy(), z=lines[:, 2].copy(),
                           line=dict(color="#d62728", width=2)))
        centres = np.asarray([v.centre for v in data.views], np.float32)
        traces.append(dict(
            type="scatter3d", mode="markers", meta="cameras", name=f"cameras ({len(data.views)})",
            x=centres[:, 0].copy(), y=centres[:, 1].copy(), z=centres[:, 2].copy(),
            marker=dict(size=3, color="#d62728"), customdata=[v.name for v in data.views],
            text=[f"{v.name}<br>{v.num_points3D} points" for v in data.views],
            hovertemplate="%{text}<extra></extra>"))
    axis = dict(visible=False)
    layout = dict(
        margin=dict(l=0, r=0, t=30, b=0), legend=dict(x=0, y=1),
        scene=dict(aspectmode="data", xaxis=axis, yaxis=axis, zaxis=axis, dragmode="orbit"),
        updatemenus=[dict(type="buttons", direction="right", x=1, xanchor="right", y=1.04,
                          buttons=buttons, showactive=True)] if buttons else [])
    return {"data": traces, "layout": layout}


def _flat(style: dict) -> dict:
    """plotly restyle arguments: nested keys dotted, array values wrapped per trace."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = [value] if isinstance(value, list) else value

    walk("", style)
    return out
