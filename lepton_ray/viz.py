"""Pictures for people: sample grids (before/after augmentation) and training curves.

The grids need only Pillow; :func:`plot_history` needs matplotlib, an optional extra
(``pip install 'lepton_ray[viz]'``); a run's own ``curves.svg`` (:func:`curves_svg`) needs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_CURVES_SIZE = (9, 3.2)  # inches: the loss and accuracy panels side by side
_SERIES = (("train", "#1f77b4"), ("val", "#ff7f0e"))  # matplotlib's first two colours


def image_grid(images: np.ndarray, cols: int = 8, scale: int = 3, pad: int = 2) -> Any:
    """(N, H, W, C) uint8 -> one PIL image with the samples tiled ``cols`` per row."""
    from PIL import Image

    n, h, w, c = images.shape
    rows = -(-n // cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + k * (w + pad) : pad + k * (w + pad) + w,
        ] = img
    pil = Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def augmentation_grid(
    info: Any, augment: Sequence[str] = ("random_crop",), n: int = 16, seed: int = 0
) -> Any:
    """Top row(s): ``n`` samples as stored; bottom row(s): the same samples after ``augment``."""
    from lepton_ray.data import read_arrays
    from lepton_ray.data.transforms import AUGMENTATIONS, check_augment

    images, _, _ = read_arrays(info)
    n = min(n, len(images))
    pick = images[np.random.default_rng(seed).choice(len(images), size=n, replace=False)]
    rng = np.random.default_rng(seed + 1)
    out = pick
    for name in check_augment(augment):
        out = AUGMENTATIONS[name](out, rng)
    return image_grid(np.concatenate([pick, out]), cols=n)


def plot_history(history: list[dict], path: str | None = None) -> Any:
    """Loss and accuracy per epoch (train and, when present, validation); saved as PNG if ``path``."""
    try:
        import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves
    except ImportError:
        raise ImportError("plot_history needs matplotlib: pip install 'lepton_ray[viz]'") from None

    fig = plt.figure(figsize=_CURVES_SIZE)
    _draw_history(fig, history)
    if path:
        fig.savefig(path, dpi=100)
    return fig


def curves_svg(history: list[dict]) -> str:
    """A run's ``curves.svg``: :func:`plot_history`'s two panels (loss and accuracy per epoch,
    train and, when present, validation) as an SVG document written by hand.

    Ray Train's controller, a new process each ``fit()``, draws it at every epoch end, the last on
    the way to ``fit()`` returning: through matplotlib that was 0.7-0.8 s for the first figure
    in a fresh process (its import) and ~0.2 s for each one after on 2 CPUs, taken from training;
    this is text, made in about a millisecond. A value that is not finite (a diverged loss)
    leaves a gap in its line.
    """
    width, height = (round(v * 100) for v in _CURVES_SIZE)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    epochs = [float(h["epoch"]) for h in history]
    for i, metric in enumerate(("loss", "accuracy")):
        lines = [
            (label, colour, [_finite(h.get(f"{prefix}_{metric}")) for h in history])
            for (prefix, colour), label in zip(_SERIES, ("train", "validation"), strict=True)
            if any(f"{prefix}_{metric}" in h for h in history)
        ]
        box = (i * width / 2 + 60, 12.0, width / 2 - 75, height - 57.0)  # x, y, w, h of the plot
        parts += _panel(box, metric, epochs, lines)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _panel(
    box: tuple[float, float, float, float],
    ylabel: str,
    xs: list[float],
    lines: list[tuple[str, str, list[float | None]]],
) -> list[str]:
    x0, y0, w, h = box
    values = [v for _, _, ys in lines for v in ys if v is not None]
    xlo, xhi = _span(xs, integer=True)
    ylo, yhi = _span(values)

    def px(x: float) -> float:
        return round(x0 + (x - xlo) / (xhi - xlo) * w, 1)

    def py(y: float) -> float:
        return round(y0 + h - (y - ylo) / (yhi - ylo) * h, 1)

    out = [f'<g class="panel" data-metric="{ylabel}">']
    for t, text in _ticks(xlo, xhi, integer=True):
        out.append(f'<line x1="{px(t)}" y1="{y0}" x2="{px(t)}" y2="{y0 + h}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{px(t)}" y="{y0 + h + 14}" text-anchor="middle">{text}</text>')
    for t, text in _ticks(ylo, yhi):
        out.append(f'<line x1="{x0}" y1="{py(t)}" x2="{x0 + w}" y2="{py(t)}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x0 - 5}" y="{py(t) + 4}" text-anchor="end">{text}</text>')
    out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 32}" text-anchor="middle">epoch</text>')
    out.append(
        f'<text transform="translate({x0 - 45} {y0 + h / 2}) rotate(-90)" '
        f'text-anchor="middle">{ylabel}</text>'
    )
    for k, (label, colour, ys) in enumerate(lines):
        segment: list[str] = []
        for x, y in [*zip(xs, ys, strict=True), (None, None)]:  # a gap ends a segment
            if x is not None and y is not None:
                segment.append(f"{px(x)},{py(y)}")
                out.append(f'<circle cx="{px(x)}" cy="{py(y)}" r="3" fill="{colour}"/>')
            elif segment:
                points = " ".join(segment)
                out.append(
                    f'<polyline points="{points}" fill="none" stroke="{colour}" '
                    f'stroke-width="1.5" data-series="{label}"/>'
                )
                segment = []
        ly = y0 + 14 + 15 * k  # the legend, top right, on a white box
        if k == 0:
            out.append(
                f'<rect x="{x0 + w - 100}" y="{y0 + 4}" width="95" height="{15 * len(lines) + 4}" '
                f'fill="white" fill-opacity="0.85" stroke="#ccc"/>'
            )
        out.append(
            f'<line x1="{x0 + w - 95}" y1="{ly - 4}" x2="{x0 + w - 75}" y2="{ly - 4}" '
            f'stroke="{colour}" stroke-width="1.5"/>'
        )
        out.append(f'<text x="{x0 + w - 70}" y="{ly}">{label}</text>')
    out.append("</g>")
    return out


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _span(values: list[float], integer: bool = False) -> tuple[float, float]:
    """The axis range: the values' with 5% to spare (whole epochs: exactly theirs), never empty."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = 0.5 if integer else max(abs(lo) * 0.05, 0.05)
        return lo - pad, hi + pad
    if integer:
        return lo, hi
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, integer: bool = False) -> list[tuple[float, str]]:
    """About six round ticks (1, 2 or 5 times a power of ten) inside [lo, hi], as (value, text)."""
    raw = (hi - lo) / 6
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    if integer:
        step = max(1.0, round(step))
    decimals = max(0, -math.floor(math.log10(step)))
    first = math.ceil(lo / step - 1e-9) * step
    count = int((hi - first) / step + 1e-9) + 1
    return [(first + k * step, f"{first + k * step:.{decimals}f}") for k in range(count)]


def _draw_history(fig: Any, history: list[dict]) -> None:
    epochs = [h["epoch"] for h in history]
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    if history and "val_loss" in history[0]:
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
        ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "s-", label="validation")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
