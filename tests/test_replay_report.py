"""report.html rendered by headless Chromium: what the page shows, and that it needs nothing else."""

from __future__ import annotations

import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from omg_llava_ros.replay import replay
from omg_llava_ros.replay.report import nice_ticks
from omg_llava_ros.replay.synthetic import BagEntry, image_fields, write_bag
from omg_llava_ros.ros import messages as m

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
GREY = 60  # the table colour of the test frames


class RedPixels:
    """Grounds the red pixels for "segment" commands; answers "two." with no object otherwise."""

    def chat(self, image: np.ndarray, text: str, **kwargs: Any) -> Any:
        if "segment" in text.lower():
            seg = SimpleNamespace(phrase="the red square", mask=image[..., 0] > 128, score=0.9)
            return SimpleNamespace(text="<p> the red square </p> [SEG].", clean_text="the red square.", segments=[seg])
        return SimpleNamespace(text="two.", clean_text="two.", segments=[])

    def follow(self, image: np.ndarray, segments: list[Any]) -> list[Any]:
        return [SimpleNamespace(phrase=s.phrase, mask=image[..., 0] > 128, score=s.score) for s in segments]


COMMANDS = ["Please segment the red square.", "Segment the red square again.", "How many objects are there?"]


def _bag(path: Path) -> Path:
    def t(seconds: float) -> int:
        return round(seconds * 1e9)

    def frame(sec: float, x: int) -> BagEntry:
        img = np.full((40, 40, 3), GREY, np.uint8)
        img[10:20, x : x + 10] = (200, 30, 30)
        return BagEntry("/cam", m.IMAGE, t(sec), image_fields(img, "rgb8", t(sec)))

    def gt(sec: float, x: int) -> BagEntry:
        mask = np.zeros((40, 40), np.uint8)
        mask[10:20, x : x + 10] = 255
        header = m.header_fields((int(t(sec) // 10**9), int(t(sec) % 10**9)), "camera")
        return BagEntry("/gt", m.IMAGE, t(sec), {"header": header, **m.mono8_fields(mask)})

    entries = [BagEntry("/cmd", m.STRING, t(0.95), {"data": COMMANDS[0]})]
    for k in range(5):  # right on target, then 5 px off for the last two frames
        entries += [frame(1 + k / 10, 2 + 2 * k), gt(1 + k / 10, 2 + 2 * k + (5 if k >= 3 else 0))]
    short = image_fields(np.zeros((40, 40, 3), np.uint8), "rgb8", t(1.45))
    short["data"] = short["data"][:100]
    entries.append(BagEntry("/cam", m.IMAGE, t(1.45), short))
    entries.append(BagEntry("/cmd", m.STRING, t(1.48), {"data": COMMANDS[1]}))
    entries += [frame(1.5 + k / 10, 20 - 2 * k) for k in range(5)]
    entries.append(BagEntry("/cmd", m.STRING, t(1.98), {"data": COMMANDS[2]}))
    entries.append(frame(2.0, 5))
    entries.append(BagEntry("/cmd", m.STRING, t(2.05), {"data": ""}))
    entries.append(frame(2.1, 5))
    return write_bag(path, entries)


class Page(HTMLParser):
    """What the rendered DOM shows: commands with answers and thumbnails, metric cells, charts, errors."""

    def __init__(self) -> None:
        super().__init__()
        self.commands: list[dict[str, Any]] = []
        self.metrics: dict[str, str] = {}
        self.points = self.bars = self.error_rows = 0
        self.scripts = self.stylesheets = 0
        self.external: list[str] = []
        self.thumb_sources: list[str] = []
        self._field: str | None = None
        self._key: str | None = None
        self._svg: str | None = None
        self._errors = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        for name in ("src", "href"):
            if name in a and not a[name].startswith(("data:", "#")):
                self.external.append(a[name])
        self.scripts += tag == "script"
        self.stylesheets += tag == "link"
        if tag == "section" and "command" in classes:
            self.commands.append({"id": a.get("data-command-id"), "text": "", "answer": "", "thumbs": 0})
        elif tag == "h3" and "command-text" in classes:
            self._field = "text"
        elif tag == "p" and "answer" in classes:
            self._field = "answer"
        elif tag == "img" and "thumb" in classes:
            self.commands[-1]["thumbs"] += 1
            self.thumb_sources.append(a["src"])
        elif tag == "tr" and "data-key" in a:
            self._key = a["data-key"]
        elif tag == "td" and self._key is not None:
            self._field = "metric"
            self.metrics[self._key] = ""
        elif tag == "svg":
            self._svg = a.get("id")
        elif tag == "circle" and self._svg == "latency-timeline" and "latency-point" in classes:
            self.points += 1
        elif tag == "rect" and self._svg == "latency-histogram" and "histogram-bar" in classes:
            self.bars += 1
        elif tag == "table" and a.get("id") == "errors":
            self._errors = True
        if tag == "tr" and self._errors:
            self.error_rows += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h3", "p", "td"):
            self._field = None
        if tag == "tr":
            self._key = None
        if tag == "svg":
            self._svg = None
        if tag == "table":
            self._errors = False

    def handle_data(self, data: str) -> None:
        if self._field == "metric" and self._key is not None:
            self.metrics[self._key] += data
        elif self._field in ("text", "answer") and self.commands:
            self.commands[-1][self._field] += data


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    profile = tmp / "profile"
    return subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("report")
    replay(RedPixels(), _bag(tmp / "bag"), tmp / "out")
    return tmp / "out" / "report.html", json.loads((tmp / "out" / "metrics.json").read_text())


def test_report_is_self_contained(report) -> None:
    html, _ = report
    text = html.read_text()
    page = Page()
    page.feed(text)
    assert page.scripts == 0 and page.stylesheets == 0 and page.external == []
    assert page.thumb_sources and all(s.startswith("data:image/jpeg;base64,") for s in page.thumb_sources)


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)
def test_report_in_headless_chromium(report, tmp_path: Path) -> None:
    html, met = report
    proc = _chromium("--dump-dom", html.as_uri(), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = Page()
    page.feed(proc.stdout)
    # The commands, in order, with their answers and one thumbnail per output.
    assert [c["text"] for c in page.commands] == COMMANDS
    assert [c["answer"] for c in page.commands] == ["the red square.", "the red square.", "two."]
    assert [c["thumbs"] for c in page.commands] == [5, 5, 1]
    # The metrics table shows metrics.json's numbers.
    assert (met["frames"], met["processed_frames"], met["results"], met["commands"]) == (13, 13, 11, 3)
    shown = page.metrics
    assert shown["frames"] == "13" and shown["results"] == "11" and shown["dropped_frames"] == "0"
    assert shown["commands"] == "3" and shown["answered_commands"] == "3" and shown["errors"] == "1"
    # Frames 1-3 exact (100/100 px), frames 4-5 5 px off (50/150 px); the other commands have no ground truth.
    assert met["ciou"] == pytest.approx(400 / 600, abs=1e-4) and met["giou"] == pytest.approx((3 + 2 / 3) / 5, abs=1e-4)
    assert shown["ciou"] == f"{met['ciou']:.3f}" == "0.667" and shown["giou"] == "0.733"
    assert shown["latency_ms.p50"] == f"{met['latency_ms']['p50']:.3f}"
    # The charts: one point per output, at least one histogram bar; the errors table: the short frame.
    assert page.points == 11 and page.bars >= 1
    assert page.error_rows == 2  # header + one error
    assert "data too short" in proc.stdout

    shot = tmp_path / "shot.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1200,2400", html.as_uri(), tmp=tmp_path)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    import cv2

    pixels = cv2.imread(str(shot), cv2.IMREAD_COLOR)[..., ::-1].astype(int)
    assert pixels.shape[:2] == (2400, 1200)
    # The thumbnails really are painted: the table grey of the frames covers a good part of 11 of them.
    table = (np.abs(pixels - GREY) <= 8).all(axis=-1)
    assert table.sum() > 11 * 120 * 120 * 0.3


def test_nice_ticks() -> None:
    assert nice_ticks(0, 95) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(1.3, 1.9, 3) == [1.2, 1.4, 1.6, 1.8, 2.0]
    assert nice_ticks(5, 5) == [5, 5.2, 5.4, 5.6, 5.8, 6.0]
