"""Two small PNG writers built on Pillow (a Diffusers dependency), so the demo needs no plotting stack.

- :func:`labelled_grid` -- one row of sample images per method, the method's label at the left.
- :func:`line_plot` -- y against x for several named series (log-scale y), with axes and a legend.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def labelled_grid(rows: list[tuple[str, torch.Tensor]], path: str | Path, scale: int = 4, per_row: int = 20) -> Path:
    """Write ``rows`` of ``(label, images (N, C, H, W) in [-1, 1])`` as one PNG grid."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("rows must not be empty")
    _, c, h, w = rows[0][1].shape
    cell_h, cell_w, pad, label_w = h * scale, w * scale, 2, 300
    width = label_w + per_row * (cell_w + pad)
    height = len(rows) * (cell_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for r, (label, imgs) in enumerate(rows):
        y = pad + r * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), label, fill=(0, 0, 0), font=font)
        x8 = ((imgs[:per_row].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        for i, img in enumerate(x8):
            arr = img.permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr[..., 0] if c == 1 else arr).convert("RGB")
            tile = tile.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + i * (cell_w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def line_plot(
    series: dict[str, list[tuple[float, float]]], path: str | Path, title: str, xlabel: str, ylabel: str,
    size: tuple[int, int] = (760, 480), hlines: dict[str, float] | None = None,
) -> Path:
    """Write a log-y line plot of ``{name: [(x, y), ...]}`` (y > 0) with optional horizontal references."""
    from PIL import Image, ImageDraw

    pts = [p for s in series.values() for p in s if p[1] > 0]
    ys = [p[1] for p in pts] + [v for v in (hlines or {}).values() if v > 0]
    if not pts:
        raise ValueError("series holds no positive points")
    W, H = size
    left, right, top, bottom = 70, 200, 40, 50
    x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    ly_lo, ly_hi = math.log10(min(ys)), math.log10(max(ys))
    if ly_hi - ly_lo < 1e-9:
        ly_lo, ly_hi = ly_lo - 0.5, ly_hi + 0.5
    ly_lo, ly_hi = ly_lo - 0.05 * (ly_hi - ly_lo), ly_hi + 0.05 * (ly_hi - ly_lo)

    def tx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (W - left - right)

    def ty(y: float) -> float:
        return top + (ly_hi - math.log10(y)) / (ly_hi - ly_lo) * (H - top - bottom)

    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = _font()
    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for k in range(math.floor(ly_lo), math.ceil(ly_hi) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**k
            if ly_lo <= math.log10(v) <= ly_hi:
                y = ty(v)
                d.line([left, y, W - right, y], fill=(225, 225, 225))
                d.text((8, y - 6), f"{v:g}", fill=(0, 0, 0), font=font)
    xticks = sorted({p[0] for p in pts})
    for xv in xticks:
        d.line([tx(xv), H - bottom, tx(xv), H - bottom + 5], fill=(0, 0, 0))
        d.text((tx(xv) - 6, H - bottom + 8), f"{xv:g}", fill=(0, 0, 0), font=font)
    d.text((W // 2 - 80, 10), title, fill=(0, 0, 0), font=font)
    d.text(((left + W - right) // 2 - 20, H - 20), xlabel, fill=(0, 0, 0), font=font)
    d.text((8, top - 20), ylabel, fill=(0, 0, 0), font=font)
    legend_y = top
    for i, (name, s) in enumerate(series.items()):
        col = PALETTE[i % len(PALETTE)]
        s = sorted(p for p in s if p[1] > 0)
        xy = [(tx(x), ty(y)) for x, y in s]
        if len(xy) > 1:
            d.line(xy, fill=col, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.line([W - right + 10, legend_y + 6, W - right + 30, legend_y + 6], fill=col, width=3)
        d.text((W - right + 35, legend_y), name, fill=(0, 0, 0), font=font)
        legend_y += 16
    for name, v in (hlines or {}).items():
        y = ty(v)
        d.line([left, y, W - right, y], fill=(0, 0, 0), width=1)
        d.text((left + 5, y - 14), name, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
