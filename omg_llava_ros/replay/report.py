"""DIR/report.html: one self-contained page (no scripts, no external files; images are data URIs).

Sections: the metrics table; per command its answer and overlay thumbnails over time; a latency
timeline and histogram drawn here as inline SVG; the errors.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from omg_llava_ros.replay.runner import CommandRecord, ReplayOutcome

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8dde6}
.sub{color:#5a6478;font-size:13px;margin:0 0 12px}
table{border-collapse:collapse;font-size:13px;background:#fff}
th,td{border:1px solid #d8dde6;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef1f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
section.command{background:#fff;border:1px solid #d8dde6;border-radius:6px;padding:10px 14px;margin:10px 0}
.command-text{font-size:15px;margin:0 0 4px} .answer{margin:0 0 6px;font-family:ui-monospace,monospace}
.meta{color:#5a6478;font-size:12px;margin:0 0 8px} .warn{color:#9a5b00;font-size:12px}
.thumbs{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;font-size:11px;color:#5a6478;text-align:center}
img.thumb{display:block;height:120px;width:auto;border:1px solid #c4cad6;border-radius:3px}
.stop{color:#5a6478;font-style:italic;margin:6px 0} .charts{display:flex;flex-wrap:wrap;gap:16px}
svg{background:#fff;border:1px solid #d8dde6} .none{color:#5a6478}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 5, 10) if s * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _tick_label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.2e}"


class _Plot:
    """Maps data to an SVG drawing area with axes (x right, y up)."""

    def __init__(self, width: int, height: int, xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = 56, 16, 16, 40
        self.xt = nice_ticks(*xlim)
        self.yt = nice_ticks(*ylim)
        self.x0, self.x1 = self.xt[0], self.xt[-1]
        self.y0, self.y1 = self.yt[0], self.yt[-1]

    def x(self, v: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (v - self.x0) / span * (self.width - self.left - self.right)

    def y(self, v: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.height - self.bottom - (v - self.y0) / span * (self.height - self.top - self.bottom)

    def axes(self, xlabel: str, ylabel: str) -> list[str]:
        parts = []
        for t in self.yt:
            y = self.y(t)
            parts.append(
                f'<line x1="{self.left}" y1="{y:.1f}" x2="{self.width - self.right}" y2="{y:.1f}" stroke="#e6e9ef"/>'
                f'<text x="{self.left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{_tick_label(t)}</text>'
            )
        base = self.height - self.bottom
        for t in self.xt:
            x = self.x(t)
            parts.append(
                f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#5a6478"/>'
                f'<text x="{x:.1f}" y="{base + 16}" font-size="11" text-anchor="middle">{_tick_label(t)}</text>'
            )
        parts.append(
            f'<line x1="{self.left}" y1="{base}" x2="{self.width - self.right}" y2="{base}" stroke="#5a6478"/>'
            f'<line x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{base}" stroke="#5a6478"/>'
            f'<text x="{(self.left + self.width - self.right) / 2:.1f}" y="{self.height - 6}" font-size="12" '
            f'text-anchor="middle">{_e(xlabel)}</text>'
            f'<text x="14" y="{(self.top + base) / 2:.1f}" font-size="12" text-anchor="middle" '
            f'transform="rotate(-90 14 {(self.top + base) / 2:.1f})">{_e(ylabel)}</text>'
        )
        return parts


def latency_timeline_svg(times_s: Sequence[float], latencies_ms: Sequence[float], width: int = 640) -> str:
    """Latency of each output against the recorded time of its input."""
    if not latencies_ms:
        return '<p class="none" id="latency-timeline">no outputs, no latencies</p>'
    t = np.asarray(times_s, dtype=np.float64)
    lat = np.asarray(latencies_ms, dtype=np.float64)
    plot = _Plot(width, 240, (float(t.min()), float(t.max())), (0.0, float(lat.max())))
    parts = plot.axes("recorded time of the input frame (s)", "latency (ms)")
    points = " ".join(f"{plot.x(a):.1f},{plot.y(b):.1f}" for a, b in zip(t, lat, strict=True))
    parts.append(f'<polyline class="latency-line" fill="none" stroke="#3867d6" stroke-width="1.2" points="{points}"/>')
    parts.extend(
        f'<circle class="latency-point" cx="{plot.x(a):.1f}" cy="{plot.y(b):.1f}" r="2.2" fill="#3867d6">'
        f"<title>t={a:.3f} s: {b:.1f} ms</title></circle>"
        for a, b in zip(t, lat, strict=True)
    )
    return (
        f'<svg id="latency-timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="240" '
        f'viewBox="0 0 {width} 240" role="img" aria-label="latency timeline">{"".join(parts)}</svg>'
    )


def latency_histogram_svg(latencies_ms: Sequence[float], bins: int = 20, width: int = 480) -> str:
    if not latencies_ms:
        return '<p class="none" id="latency-histogram">no outputs, no latencies</p>'
    lat = np.asarray(latencies_ms, dtype=np.float64)
    lo, hi = float(lat.min()), float(lat.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(lat, bins=bins, range=(lo, hi))
    plot = _Plot(width, 240, (lo, hi), (0.0, float(counts.max())))
    parts = plot.axes("latency (ms)", "outputs")
    for count, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if count == 0:
            continue
        x0, x1, y = plot.x(float(a)), plot.x(float(b)), plot.y(float(count))
        parts.append(
            f'<rect class="histogram-bar" x="{x0:.1f}" y="{y:.1f}" width="{max(0.5, x1 - x0 - 1):.1f}" '
            f'height="{plot.y(0.0) - y:.1f}" fill="#20bf6b"><title>{a:.1f}–{b:.1f} ms: {count}</title></rect>'
        )
    return (
        f'<svg id="latency-histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="240" '
        f'viewBox="0 0 {width} 240" role="img" aria-label="latency histogram">{"".join(parts)}</svg>'
    )


def _metrics_rows(metrics: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(key, label, value) rows of the summary table; key is the metrics.json path."""
    lat, jit = metrics["latency_ms"], metrics["jitter_ms"]
    rows: list[tuple[str, str, Any]] = [
        ("mode", "mode", metrics["mode"] + (f" ×{metrics['rate']:g}" if metrics["rate"] else "")),
        ("frames", "frames in the bag", metrics["frames"]),
        ("processed_frames", "frames processed", metrics["processed_frames"]),
        ("dropped_frames", "frames dropped", metrics["dropped_frames"]),
        ("results", "outputs", metrics["results"]),
        ("commands", "commands", metrics["commands"]),
        ("answered_commands", "commands answered", metrics["answered_commands"]),
        ("input_fps", "input fps (recorded)", metrics["input_fps"]),
        ("output_fps", "output fps", metrics["output_fps"]),
        ("latency_ms.p50", "latency p50 (ms)", lat["p50"]),
        ("latency_ms.p95", "latency p95 (ms)", lat["p95"]),
        ("latency_ms.max", "latency max (ms)", lat["max"]),
        ("jitter_ms.mean", "jitter mean (ms)", jit["mean"]),
        ("jitter_ms.max", "jitter max (ms)", jit["max"]),
    ]
    if "ciou" in metrics:
        rows += [
            ("ciou", "cIoU", metrics["ciou"]),
            ("giou", "gIoU", metrics["giou"]),
            (
                "ground_truth.evaluated_frames",
                "frames with ground truth evaluated",
                metrics["ground_truth"]["evaluated_frames"],
            ),
        ]
    rows.append(("errors", "errors", len(metrics["errors"])))
    return rows


def _command_section(command: CommandRecord, t0_ns: int, with_gt: bool) -> str:
    thumbs = command.thumbnails.selected()
    answer = command.answer if command.answered else "(not answered)"
    meta = [
        f"id {command.id}",
        f"at {_fmt((command.log_time_ns - t0_ns) / 1e9, 2)} s"
        if command.log_time_ns >= 0
        else "given on the command line",
    ]
    meta.append(f"{command.results} output(s)")
    if command.answered:
        meta.append(f"{command.objects} object(s)")
    if with_gt:
        meta.append(f"cIoU {_fmt(command.iou.ciou)}, gIoU {_fmt(command.iou.giou)} over {command.iou.frames} frame(s)")
    figures = []
    for thumb in thumbs:
        data = base64.b64encode(thumb.jpeg).decode("ascii")
        label = f"+{(thumb.log_time_ns - t0_ns) / 1e9:.2f} s" + (" follow" if thumb.follow else " answer")
        if thumb.iou is not None:
            label += f" · IoU {thumb.iou:.2f}"
        figures.append(
            f'<figure><img class="thumb" alt="overlay at {_e(label)}" src="data:image/jpeg;base64,{data}">'
            f"<figcaption>{_e(label)}</figcaption></figure>"
        )
    warnings = "".join(f'<div class="warn">{_e(w)}</div>' for w in command.warnings)
    strip = f'<div class="thumbs">{"".join(figures)}</div>' if figures else '<p class="none">no outputs</p>'
    return (
        f'<section class="command" data-command-id="{command.id}">'
        f'<h3 class="command-text">{_e(command.text)}</h3>'
        f'<p class="answer">{_e(answer)}</p><p class="meta">{_e(" · ".join(meta))}</p>{warnings}{strip}</section>'
    )


def render_report(outcome: ReplayOutcome) -> str:
    metrics = outcome.metrics
    with_gt = "ciou" in metrics
    # Times are shown from the first thing recorded (a command usually precedes the first frame).
    starts = [c.log_time_ns for c in outcome.commands if c.log_time_ns >= 0]
    if outcome.first_frame_log_ns is not None:
        starts.append(outcome.first_frame_log_ns)
    t0 = min(starts, default=0)
    rows = "".join(
        f'<tr data-key="{_e(key)}"><th>{_e(label)}</th><td class="num">{_e(_fmt(value))}</td></tr>'
        for key, label, value in _metrics_rows(metrics)
    )
    sections = []
    for command in outcome.commands:
        if command.stop:
            when = (command.log_time_ns - t0) / 1e9
            sections.append(f'<p class="stop">at {when:.2f} s: empty command, follow mode stopped</p>')
        else:
            sections.append(_command_section(command, t0, with_gt))
    if not sections:
        sections.append('<p class="none">no commands in the bag</p>')
    with_output = [r for r in outcome.records if r.latency_ms is not None]
    times = [(r.log_time_ns - t0) / 1e9 for r in with_output]
    latencies = [float(r.latency_ms) for r in with_output if r.latency_ms is not None]
    if outcome.errors:
        error_rows = "".join(
            f"<tr><td>{_e('–' if e.stamp is None else f'{e.stamp[0]}.{e.stamp[1]:09d}')}</td>"
            f"<td>{_e(e.topic)}</td><td>{_e(e.reason)}</td></tr>"
            for e in outcome.errors
        )
        errors = f'<table id="errors"><tr><th>stamp</th><th>topic</th><th>reason</th></tr>{error_rows}</table>'
    else:
        errors = '<p id="errors" class="none">no errors</p>'
    topics = outcome.topics
    sub = (
        f"{_e(outcome.bag)} ({_e(outcome.storage)}) · image {_e(topics.image)} · command {_e(topics.command or '–')}"
        f" · ground truth {_e(topics.gt or '–')}"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>omg-llava-ros replay: {_e(outcome.bag.name)}</title><style>{_CSS}</style></head><body>"
        f'<h1>Replay report</h1><p class="sub">{sub}</p>'
        f'<h2>Metrics</h2><table id="metrics">{rows}</table>'
        f'<h2>Commands</h2><div id="commands">{"".join(sections)}</div>'
        f'<h2>Latency</h2><div class="charts">{latency_timeline_svg(times, latencies)}'
        f"{latency_histogram_svg(latencies)}</div>"
        f"<h2>Errors ({len(outcome.errors)})</h2>{errors}"
        "</body></html>\n"
    )
