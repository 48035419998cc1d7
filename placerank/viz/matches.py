"""Side-by-side match pictures: the quickest way for a person to see *why* a re-ranker moved a
candidate up (many consistent lines) or down (few, scattered ones).

Drawn with OpenCV on the original images, each scaled to a common height (at most
``max_height`` px) so keypoints given in original pixels are scaled with them. Lines are coloured
by their horizontal position in the first image, which makes a consistent geometry visible as a
smooth fan and outliers as crossing strands.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from placerank.data.images import open_image
from placerank.utils import atomic_path


def _bgr(path: str | Path) -> np.ndarray:
    im = open_image(path, min_side=1)  # DataError for missing/corrupt files
    return cv2.cvtColor(np.asarray(im), cv2.COLOR_RGB2BGR)


def draw_matches(
    image1_path: str | Path,
    image2_path: str | Path,
    kpts1: np.ndarray,
    kpts2: np.ndarray,
    pairs: np.ndarray,
    out_path: str | Path,
    title: str = "",
    max_height: int = 480,
    max_lines: int = 400,
) -> Path:
    """Write ``out_path`` (PNG/JPEG by extension) with image 1 left, image 2 right and a line per
    ``pairs`` row (index into ``kpts1``, index into ``kpts2``). Keypoints are (x, y) in original
    pixels. At most ``max_lines`` lines are drawn (evenly subsampled) so dense matches stay
    readable; the title reports the full count."""
    a, b = _bgr(image1_path), _bgr(image2_path)
    h = min(max_height, max(a.shape[0], b.shape[0]))
    sa, sb = h / a.shape[0], h / b.shape[0]
    a = cv2.resize(a, (max(1, round(a.shape[1] * sa)), h), interpolation=cv2.INTER_AREA)
    b = cv2.resize(b, (max(1, round(b.shape[1] * sb)), h), interpolation=cv2.INTER_AREA)
    gap = 8
    band = 30 if title else 0
    canvas = np.full((h + band, a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
    canvas[band:, : a.shape[1]] = a
    canvas[band:, a.shape[1] + gap :] = b
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    k1 = np.asarray(kpts1, dtype=np.float64).reshape(-1, 2)
    k2 = np.asarray(kpts2, dtype=np.float64).reshape(-1, 2)
    shown = pairs
    if len(pairs) > max_lines:
        shown = pairs[np.linspace(0, len(pairs) - 1, max_lines).round().astype(int)]
    off = np.array([a.shape[1] + gap, band], dtype=np.float64)
    width1 = max(1.0, a.shape[1])
    for i, j in shown:
        p = k1[i] * sa + (0.0, band)
        q = k2[j] * sb + off
        hue = int(150 * np.clip(p[0] / width1, 0, 1))  # OpenCV hue range 0..179
        color = cv2.cvtColor(np.array([[[hue, 230, 230]]], dtype=np.uint8), cv2.COLOR_HSV2BGR)[0, 0].tolist()
        p_i, q_i = tuple(int(round(v)) for v in p), tuple(int(round(v)) for v in q)
        cv2.line(canvas, p_i, q_i, color, 1, cv2.LINE_AA)
        cv2.circle(canvas, p_i, 2, color, -1, cv2.LINE_AA)
        cv2.circle(canvas, q_i, 2, color, -1, cv2.LINE_AA)
    if title:
        cv2.putText(canvas, title[:160], (6, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    out_path = Path(out_path)
    ext = out_path.suffix.lower() or ".png"
    ok, buf = cv2.imencode(ext if ext in (".png", ".jpg", ".jpeg") else ".png", canvas)
    if not ok:  # pragma: no cover - OpenCV always encodes PNG/JPEG
        raise RuntimeError(f"could not encode {out_path}")
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return out_path
