"""The page shell of every report: one self-contained HTML file (no network, no CDN).

plotly.js is inlined once per page; figures are plotly figure dicts drawn by the page's own
script. The script records what it drew in ``data-*`` attributes of ``<body>`` (figures,
cameras, pairs, errors), so a headless browser (and the tests) can check the rendered page.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Page", "esc", "script_json", "table"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1400px;
 padding:0 18px 40px;color:#1d2330;background:#fafbfc}
h1{font-size:1.5em;margin:18px 0 4px}
h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #dde}
nav a{margin-right:14px}.muted{color:#667}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #d6d9e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef0f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.fig{width:100%;height:640px;background:#fff;border:1px solid #e3e5ea}
.fig.small{height:420px}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:10px;margin-top:10px}.pairs{display:flex;flex-wrap:wrap;gap:14px}
.pair{background:#fff;border:1px solid #dde;padding:6px;margin:0}
.pair figcaption{font-size:.85em;width:0;min-width:100%}
.pair .view{position:relative;display:inline-block}
.pair img{display:inline-block;vertical-align:top}.pair svg{position:absolute;left:0;top:0}
.tag{display:inline-block;font-size:.75em;padding:0 5px;border-radius:3px;background:#e6e9f2;
 margin-right:4px}
.tag.bad{background:#fbd9d9}.scroll{max-height:480px;overflow:auto;display:inline-block}
.err{color:#a00}
"""

# Runs first: counts script errors and console.error calls into <body data-errors>.
_ERROR_HOOK = """
window.__reportErrors=[];
function __noteError(m){window.__reportErrors.push(String(m));
 if(document.body){document.body.dataset.errors=window.__reportErrors.length;}}
window.addEventListener('error',function(e){__noteError(e.message);});
(function(){var ce=console.error;console.error=function(){__noteError([].join.call(arguments,' '));
 return ce.apply(console,arguments);};})();
"""

# Draws every figure of window.__figures and notes counts; pair views draw their own SVG.
_DRAW = """
document.body.dataset.errors=window.__reportErrors.length;
(function(){
 var figs=window.__figures||[],done=0;
 function finish(){document.body.dataset.figures=done;document.body.dataset.ready='1';}
 if(!figs.length){finish();return;}
 figs.forEach(function(f){
  var el=document.getElementById(f.id);
  try{Plotly.newPlot(el,f.fig.data,f.fig.layout,{responsive:true,displaylogo:false})
   .then(function(gd){done++;if(f.count){document.body.dataset[f.count]=
     gd.data.filter(function(t){return t.meta===f.count;})
     .reduce(function(n,t){return n+(t.customdata?t.customdata.length:0);},0);}
    if(done===figs.length){finish();}})
   .catch(function(e){__noteError(e);});}catch(e){__noteError(e);}
 });
})();
"""


def esc(value: Any) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value), quote=True)


def script_json(obj: Any) -> str:
    """JSON safe inside <script>: no '</' can close the element."""
    return _safe(json.dumps(obj, separators=(",", ":"), allow_nan=False))


_DTYPES = {"float32": "f4", "float64": "f8", "int32": "i4", "int16": "i2", "int8": "i1",
           "uint32": "u4", "uint16": "u2", "uint8": "u1"}


def typed_array(value: Any) -> dict:
    """A numpy array as plotly.js's typed-array spec ({dtype, bdata: base64}, C order, with
    ``shape`` when 2-D): ~4/3 of the raw bytes instead of decimal text. ``json.dumps`` hook."""
    if not isinstance(value, np.ndarray):
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")
    arr = np.ascontiguousarray(value)
    if arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    if arr.dtype.name not in _DTYPES:
        raise TypeError(f"arrays of {arr.dtype} cannot be sent to plotly.js")
    spec = {"dtype": _DTYPES[arr.dtype.name], "bdata": base64.b64encode(arr.tobytes()).decode()}
    if arr.ndim > 1:
        spec["shape"] = ",".join(str(n) for n in arr.shape)
    return spec


def _safe(js: str) -> str:
    return js.replace("</", "<\\/")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]],
          numeric: Sequence[bool] | None = None, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (cells already HTML)."""
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f"<td{' class=num' if num else ''}>{cell if raw else esc(cell)}</td>"
            for cell, num in zip(row, numeric, strict=True))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Page:
    """Sections of HTML plus plotly figures, written as one offline file.

    ``add_figure(fig, css)`` places a plotly figure (a ``go.Figure``, or a plain figure dict
    whose numpy arrays are sent as typed arrays, without plotly's validation cost); with
    ``count=KEY``, the page sums the ``customdata`` lengths of the traces whose ``meta`` is KEY
    into ``<body data-KEY>`` once drawn (e.g. the cameras of the 3D view).
    """

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.parts: list[str] = []
        self.nav: list[tuple[str, str]] = []
        self.figures: list[dict] = []
        self.scripts: list[str] = []

    def section(self, anchor: str, heading: str, body: str) -> None:
        self.nav.append((anchor, heading))
        self.parts.append(f'<section id="{esc(anchor)}"><h2>{esc(heading)}</h2>{body}</section>')

    def add_figure(self, fig: Any, css: str = "fig", count: str | None = None) -> str:
        """HTML of a placeholder div for ``fig``, drawn once the page has loaded."""
        fig_id = f"fig{len(self.figures)}"
        as_json = (fig.to_json() if hasattr(fig, "to_json")
                   else json.dumps(fig, default=typed_array, separators=(",", ":")))
        self.figures.append({"id": fig_id, "json": as_json, "count": count})
        return f'<div id="{fig_id}" class="{esc(css)}"></div>'

    def add_script(self, js: str) -> None:
        self.scripts.append(js)

    def render(self) -> str:
        figs = ",".join(
            f'{{"id":"{f["id"]}","count":{script_json(f["count"])},"fig":{_safe(f["json"])}}}'
            for f in self.figures)
        plotly_js = ""
        if self.figures:
            import plotly.offline

            plotly_js = f"<script>{plotly.offline.get_plotlyjs()}</script>"
        nav = " ".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h in self.nav)
        extra = "".join(f"<script>{s}</script>" for s in self.scripts)
        return (
            "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>{esc(self.title)}</title><style>{_STYLE}</style>"
            f"<script>{_ERROR_HOOK}</script>{plotly_js}</head><body>"
            f"<h1>{esc(self.title)}</h1><div class=muted>{self.subtitle}</div><nav>{nav}</nav>"
            + "".join(self.parts)
            + f"<script>window.__figures=[{figs}];</script>{extra}<script>{_DRAW}</script>"
            "</body></html>")

    def write(self, path: Path | str) -> Path:
        """Write the page atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.render(), encoding="utf-8")
        os.replace(tmp, path)
        return path
