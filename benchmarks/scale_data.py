"""Data for ``benchmarks/scale.py``: real descriptors of every real shared image (plus flips and
crops), the real queries with their real positives, and distractors drawn to match the real
descriptors' distribution.

Real part. Every image under ``shared/data`` (GardensPoint Walking, Nordland, TUM, the corridor,
GardensPoint/SFU triplets, Sacre-Coeur + the building pair, the EXIF photos) is described with
``effnet-lite0-gem`` (1280-d) at 144x256 (the default 360x640 runs at ~3 img/s on one core
here, 144x256 at ~43, and the 2 cores are shared), plus a horizontal flip of every image that is
not one of Nordland's 64x32 thumbnails (``make_variants`` can also write 80 % centre crops; the
benchmark's CPU budget left them out). The variants are written once as JPEGs to
a scratch folder under /tmp and go through the same extraction pipeline
(:func:`placerank.descriptors.extract.extract_features`).

Queries and positives. Queries = GardensPoint Walking ``night_right`` and ``day_right`` (280),
positives = the ``day_left`` frames with |i - j| <= 2 (illumination + viewpoint change, and
viewpoint change alone). The database
holds ``day_left`` (the positives) and every other real descriptor except the rest of
GardensPoint Walking and the GardensPoint triplets (same campus: unlabelled true matches would
count as misses).

Distractors (beyond the real images). A Gaussian mixture fitted to the real database
descriptors in a PCA space, with the variance PCA drops put back as isotropic noise, then
re-normalised to unit length (:class:`Distractors`). Drawn deterministically by block (seed +
block number), so 10^6 of them never need to be held at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SCRATCH = Path(os.environ.get("PLACERANK_SCALE_SCRATCH", "/tmp/placerank_scale"))
IMAGE_SIZE = (144, 256)
MODEL = "effnet-lite0-gem"
GARDENS = "gardenspoint_walking"
EXTS = {".jpg", ".jpeg", ".png"}


def real_images(shared: Path = SHARED) -> list[Path]:
    return sorted(p for p in shared.rglob("*") if p.suffix.lower() in EXTS and p.is_file())


def make_variants(
    images: list[Path], folder: Path, variants: tuple[str, ...] = ("flip",)
) -> list[tuple[Path, str, str]]:
    """(path, source image, variant) for the originals, and for each non-Nordland image the
    ``variants`` ("flip", "crop": an 80 % centre crop) written as JPEG q90 under ``folder`` (once)."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[Path, str, str]] = []
    for i, src in enumerate(images):
        rows.append((src, str(src), "original"))
        if "nordland" in str(src):
            continue
        for variant in variants:
            out = folder / f"{i:05d}_{variant}.jpg"
            if not out.exists():
                with Image.open(src) as im:
                    im = ImageOps.exif_transpose(im).convert("RGB")
                    if variant == "flip":
                        im = ImageOps.mirror(im)
                    else:
                        w, h = im.size
                        im = im.crop((int(0.1 * w), int(0.1 * h), int(0.9 * w), int(0.9 * h)))
                    tmp = out.with_suffix(".tmp.jpg")
                    im.save(tmp, quality=90)
                    tmp.rename(out)
            rows.append((out, str(src), variant))
    return rows


def extract_real(out: Path = SCRATCH / "real.npz", shared: Path = SHARED) -> Path:
    """Describe every real image + variants once; ``out`` holds descriptors, sources, variants."""
    if out.exists():
        return out
    import torch

    from placerank.descriptors.extract import extract_features
    from placerank.models import create

    rows = make_variants(real_images(shared), SCRATCH / "variants")
    model = create(MODEL, image_size=IMAGE_SIZE).eval()
    desc, _ = extract_features(
        model, [r[0] for r in rows], torch.device("cpu"), batch_size=32, num_workers=1, use_cache=False
    )
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, descriptors=desc, sources=np.array([r[1] for r in rows]), variants=np.array([r[2] for r in rows]))
    tmp.rename(out)
    return out


class RealSet:
    """The real queries (GardensPoint night_right), their positives, and the real database."""

    def __init__(self, npz: Path, shared: Path = SHARED):
        data = np.load(npz)
        desc, sources, variants = data["descriptors"], data["sources"], data["variants"]
        gardens = str(shared / GARDENS)
        is_gardens = np.array([s.startswith(gardens) or "gardenspoint_sfu" in s for s in sources])
        original = variants == "original"

        def frames(side: str) -> np.ndarray:
            idx = [i for i in np.flatnonzero(original) if f"/{side}/" in sources[i] and sources[i].startswith(gardens)]
            return np.array(sorted(idx, key=lambda i: sources[i]))

        q_idx, pos_idx = np.concatenate([frames("night_right"), frames("day_right")]), frames("day_left")
        others = np.random.default_rng(0).permutation(np.flatnonzero(~is_gardens))  # sizes: random subsets
        self.queries = np.ascontiguousarray(desc[q_idx])
        self.database = np.ascontiguousarray(np.concatenate([desc[pos_idx], desc[others]]))
        n = len(pos_idx)
        # positives: day_left frame j for night_right frame i when |i - j| <= 2 (database rows 0..n-1)
        self.positives = [np.arange(max(0, i % n - 2), min(n, i % n + 3)) for i in range(len(q_idx))]
        self.num_real = len(self.database)


class Distractors:
    """Descriptors drawn to match ``real``'s distribution: a ``components``-Gaussian mixture
    (full covariance) on the first ``dims`` PCA coordinates, the residual variance of the dropped
    coordinates added back as isotropic Gaussian noise, mapped back and L2-normalised."""

    def __init__(self, real: np.ndarray, dims: int = 64, components: int = 16, seed: int = 0):
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        self.seed = seed
        self.pca = PCA(n_components=dims, random_state=seed).fit(real)
        z = self.pca.transform(real)
        self.gmm = GaussianMixture(components, covariance_type="full", random_state=seed, reg_covar=1e-5).fit(z)
        residual = real - self.pca.inverse_transform(z)
        self.noise_std = float(np.sqrt((residual**2).sum(1).mean() / (real.shape[1] - dims)))
        self.components = self.pca.components_.astype(np.float32)
        self.dim = real.shape[1]

    def block(self, number: int, size: int) -> np.ndarray:
        """Block ``number`` of ``size`` distractors (the same for the same number, any order)."""
        rng = np.random.default_rng((self.seed, number))
        weights = self.gmm.weights_ / self.gmm.weights_.sum()
        comp = rng.choice(len(weights), size=size, p=weights)
        z = np.empty((size, self.components.shape[0]), np.float32)
        for c in np.unique(comp):
            sel = comp == c
            z[sel] = rng.multivariate_normal(self.gmm.means_[c], self.gmm.covariances_[c], size=int(sel.sum()))
        x = z @ self.components + self.pca.mean_.astype(np.float32)
        x += rng.standard_normal((size, self.dim), dtype=np.float32) * self.noise_std
        # the isotropic noise also lies partly in the PCA subspace: a small, documented inflation
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


def write_database(path: Path, real: np.ndarray, distractors: Distractors, size: int, block: int = 50_000) -> Path:
    """(size, D) float32 .npy at ``path``: the real database first, then distractors, streamed
    block by block into a memory-mapped file (never all in RAM)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(size, real.shape[1]))
    n_real = min(size, len(real))
    out[:n_real] = real[:n_real]
    start, number = n_real, 0
    while start < size:
        m = min(block, size - start)
        out[start : start + m] = distractors.block(number, block)[:m]
        start, number = start + m, number + 1
    out.flush()
    del out
    tmp.rename(path)
    return path


if __name__ == "__main__":
    print(extract_real())


class NpyRows:
    """A read-only ``.npy`` (N, D) float32 read by ``pread`` per slice: build_index sees an array
    (shape, dtype, slicing, sorted fancy indexing) whose pages are not mapped into this process."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, _, self.dtype = read(f)
            self.offset = f.tell()
        self.path = path
        self.row_bytes = self.shape[1] * 4

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.shape[0])
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            return np.fromfile(f, dtype=np.float32, count=(stop - start) * self.shape[1]).reshape(-1, self.shape[1])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, _ = key.indices(self.shape[0])
            return self._read(start, stop)
        rows = np.asarray(key)
        out = np.empty((len(rows), self.shape[1]), np.float32)
        for s in range(0, len(rows), 4096):  # sorted rows: read the spanned block, keep the rows
            part = rows[s : s + 4096]
            block = self._read(int(part[0]), int(part[-1]) + 1)
            out[s : s + len(part)] = block[part - part[0]]
        return out


def distribution_check(real: RealSet, dist: Distractors) -> dict:
    """How alike the drawn distractors are to real database images, seen from the real queries:
    each query's best similarity among N real non-positive images vs N drawn ones, and the norms
    of the descriptors' mean (a drawn set that is too spread out or too tight shows here)."""
    n = min(4000, real.num_real - 140)
    rng = np.random.default_rng(1)
    real_neg = real.database[140 + rng.choice(real.num_real - 140, n, replace=False)]
    drawn = dist.block(999, n)
    q = real.queries
    top_real, top_drawn = (q @ real_neg.T).max(1), (q @ drawn.T).max(1)
    pair_real = (real_neg[:1000] @ real_neg[1000:2000].T).ravel()
    pair_drawn = (drawn[:1000] @ drawn[1000:2000].T).ravel()
    return {
        "distractors": "Gaussian mixture (16 components, full covariance) on 64 PCA dims of the real database "
        "descriptors + isotropic noise for the dropped variance, L2-normalised",
        "query_best_sim_real_negatives_mean": round(float(top_real.mean()), 4),
        "query_best_sim_drawn_mean": round(float(top_drawn.mean()), 4),
        "pair_sim_real_mean_std": [round(float(pair_real.mean()), 4), round(float(pair_real.std()), 4)],
        "pair_sim_drawn_mean_std": [round(float(pair_drawn.mean()), 4), round(float(pair_drawn.std()), 4)],
        "sample": n,
    }
