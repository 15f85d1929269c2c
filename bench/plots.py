"""Loss vs time and tokens/s per miner as PNGs, from the step series a swarm run recorded.

matplotlib is not a dependency of this repo, so this draws with a tiny rasterizer of its own (lines
on a white canvas with light grid lines, no text): the axis ranges and the colour of each miner are
printed, and BENCHMARKS.md gives them as captions. Input: ``bench/results/swarm_utilization.json``
(the series of every miner of every run); one pair of PNGs per run.

Run: ``.venv/bin/python -m bench.plots [--results PATH] [--run default]``.
"""

from __future__ import annotations

import argparse
import json
import struct
import zlib
from pathlib import Path

from bench.common import RESULTS

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
COLOUR_NAMES = ["blue", "orange", "green", "red", "purple", "brown"]


class Canvas:
    def __init__(self, width: int = 640, height: int = 360, margin: int = 20):
        self.width, self.height, self.margin = width, height, margin
        self.pixels = bytearray([255]) * (width * height * 3)

    def set(self, x: int, y: int, colour: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(colour)

    def line(self, x0: float, y0: float, x1: float, y1: float, colour, thick: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        for i in range(steps + 1):
            x, y = x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps
            for dx in range(thick):
                for dy in range(thick):
                    self.set(int(x) + dx, int(y) + dy, colour)

    def frame(self, grid: int = 4) -> None:
        m, w, h = self.margin, self.width, self.height
        for k in range(grid + 1):  # light grid: quarters of each axis
            y = m + (h - 2 * m) * k / grid
            x = m + (w - 2 * m) * k / grid
            self.line(m, y, w - m, y, (225, 225, 225))
            self.line(x, m, x, h - m, (225, 225, 225))
        self.line(m, h - m, w - m, h - m, (0, 0, 0))
        self.line(m, m, m, h - m, (0, 0, 0))

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * self.width * 3 : (y + 1) * self.width * 3]) for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )


def plot(series: list[list[tuple[float, float]]], path: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    """One line per series of (x, y); returns the (x, y) ranges the axes span."""
    xs = [x for s in series for x, _ in s]
    ys = [y for s in series for _, y in s]
    x_range = (min(xs), max(xs))
    y_range = (min(ys), max(ys))
    canvas = Canvas()
    canvas.frame()
    m, w, h = canvas.margin, canvas.width, canvas.height

    def to_px(x: float, y: float) -> tuple[float, float]:
        fx = (x - x_range[0]) / ((x_range[1] - x_range[0]) or 1)
        fy = (y - y_range[0]) / ((y_range[1] - y_range[0]) or 1)
        return m + fx * (w - 2 * m), h - m - fy * (h - 2 * m)

    for index, points in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        for (xa, ya), (xb, yb) in zip(points, points[1:]):
            canvas.line(*to_px(xa, ya), *to_px(xb, yb), colour, thick=2)
    path.write_bytes(canvas.png())
    return x_range, y_range


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(RESULTS / "swarm_utilization.json"))
    parser.add_argument("--run", nargs="*", default=None, help="run names to plot (default: all)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    data = json.loads(Path(args.results).read_text())
    for run in data["runs"]:
        if args.run and run["name"] not in args.run:
            continue
        miners = [m for m in run.get("per_miner", {}).values() if m.get("series")]
        if not miners:
            continue
        tag = f"{run['name']}-{run['miners']}"
        for metric, column in (("loss", 1), ("tokens_per_s", 2)):
            path = Path(args.out_dir) / f"swarm-{tag}-{metric}.png"
            x_range, y_range = plot([[(p[0], p[column]) for p in m["series"]] for m in miners], path)
            print(
                f"{path}: x = seconds {x_range[0]:.0f}..{x_range[1]:.0f}, y = {metric} "
                f"{y_range[0]:.3g}..{y_range[1]:.3g}, "
                f"grid at quarters; miners: {', '.join(COLOUR_NAMES[: len(miners)])}"
            )


if __name__ == "__main__":
    main()
