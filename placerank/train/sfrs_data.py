"""SFRS training data: positives and allowed negatives from place/frame labels, and the image
datasets of the tuple and feature passes (``placerank train --method sfrs``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from placerank.data.images import open_image, to_tensor
from placerank.data.places import read_sequences
from placerank.errors import DataError
from placerank.train.sfrs_options import SFRSOptions


@dataclass
class SFRSData:
    paths: list[Path]
    kind: str  # 'frame' or 'place'
    labels: np.ndarray  # frame index (int) or place id (int code)
    sequence: np.ndarray  # which --train spec each image came from
    positives: list[np.ndarray]  # per image
    negative_ok: np.ndarray  # (N, N) bool: j may be a negative of i
    queries: np.ndarray  # anchors: images with a positive and negatives


def build_sfrs_data(specs, frames, opts: SFRSOptions) -> SFRSData:
    """Read every ``--train`` spec and derive positives / allowed negatives from the labels."""
    read = read_sequences(specs, frames)
    paths, labels, seq, kind = read.paths, read.labels, read.sequence, read.kind
    n = len(paths)
    if kind == "frame":
        lab = np.array([int(v) for v in labels], dtype=np.int64)
        delta = np.abs(lab[:, None] - lab[None, :])
        pos = (delta <= opts.pos_tolerance) & ((seq[:, None] != seq[None, :]) | (delta == 0))
        neg_ok = delta > opts.neg_exclusion
    else:
        codes = {v: i for i, v in enumerate(sorted(set(map(str, labels))))}
        lab = np.array([codes[str(v)] for v in labels], dtype=np.int64)
        pos = lab[:, None] == lab[None, :]
        neg_ok = ~pos
    np.fill_diagonal(pos, False)
    np.fill_diagonal(neg_ok, False)
    positives = [np.flatnonzero(pos[i]) for i in range(n)]
    queries = np.array([i for i in range(n) if len(positives[i]) and neg_ok[i].any()], dtype=np.int64)
    if len(queries) == 0:
        raise DataError(
            "no training image has both a positive (another view of its place) and a negative: "
            "give two or more traversals / images per place"
        )
    return SFRSData(paths, kind, lab, seq, positives, neg_ok, queries)


def color_jitter(im, rng: np.random.Generator):
    """ColorJitter(brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5) with factors drawn
    from ``rng`` (so the same tuple gets the same jitter on every rank / in every run)."""
    import torchvision.transforms.functional as TF

    ops = [
        lambda x, f=rng.uniform(0.3, 1.7): TF.adjust_brightness(x, f),
        lambda x, f=rng.uniform(0.3, 1.7): TF.adjust_contrast(x, f),
        lambda x, f=rng.uniform(0.3, 1.7): TF.adjust_saturation(x, f),
        lambda x, f=rng.uniform(-0.5, 0.5): TF.adjust_hue(x, f),
    ]
    for k in rng.permutation(4):
        im = ops[k](im)
    return im


class TupleImages(torch.utils.data.Dataset):
    """item k -> (n, 3, H, W) tensor of one tuple's images (jittered when a seed is given).
    Errors come back as a string so the user sees the one-line DataError, not a worker trace."""

    def __init__(self, paths, pre, items: list[tuple[list[int], tuple | None]]):
        self.paths, self.pre, self.items = paths, pre, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        ids, seed = self.items[k]
        rng = np.random.default_rng(list(seed)) if seed is not None else None
        try:
            out = []
            for i in ids:
                im = open_image(self.paths[i], self.pre.min_side)
                if rng is not None:
                    im = color_jitter(im, rng)
                out.append(to_tensor(im, self.pre))
            return torch.stack(out), ""
        except DataError as e:
            return torch.zeros(0), str(e)


class IndexedImages(torch.utils.data.Dataset):
    def __init__(self, paths, pre):
        self.paths, self.pre = paths, pre

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, to_tensor(open_image(self.paths[i], self.pre.min_side), self.pre), ""
        except DataError as e:
            h, w = self.pre.size
            return i, torch.zeros(3, h, w), str(e)


def make_loader(dataset, num_workers: int, **kw):
    return torch.utils.data.DataLoader(
        dataset, num_workers=num_workers, persistent_workers=False, prefetch_factor=2 if num_workers else None, **kw
    )
