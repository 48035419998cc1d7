"""Evaluation pictures a person looks at: the recall and precision-recall curves and example strips (query + top-5,
correct in green, wrong in red). Used by eval, localize and the service."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from placerank.utils import atomic_path

GREEN = (40, 170, 60)
RED = (210, 40, 40)
GREY = (120, 120, 120)


def _font(size: int = 16):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def plot_recall_curve(curves: dict[str, dict[str, float]], out_path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, rec in curves.items():
        if not rec:
            continue
        ns = sorted(int(n) for n in rec)
        ax.plot(ns, [100 * rec[str(n)] for n in ns], marker="o", label=label)
        for n in ns[:3]:
            ax.annotate(
                f"{100 * rec[str(n)]:.1f}",
                (n, 100 * rec[str(n)]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=7,
            )
    ax.set_xscale("log")
    ax.set_xlabel("N (log scale)")
    ax.set_ylabel("Recall@N (%)")
    ax.set_ylim(0, 101)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_pr_curve(curves: dict, out_path: str | Path, title: str = "") -> None:
    """Precision over recall, one line per stage: ``curves`` maps a label to an object with
    ``recall``, ``precision`` (from the (0, 1) start), ``auc`` and ``recall_at_100_precision``
    (:class:`placerank.eval.precision.PRCurve`). The curve ends at recall = R@1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, c in curves.items():
        line = ax.plot(100 * c.recall, 100 * c.precision, linewidth=1.6)[0]  # linear, as the trapezoidal AUC
        line.set_label(f"{label}: PR-AUC {c.auc:.3f}, R@100%P {100 * c.recall_at_100_precision:.1f}%")
        ax.plot(100 * c.recall[-1], 100 * c.precision[-1], "o", color=line.get_color(), markersize=4)
    ax.set_xlabel("Recall (% of queries with a positive, answered correctly)")
    ax.set_ylabel("Precision (% of accepted answers correct)")
    ax.set_xlim(0, 101)
    ax.set_ylim(0, 101)
    ax.grid(True, alpha=0.3)
    ax.set_title(
        title + ("\n" if title else "") + "answers accepted by decreasing confidence; dot: all accepted (recall = R@1)",
        fontsize=9,
    )
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _thumb(path: Path, height: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            w = max(1, round(rgb.width * height / rgb.height))
            return rgb.resize((w, height), Image.Resampling.BILINEAR)
    except OSError:
        return Image.new("RGB", (height, height), (60, 60, 60))


def draw_example(
    query_path: Path,
    candidate_paths: Sequence[Path],
    correct: Sequence[bool] | None,
    out_path: str | Path,
    labels: Sequence[str] | None = None,
    title: str = "",
    height: int = 160,
) -> None:
    """Query on the left (grey frame), top-N candidates right of it framed green/red (grey and
    unmarked when ``correct`` is None: unlabelled data)."""
    border, pad, text_h = 6, 8, 22
    tiles = [_thumb(query_path, height)] + [_thumb(p, height) for p in candidate_paths]
    width = sum(t.width + 2 * border for t in tiles) + pad * (len(tiles) + 1)
    canvas = Image.new("RGB", (width, height + 2 * border + 2 * text_h + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    draw.text((pad, 4), title[:160], fill=(0, 0, 0), font=font)
    x = pad
    for i, tile in enumerate(tiles):
        colour = GREY if i == 0 or correct is None else (GREEN if correct[i - 1] else RED)
        y = text_h + pad
        draw.rectangle([x, y, x + tile.width + 2 * border - 1, y + height + 2 * border - 1], fill=colour)
        canvas.paste(tile, (x + border, y + border))
        caption = "query" if i == 0 else (labels[i - 1] if labels else f"#{i}")
        caption += "" if i == 0 or correct is None else ("  ✓" if correct[i - 1] else "  ✗")
        draw.text((x, y + height + 2 * border + 3), caption[:40], fill=(0, 0, 0) if i == 0 else colour, font=font)
        x += tile.width + 2 * border + pad
    with atomic_path(out_path) as tmp:
        canvas.save(tmp, format="PNG")


def pick_example_queries(
    first_hit_before: np.ndarray, first_hit_after: np.ndarray, n: int = 8, seed: int = 0
) -> list[int]:
    """A few queries worth looking at: ones re-ranking fixed or broke, failures, successes."""
    rng = np.random.default_rng(seed)
    q = len(first_hit_after)
    fixed = np.flatnonzero(~first_hit_before & first_hit_after)
    broke = np.flatnonzero(first_hit_before & ~first_hit_after)
    fail = np.flatnonzero(~first_hit_after)
    ok = np.flatnonzero(first_hit_after)
    chosen: list[int] = []
    for group, take in ((fixed, 2), (broke, 2), (fail, 2), (ok, n)):
        for i in rng.permutation(group)[:take]:
            if len(chosen) < n and int(i) not in chosen:
                chosen.append(int(i))
    return sorted(chosen)[: min(n, q)]
