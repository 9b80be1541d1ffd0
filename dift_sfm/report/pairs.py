"""The pair browser: a handful of pairs drawn as two JPEG thumbnails with their matches.

Chosen pairs: the best, median and worst verified pairs by inliers, and the pairs that touch
an unregistered image (its best few by inliers, then raw matches). Thumbnails are base64
JPEGs (longer side ``thumb_size``), each image stored once; the page draws the match lines
(inliers green, outliers red) as SVG over them from thumbnail coordinates.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..geometry import scale_pixel_coords
from .html import esc, script_json
from .sources import PairStat, SceneData

logger = logging.getLogger("dift_sfm")

__all__ = ["PairView", "pair_browser", "select_pairs", "thumbnail"]


@dataclass
class PairView:
    """A pair to draw and why it was chosen."""

    pair: PairStat
    label: str


def select_pairs(data: SceneData, per_rank: int = 2, per_unregistered: int = 3,
                 max_unregistered: int = 48) -> list[PairView]:
    """Best / median / worst ``per_rank`` verified pairs, then up to ``per_unregistered``
    matched pairs of each unregistered image (``max_unregistered`` in all)."""
    chosen: dict[tuple[str, str], PairView] = {}
    ranked = sorted((p for p in data.pairs if p.verified),
                    key=lambda p: (-p.num_inliers, p.name0, p.name1))
    if ranked:
        mid = len(ranked) // 2
        picks = [("best", ranked[:per_rank]),
                 ("median", ranked[max(0, mid - per_rank // 2):][:per_rank]),
                 ("worst", ranked[-per_rank:][::-1])]
        for label, pairs in picks:
            for p in pairs:
                chosen.setdefault((p.name0, p.name1), PairView(p, f"{label} by inliers"))
    by_image: dict[str, list[PairStat]] = {}
    for p in data.pairs:
        if p.num_matches > 0:
            for n in (p.name0, p.name1):
                if n in data.reasons:
                    by_image.setdefault(n, []).append(p)
    count = 0
    for name in sorted(by_image):
        pairs = sorted(by_image[name], key=lambda p: (-p.num_inliers, -p.num_matches))
        for p in pairs[:per_unregistered]:
            if count >= max_unregistered:
                break
            if (p.name0, p.name1) not in chosen:
                chosen[(p.name0, p.name1)] = PairView(p, f"not registered: {name}")
                count += 1
    return list(chosen.values())


def thumbnail(path: Path, size: tuple[int, int], thumb_size: int = 300,
              quality: int = 80) -> tuple[str, tuple[int, int]]:
    """(base64 JPEG, (w, h)) of an image whose full size is ``size`` = (W, H), longer side
    ``thumb_size``; EXIF orientation ignored, like the keypoints."""
    W, H = size
    r = min(1.0, thumb_size / max(W, H))
    tw, th = max(1, round(W * r)), max(1, round(H * r))
    reduce = 1
    for k in (8, 4, 2):
        if max(W, H) / k >= 2 * thumb_size:
            reduce = k
            break
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[reduce] | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.fromfile(path, np.uint8), flags)
    if image is None:
        raise OSError(f"could not decode {path}")
    image = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"could not encode a thumbnail of {path}")
    return base64.b64encode(jpeg.tobytes()).decode("ascii"), (tw, th)


def _even(idx: np.ndarray, k: int) -> np.ndarray:
    return idx if len(idx) <= k else idx[np.linspace(0, len(idx) - 1, k).astype(int)]


def pair_browser(data: SceneData, views: list[PairView], image_dir: Path | None,
                 thumb_size: int = 300, max_lines: int = 150) -> tuple[str, str]:
    """(HTML of the pair browser, JS that draws it). At most ``max_lines`` inliers and as many
    outliers are drawn per pair (even subsamples; the counts say how many there are)."""
    source = data.pair_source
    thumbs: dict[str, dict] = {}
    records, cards = [], []
    for i, view in enumerate(views):
        p = view.pair
        try:
            kp0, kp1, m, inl = source.pair(p.name0, p.name1)
            sizes = []
            for name in (p.name0, p.name1):
                full = source.image_size(name)
                if name not in thumbs:
                    entry: dict = {"size": full}
                    if image_dir is not None:
                        try:
                            entry["jpeg"], entry["thumb"] = thumbnail(image_dir / name, full,
                                                                      thumb_size)
                        except OSError as err:
                            logger.warning("Report: no thumbnail of %s: %s", name, err)
                    if "thumb" not in entry:
                        r = min(1.0, thumb_size / max(full))
                        entry["thumb"] = (max(1, round(full[0] * r)), max(1, round(full[1] * r)))
                    thumbs[name] = entry
                sizes.append(thumbs[name]["thumb"])
        except Exception as err:  # one unreadable pair must not cost the others
            logger.warning("Report: pair %s %s not drawn: %s", p.name0, p.name1, err)
            continue
        s0 = np.divide(sizes[0], source.image_size(p.name0))
        s1 = np.divide(sizes[1], source.image_size(p.name1))
        keep = np.r_[_even(np.flatnonzero(inl), max_lines), _even(np.flatnonzero(~inl),
                                                                     max_lines)].astype(int)
        xy0 = scale_pixel_coords(kp0[m[keep, 0]].astype(np.float64), s0)
        xy1 = scale_pixel_coords(kp1[m[keep, 1]].astype(np.float64), s1)
        lines = np.c_[xy0, xy1].round(1)
        records.append({"a": p.name0, "b": p.name1, "id": f"pair{i}",
                        "xy": lines.ravel().tolist(), "inl": inl[keep].astype(int).tolist()})
        bad, sub = view.label.startswith("not registered"), len(keep) < len(m)
        cards.append(
            f'<figure class=pair id="pair{i}" data-a="{esc(p.name0)}" data-b="{esc(p.name1)}">'
            f'<div class=view></div><figcaption><span class="tag{" bad" if bad else ""}">'
            f'{esc(view.label)}</span><b>{esc(p.name0)}</b> &ndash; <b>{esc(p.name1)}</b>: '
            f'{len(m)} matches, <span style="color:#1a8f1a">{int(inl.sum())} inliers</span>, '
            f'<span style="color:#c22">{len(m) - int(inl.sum())} outliers</span> '
            f'({len(kp0)} / {len(kp1)} keypoints{"; lines subsampled" if sub else ""})'
            "</figcaption></figure>")
    thumb_js = {n: {"src": ("data:image/jpeg;base64," + e["jpeg"]) if "jpeg" in e else None,
                    "w": e["thumb"][0], "h": e["thumb"][1]} for n, e in thumbs.items()}
    controls = ("<p><label><input type=checkbox id=show-in checked> inliers (green)</label> "
                "<label><input type=checkbox id=show-out checked> outliers (red)</label> "
                f"<span class=muted>inliers: {esc(data.inlier_source)}</span></p>")
    html = controls + f"<div class=pairs>{''.join(cards)}</div>" if cards else (
        "<p class=muted>No matched pairs to show.</p>")
    js = f"window.__thumbs={script_json(thumb_js)};window.__pairs={script_json(records)};" \
         + _PAIR_JS
    return html, js


_PAIR_JS = """
(function(){
 var NS='http://www.w3.org/2000/svg',drawn=0,gap=6;
 function img(t){var e;if(t.src){e=document.createElement('img');e.src=t.src;}
  else{e=document.createElement('div');e.style.background='#ccc';e.style.display='inline-block';}
  e.style.width=t.w+'px';e.style.height=t.h+'px';return e;}
 window.__pairs.forEach(function(p){
  var fig=document.getElementById(p.id),view=fig.querySelector('.view');
  var t0=window.__thumbs[p.a],t1=window.__thumbs[p.b];
  var i0=img(t0),i1=img(t1);i1.style.marginLeft=gap+'px';view.appendChild(i0);view.appendChild(i1);
  var svg=document.createElementNS(NS,'svg'),w=t0.w+gap+t1.w,h=Math.max(t0.h,t1.h);
  svg.setAttribute('width',w);svg.setAttribute('height',h);
  for(var k=0;k<p.inl.length;k++){var l=document.createElementNS(NS,'line'),q=4*k;
   l.setAttribute('x1',p.xy[q]+0.5);l.setAttribute('y1',p.xy[q+1]+0.5);
   l.setAttribute('x2',p.xy[q+2]+0.5+t0.w+gap);l.setAttribute('y2',p.xy[q+3]+0.5);
   l.setAttribute('class',p.inl[k]?'in':'out');
   l.setAttribute('stroke',p.inl[k]?'#1fbf1f':'#e0302a');l.setAttribute('stroke-width','0.8');
   l.setAttribute('stroke-opacity',p.inl[k]?'0.85':'0.6');svg.appendChild(l);}
  view.appendChild(svg);drawn++;fig.dataset.lines=p.inl.length;});
 document.body.dataset.pairs=drawn;
 function toggle(id,cls){var box=document.getElementById(id);if(!box)return;
  box.addEventListener('change',function(){document.querySelectorAll('.pair line.'+cls)
   .forEach(function(l){l.style.display=box.checked?'':'none';});});}
 toggle('show-in','in');toggle('show-out','out');
})();
"""
