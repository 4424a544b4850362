"""Train the demo model that `resultity demo` serves, and draw its loss curve.

    python examples/train_demo_model.py [OUT_DIR] [--loss-png PATH] [--steps N] [--seed N]

Defaults: OUT_DIR resultity_runtime/data/demo_model (the copy that ships in the package),
the loss curve beside it as demo_model_loss.png. The same seed gives the same tokenizer and
(on the same machine and torch build) bit-identical weights. Training uses 2 threads and
takes a few minutes on 2 CPU cores; a progress bar goes to standard error. The PNG is drawn
with zlib and struct alone, so no plotting library is needed.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

# Two busy-waiting OpenMP threads crawl when the cores are shared; waiting passively costs
# little when they are not. libgomp reads this when torch loads, so set it before that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# 3x5 glyphs, rows top to bottom, 3 bits per row (enough for the axis labels)
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", " ": "000000000000000",
    "l": "110010010010111", "o": "000111101101111", "s": "000111110011111",
    "t": "010111010010011", "e": "000111111100111", "p": "000111101111100",
    "g": "000111101111001", "-": "000000111000000", "(": "001010010010001", ")": "100010010010100",
}


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(rgb)

    def line(self, x0: float, y0: float, x1: float, y1: float,
             rgb: tuple[int, int, int]) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for k in range(n + 1):
            t = k / n
            self.dot(round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t), rgb)

    def text(self, x: int, y: int, s: str, scale: int = 2) -> None:
        for c in s:
            bits = _FONT.get(c, _FONT[" "])
            for r in range(5):
                for col in range(3):
                    if bits[r * 3 + col] == "1":
                        for dy in range(scale):
                            for dx in range(scale):
                                self.dot(x + col * scale + dx, y + r * scale + dy, (0, 0, 0))
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3])
                       for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + kind + data
                    + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def loss_curve_png(losses: Sequence[float], width: int = 640, height: int = 360) -> bytes:
    """Return a PNG of ``losses`` per step on a log scale: raw (light) and smoothed (dark)."""
    if not losses:
        raise ValueError("losses: empty")
    c = _Canvas(width, height)
    left, right, top, bottom = 72, width - 16, 16, height - 36
    logs = [math.log(max(v, 1e-6)) for v in losses]
    lo, hi = min(logs), max(logs)
    hi = hi if hi > lo else lo + 1.0

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * i / max(1, len(losses) - 1)
        return x, bottom - (bottom - top) * (v - lo) / (hi - lo)

    for k in range(5):  # horizontal grid at evenly spaced log-losses, labelled
        v = lo + (hi - lo) * k / 4
        y = round(xy(0, v)[1])
        c.line(left, y, right, y, (225, 225, 225))
        c.text(4, y - 5, f"{math.exp(v):.2g}")
    c.line(left, top, left, bottom, (0, 0, 0))
    c.line(left, bottom, right, bottom, (0, 0, 0))
    c.text(left, bottom + 8, "0")
    end = str(len(losses))
    c.text(right - 8 * len(end), bottom + 8, end)
    c.text((left + right) // 2 - 32, bottom + 8, "step")
    c.text(right - 80, top, "loss (log)")
    smooth, ema = [], logs[0]
    for v in logs:
        ema = 0.9 * ema + 0.1 * v
        smooth.append(ema)
    for series, rgb in ((logs, (160, 190, 235)), (smooth, (20, 60, 160))):
        for i in range(1, len(series)):
            c.line(*xy(i - 1, series[i - 1]), *xy(i, series[i]), rgb)
    return c.png()


def main(argv: Sequence[str] | None = None) -> int:
    import attrs

    from resultity_runtime import _train

    default_out = Path(__file__).resolve().parent.parent / "resultity_runtime/data/demo_model"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=default_out)
    parser.add_argument("--loss-png", type=Path, default=None,
                        help="where to save the loss curve (default: OUT_DIR + '_loss.png')")
    parser.add_argument("--steps", type=int, default=_train.DEMO_TRAIN_CONFIG.steps)
    parser.add_argument("--seed", type=int, default=_train.DEMO_TRAIN_CONFIG.seed)
    args = parser.parse_args(argv)
    config = attrs.evolve(_train.DEMO_TRAIN_CONFIG, steps=args.steps, seed=args.seed)
    result = _train.train_demo_model(args.out, config, progress=True)
    png = args.loss_png or args.out.with_name(args.out.name + "_loss.png")
    png.write_bytes(loss_curve_png(result.losses))
    print(f"{result.path}: {result.num_params:,} parameters, {len(result.losses)} steps in "
          f"{result.seconds:.0f} s, final loss {result.losses[-1]:.3f}; loss curve {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
