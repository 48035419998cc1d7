"""Image decoding and per-model preprocessing, done inside DataLoader workers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from placerank.errors import DataError

# Decompression-bomb guard stays on, but large real photos (50 MP) must still open.
Image.MAX_IMAGE_PIXELS = 300_000_000


@dataclass(frozen=True)
class Preprocess:
    """What a model expects as input.

    ``size`` is (height, width) of the hard resize (aspect ratio is not kept, as in the VPR
    literature; pick a size with the data's aspect). Pixels are scaled to [0, 1], then
    ``(x - mean) / std``: ImageNet statistics by default; SFRS's MatConvNet weights expect
    0..255 values minus the VGG means, i.e. std = (1/255,)*3. ``grayscale`` feeds a single
    repeated channel (for grayscale local-feature nets).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    grayscale: bool = False
    min_side: int = 16

    def signature(self) -> str:
        return f"{self.size[0]}x{self.size[1]}-m{','.join(f'{v:.4g}' for v in self.mean)}-s{','.join(f'{v:.4g}' for v in self.std)}{'-gray' if self.grayscale else ''}"

    def with_size(self, size: tuple[int, int] | int | None) -> Preprocess:
        if size is None:
            return self
        if isinstance(size, int):
            size = (size, size)
        h, w = size
        return Preprocess((int(h), int(w)), self.mean, self.std, self.grayscale, self.min_side)


def normalize_image_size(image_size) -> tuple[int, int] | None:
    """``None`` | ``int`` (square) | ``(H, W)`` -> ``(H, W)`` or None (the model's default)."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def open_image(path: str | Path, min_side: int = 16) -> Image.Image:
    """Open an image as RGB, honouring EXIF orientation; one-line errors for bad files."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: image file does not exist")
    try:
        with Image.open(path) as f:
            im = ImageOps.exif_transpose(f).convert("RGB")
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    if min(im.size) < min_side:
        raise DataError(f"{path}: image is too small ({im.size[0]}x{im.size[1]} px, need >= {min_side} px per side)")
    return im


def to_tensor(im: Image.Image, pre: Preprocess) -> torch.Tensor:
    h, w = pre.size
    if im.size != (w, h):
        # PIL's bilinear resize widens its filter when shrinking, i.e. it antialiases.
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    arr: np.ndarray = np.asarray(im, dtype=np.float32) / 255.0
    if pre.grayscale:
        gray = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        arr = np.repeat(gray[..., None], 3, axis=2)
    arr = (arr - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def load_tensor(path: str | Path, pre: Preprocess) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode + resize + normalise one image; returns (C,H,W) tensor and original (H, W)."""
    im = open_image(path, pre.min_side)
    orig = (im.size[1], im.size[0])
    return to_tensor(im, pre), orig


class ImageFolderDataset(torch.utils.data.Dataset):
    """Paths -> (index, tensor, original (H, W)); decoding happens in the worker processes."""

    def __init__(self, paths: Sequence[str | Path], pre: Preprocess):
        self.paths = [Path(p) for p in paths]
        self.pre = pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        # Errors travel back as a string: an exception raised inside a worker would reach the
        # user wrapped in a multi-line worker traceback instead of our one-line message.
        try:
            tensor, orig = load_tensor(self.paths[i], self.pre)
            return i, tensor, torch.tensor(orig, dtype=torch.int64), ""
        except DataError as e:
            h, w = self.pre.size
            return i, torch.zeros(3, h, w), torch.tensor((-1, -1), dtype=torch.int64), str(e)


def check_batch_errors(errors: Sequence[str]) -> None:
    """Raise the first per-image error of a batch produced by :class:`ImageFolderDataset`."""
    for err in errors:
        if err:
            raise DataError(err)


def make_loader(
    paths: Sequence[str | Path],
    pre: Preprocess,
    batch_size: int = 16,
    num_workers: int | None = None,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    import os

    if num_workers is None:
        num_workers = min(4, max(1, (os.cpu_count() or 2)))
    if len(paths) < 2 * batch_size:
        num_workers = 0  # worker start-up costs more than it saves on tiny sets
    return torch.utils.data.DataLoader(
        ImageFolderDataset(paths, pre),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
