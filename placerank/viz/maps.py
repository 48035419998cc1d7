"""Pictures for one localized photo: a small map and the top matches.

The map is drawn offline with matplotlib in local metres around the estimate (UTM easting and
northing of the estimate's zone, or the database's own metric frame): every database photo as a
grey dot, the top matches coloured (green = agrees with the estimate, red = another place; dot
area ~ weight; rank numbers), the estimate as a star, the agreement radius around the best match, the photo's own
EXIF GPS when it has one, and a scale bar. No map tiles: nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placerank.utils import atomic_path


def _nice_length(extent: float) -> float:
    """A 1/2/5 x 10^n length close to a quarter of ``extent``."""
    target = max(extent / 4.0, 1e-3)
    base = 10 ** math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * base <= target:
            return m * base
    return base


def _fmt_m(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g} km"
    if v >= 1:
        return f"{v:g} m"
    return f"{v * 100:g} cm"


@dataclass
class MapData:
    """What one map shows, in metres of one frame (a UTM zone, or a local metric frame)."""

    label: str  # first title line, e.g. "01.jpg: 52.518900, 13.400000"
    estimate: tuple[float, float]  # easting, northing
    radius_m: float  # agreement radius around the best match
    confidence: float
    matches: np.ndarray  # (K,2) top matches by rank; NaN rows for matches without a position
    agrees: list[bool]
    weights: list[float]
    database: np.ndarray  # (N,2) every database photo with a position
    frame: str = "local frame"  # axis label, e.g. "UTM 33N"
    truth: tuple[float, float] | None = None  # the photo's own GPS in the same frame
    truth_error_m: float | None = None


def draw_map(data: MapData, out_path: str | Path, max_points: int = 20000) -> Path:
    """Draw ``data`` into a PNG at ``out_path`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    est = np.asarray(data.estimate, dtype=np.float64)
    pos = np.asarray(data.matches, dtype=np.float64).reshape(-1, 2)
    has = np.asarray(np.isfinite(pos).all(axis=1), dtype=bool)
    rel = pos - est
    dist = np.linalg.norm(np.where(has[:, None], rel, np.nan), axis=1)
    r = float(data.radius_m)
    truth = None if data.truth is None else np.asarray(data.truth, dtype=np.float64) - est
    # View: the agreement radius and the nearby matches, never more than 20 radii.
    near = dist[has & (dist <= 20 * r)] if has.any() else np.zeros(0)
    half = max(2.0 * r, float(near.max()) if near.size else 0.0)
    if truth is not None and np.linalg.norm(truth) <= 20 * r:
        half = max(half, float(np.abs(truth).max()))
    half *= 1.15

    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    pts = np.asarray(data.database, dtype=np.float64).reshape(-1, 2) - est
    inside = pts[(np.abs(pts) <= half).all(axis=1)]
    if len(inside) > max_points:
        inside = inside[np.linspace(0, len(inside) - 1, max_points).astype(int)]
    ax.scatter(inside[:, 0], inside[:, 1], s=6, c="#b0b0b0", label=f"database photos ({len(pts)})", zorder=1)
    # Agreement is measured from the place-defining best match (the first with a position).
    best = next((k for k in range(len(pos)) if has[k]), None)
    centre = tuple(rel[best]) if best is not None else (0.0, 0.0)
    ax.add_patch(
        Circle(centre, r, fill=False, ls="--", ec="#2a7", lw=1.2, zorder=2, label=f"{_fmt_m(r)} around the best match")
    )
    wmax = max(list(data.weights) + [1e-9])
    shown_out = 0
    for k in range(len(pos)):
        if not has[k]:
            continue
        x, y = rel[k]
        if abs(x) > half or abs(y) > half:
            shown_out += 1
            continue
        colour = "#1a9a3a" if data.agrees[k] else "#d62728"
        size = 30 + 250 * data.weights[k] / wmax
        ax.scatter([x], [y], s=size, c=colour, edgecolors="black", linewidths=0.5, zorder=3)
        ax.annotate(str(k + 1), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, zorder=4)
    ax.scatter([0], [0], marker="*", s=320, c="#ffcc00", edgecolors="black", linewidths=0.8, zorder=5, label="estimate")
    if truth is not None and (np.abs(truth) <= half).all():
        ax.scatter(
            [truth[0]],
            [truth[1]],
            marker="X",
            s=110,
            c="#1f77b4",
            edgecolors="black",
            zorder=5,
            label="photo's own EXIF GPS"
            + (f" ({data.truth_error_m:.1f} m off)" if data.truth_error_m is not None else ""),
        )
    ax.scatter([], [], c="#1a9a3a", s=40, label="top match, agrees")
    ax.scatter([], [], c="#d62728", s=40, label="top match, other place")
    ax.set_xlim(-half, half)
    ax.set_ylim(-half, half)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.25)
    ax.set_xlabel(f"metres east of the estimate ({data.frame})")
    ax.set_ylabel("metres north of the estimate")
    length = _nice_length(2 * half)
    ax.add_artist(
        AnchoredSizeBar(
            ax.transData, length, _fmt_m(length), "lower right", pad=0.5, frameon=True, size_vertical=2 * half / 300
        )
    )
    title = f"{data.label}\nconfidence {data.confidence:.2f}, radius {_fmt_m(r)}"
    if shown_out:
        far = float(np.nanmax(dist[has]))
        title += f"; {shown_out} match(es) outside the view (up to {_fmt_m(round(far, 1))})"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=7, framealpha=0.85)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out_path)
