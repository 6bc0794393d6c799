#!/usr/bin/env python3
"""Draws the demo's sample photos: a small synthetic toy (an orange bear with a blue
scarf) on five different backgrounds, at 128 × 128 px, written as PNGs to
`demo/photos/` (or the folder given). The PNGs are committed; rerun this only to
change them. Standard library only, and deterministic: the same bytes every run.

Usage: demo/make_photos.py [OUT_DIR]
"""

import math
import struct
import sys
import zlib
from pathlib import Path

SIZE = 128

BODY = (232, 120, 40)
BELLY = (250, 200, 140)
SCARF = (40, 90, 200)
EYE = (20, 20, 20)


def png(width, height, pixels):
    """PNG bytes of an RGB image given as rows of (r, g, b) tuples."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + bytes(v for p in row for v in p) for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def background(kind, x, y):
    """The scene behind the toy."""
    if kind == "sky":  # a blue gradient over green grass
        if y > 96:
            return (70, 150, 60)
        t = y / 96
        return (int(120 + 80 * t), int(170 + 60 * t), 240)
    if kind == "wood":  # a wooden table top
        grain = int(12 * math.sin(y * 0.35 + 3 * math.sin(x * 0.05)))
        return (150 + grain, 100 + grain, 60 + grain // 2)
    if kind == "checker":  # a tiled floor
        return (235, 235, 225) if ((x // 16) + (y // 16)) % 2 else (90, 90, 100)
    if kind == "beach":  # sea above sand
        return (40, 120, 190) if y < 64 else (230, 205, 150)
    # a plain grey wall
    return (175, 175, 180)


def toy(x, y, cx, cy, s):
    """The toy's colour at (x, y), or None outside it; centred at (cx, cy), scale s."""

    def inside(ox, oy, rx, ry):
        return ((x - cx - ox * s) / (rx * s)) ** 2 + ((y - cy - oy * s) / (ry * s)) ** 2 <= 1

    for ex in (-7, 7):  # eyes
        if inside(ex, -17, 2.5, 2.5):
            return EYE
    if inside(0, -10, 4, 3):  # muzzle
        return BELLY
    if inside(0, 3, 20, 4) or inside(14, 8, 4, 8):  # scarf and its tail
        return SCARF
    if inside(0, 16, 10, 11):  # belly
        return BELLY
    for ex in (-16, 16):  # ears
        if inside(ex, -30, 6, 6):
            return BODY
    for ax in (-21, 21):  # arms
        if inside(ax, 14, 6, 12):
            return BODY
    for lx in (-10, 10):  # legs
        if inside(lx, 31, 7, 6):
            return BODY
    if inside(0, -16, 17, 15) or inside(0, 17, 17, 18):  # head and body
        return BODY
    return None


# (background, centre x, centre y, scale): the toy at varied places and sizes.
SCENES = [
    ("sky", 64, 62, 1.2),
    ("wood", 56, 66, 1.0),
    ("checker", 70, 60, 1.1),
    ("beach", 62, 68, 0.9),
    ("wall", 66, 64, 1.3),
]


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "photos"
    out.mkdir(parents=True, exist_ok=True)
    for i, (kind, cx, cy, scale) in enumerate(SCENES):
        pixels = [
            [toy(x, y, cx, cy, scale) or background(kind, x, y) for x in range(SIZE)]
            for y in range(SIZE)
        ]
        path = out / f"toy-{i}-{kind}.png"
        path.write_bytes(png(SIZE, SIZE, pixels))
        print(path)


if __name__ == "__main__":
    main()
