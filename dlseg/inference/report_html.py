"""``OUT/report.html``: one self-contained page to find the cases that went wrong in a cohort.

The cohort table (flagged and failed cases first, sortable by clicking a header), a strip of thumbnails per case
(a few slices with the predicted contour; ``OUT/<case>/thumbnails.jpg``, written with the case) and a histogram of
liver volumes. No network: CSS and script inline, pictures as ``data:`` URIs.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from dlseg.fileio import atomic_write
from dlseg.inference import outputs
from dlseg.inference.case_flags import FlagConfig

REPORT = "report.html"
THUMB_SLICES, THUMB_HEIGHT = 5, 96
COLUMNS = (("case_id", "case"), ("status", "status"), ("flags", "flags"), ("liver_volume_ml", "liver mL"),
           ("components", "pieces"), ("largest_share", "largest"), ("mean_probability", "mean prob."),
           ("first_slice_share", "on 1st slice"), ("last_slice_share", "on last slice"), ("slices", "slices"))

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}
table{border-collapse:collapse}th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}
th{cursor:pointer;background:#f3f3f3;user-select:none}th:hover{background:#e4e4e4}
td:first-child{white-space:nowrap}tr.flagged td{background:#fff4d6}tr.failed td{background:#fde2e2}td.num{text-align:right}
td img{height:64px;image-rendering:pixelated}.muted{color:#888}svg text{font-size:11px}"""

SCRIPT = """document.querySelectorAll('th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});"""


def preview_stack(image: np.ndarray, stats: dict[str, float], height: int = THUMB_HEIGHT) -> np.ndarray:
    """Every slice as display gray at thumbnail height, (Z, height, width) uint8: what the report's strip is cut
    from, a few hundred KB per case where the scanner volume would be MBs to carry from the loader."""
    width = max(1, round(image.shape[2] * height / image.shape[1]))
    return np.stack([cv2.resize(outputs.display_slice(s, stats), (width, height), interpolation=cv2.INTER_AREA)
                     for s in image])


def thumbnail_strip(preview: np.ndarray, labels: np.ndarray, count: int = THUMB_SLICES) -> np.ndarray:
    """A few slices of ``preview_stack`` side by side (evenly spread over those with foreground, else over all),
    with the prediction drawn."""
    z, height, width = preview.shape
    fg = np.nonzero((labels.reshape(z, -1) > 0).any(axis=1))[0]
    pool = fg if fg.size else np.arange(z)
    picks = sorted(set(int(pool[round(i)]) for i in np.linspace(0, len(pool) - 1, min(count, len(pool)))))
    tiles = []
    for k in picks:
        small = cv2.resize(labels[k], (width, height), interpolation=cv2.INTER_NEAREST)
        tiles += [outputs.paint(preview[k], small), np.full((height, 2, 3), 255, np.uint8)]
    return np.concatenate(tiles[:-1], axis=1)


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def histogram_svg(volumes: list[float], cfg: FlagConfig, width: int = 520, height: int = 180) -> str:
    """Inline SVG histogram of liver volumes (mL) with the plausible range marked."""
    if not volumes:
        return '<p class="muted">no predicted volumes</p>'
    lo, hi = 0.0, max(max(volumes), cfg.liver_max_ml) * 1.05
    counts, edges = np.histogram(volumes, bins=20, range=(lo, hi))
    x = lambda v: 30 + (width - 70) * (v - lo) / (hi - lo)          # noqa: E731  (room for the last label)
    top = max(int(counts.max()), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" role="img" '
             f'aria-label="histogram of liver volumes">',
             f'<rect x="{x(cfg.liver_min_ml):.1f}" y="0" width="{x(cfg.liver_max_ml) - x(cfg.liver_min_ml):.1f}" '
             f'height="{height}" fill="#e8f5e9"/>']
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        h = height * int(c) / top
        parts.append(f'<rect x="{x(a) + 1:.1f}" y="{height - h:.1f}" width="{max(x(b) - x(a) - 2, 1):.1f}" '
                     f'height="{h:.1f}" fill="#4a7fb5"><title>{a:.0f}–{b:.0f} mL: {int(c)}</title></rect>')
    for v in np.linspace(lo, hi, 6):
        parts.append(f'<text x="{x(v):.1f}" y="{height + 14}" text-anchor="middle">{v:.0f}</text>')
    parts.append(f'<text x="{width / 2:.0f}" y="{height + 28}" text-anchor="middle">liver volume (mL); green: '
                 f'plausible {cfg.liver_min_ml:g}–{cfg.liver_max_ml:g} mL; {len(volumes)} cases</text></svg>')
    return "".join(parts)


def _cell(key: str, value: Any) -> str:
    """One table cell; ``data-v`` holds the sort key."""
    if value is None or value == "":
        return '<td data-v=""></td>'
    if isinstance(value, float):
        shown = f"{100 * value:.0f}%" if key.endswith("_share") else f"{value:.2f}" if key == "mean_probability" \
            else f"{value:.0f}"
        return f'<td class="num" data-v="{value}">{shown}</td>'
    if isinstance(value, int):
        return f'<td class="num" data-v="{value}">{value}</td>'
    text = html.escape(str(value))
    return f'<td data-v="{text}">{text}</td>'


def ordered(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flagged cases first, then failed ones, then the rest; by case id within each."""
    rank = lambda r: 0 if r.get("flags") else 1 if r["status"] == "failed" else 2       # noqa: E731
    return sorted(rows, key=lambda r: (rank(r), str(r["case_id"])))


def table_row(out: Path, row: dict[str, Any]) -> str:
    """A case's row: its columns (the failure reason in the flags column) and its thumbnail strip."""
    cls = "flagged" if row.get("flags") else "failed" if row["status"] == "failed" else "case"
    values = {**row, "flags": row.get("flags") or row.get("reason") or ""}
    cells = [_cell(key, values.get(key)) for key, _ in COLUMNS]
    thumb = out / str(row["case_id"]) / outputs.THUMBNAILS
    img = (f'<img alt="slices of {html.escape(str(row["case_id"]))}" src="{data_uri(thumb.read_bytes())}">'
           if thumb.is_file() else '<span class="muted">—</span>')
    return f'<tr class="{cls} case-row">{"".join(cells)}<td>{img}</td></tr>'


def render(out: Path, rows: list[dict[str, Any]], totals: dict[str, Any], cfg: FlagConfig) -> str:
    """The whole page."""
    flagged = sum(bool(r.get("flags")) for r in rows)
    volumes = [float(r["liver_volume_ml"]) for r in rows if r.get("liver_volume_ml") is not None]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS) + "<th>slices with prediction</th>"
    body = "\n".join(table_row(out, r) for r in ordered(rows))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>dlseg prediction report</title>'
            f'<style>{STYLE}</style></head><body><h1>dlseg prediction report</h1>'
            f'<p>{len(rows)} cases: {totals.get("predicted", 0)} predicted, {totals.get("reused", 0)} reused, '
            f'{totals.get("failed", 0)} failed; <b>{flagged} flagged</b>. Model '
            f'{html.escape(str(totals.get("model_fingerprint", ""))[:12])}. Click a column header to sort.</p>'
            f'<h2>Liver volumes</h2>{histogram_svg(volumes, cfg)}<h2>Cases</h2>'
            f'<table id="cases"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'
            f'<script>{SCRIPT}</script></body></html>')


def write_report(out: Path, rows: list[dict[str, Any]], totals: dict[str, Any], cfg: FlagConfig) -> Path:
    """Write ``OUT/report.html`` atomically; returns its path."""
    path = out / REPORT
    atomic_write(path, render(out, rows, totals, cfg).encode("utf-8"))
    return path
