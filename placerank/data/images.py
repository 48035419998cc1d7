"""Image decoding and per-model preprocessing, done inside DataLoader workers."""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from placerank.errors import DataError

# The pixel limit: a larger image is a one-line error (decoding a 25000 x 25000 image takes
# gigabytes; a 388 KB PNG can hold 400 MP). 100 MP covers every real camera photo we know of.
MAX_PIXELS = 100_000_000
# PIL's own decompression-bomb guard stays on, above ours (we check the header first).
Image.MAX_IMAGE_PIXELS = 2 * MAX_PIXELS
# JPEGs above this many pixels are decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode), never
# below twice the network input: memory follows the input size, not the photo's. Smaller photos
# decode in full, so their descriptors are exactly as before.
DRAFT_ABOVE_PIXELS = 8_000_000
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


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


def _too_large(path: Path, pixels: int, size: str = "") -> DataError:
    return DataError(
        f"{path}: image is too large ({size + ' = ' if size else ''}{pixels / 1e6:.0f} MP; the limit is"
        f" {MAX_PIXELS / 1e6:.0f} MP); downscale it first"
    )


def _exif_orientation(f: Image.Image) -> int:
    try:
        return int(f.getexif().get(0x0112, 1) or 1)
    except Exception:  # unreadable EXIF: exif_transpose ignores it as well
        return 1


def open_image(
    path: str | Path, min_side: int = 16, target: tuple[int, int] | None = None, info: dict | None = None
) -> Image.Image:
    """Open an image as RGB, honouring EXIF orientation; one-line errors for bad files and for
    images above :data:`MAX_PIXELS`. ``target`` (height, width): the size it will be resized to;
    a JPEG above :data:`DRAFT_ABOVE_PIXELS` is then decoded at reduced scale (draft mode), no
    smaller than twice ``target``. ``info["size"]`` receives the full (height, width) after
    orientation, whatever the decoded size."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: image file does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as f:
                w, h = f.size
                if w * h > MAX_PIXELS:
                    raise _too_large(path, w * h, f"{w}x{h} px")
                rotated = _exif_orientation(f) in _ROTATED
                if info is not None:
                    info["size"] = (w, h) if rotated else (h, w)
                if target is not None and f.format == "JPEG" and w * h > DRAFT_ABOVE_PIXELS:
                    th, tw = target
                    want = (2 * th, 2 * tw) if rotated else (2 * tw, 2 * th)  # (width, height) as stored
                    f.draft("RGB", want)
                im = ImageOps.exif_transpose(f).convert("RGB")
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(path, int(found.group(1)) if found else MAX_PIXELS + 1) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    except MemoryError:
        raise DataError(f"{path}: not enough memory to decode this image; downscale it first") from None
    if min(im.size) < min_side:
        raise DataError(f"{path}: image is too small ({im.size[0]}x{im.size[1]} px, need >= {min_side} px per side)")
    return im


def to_tensor(im: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Resize to ``pre.size`` and normalise: ``(pixels / 255 - mean) / std`` in float32, as a
    (3, H, W) tensor. RGB images go through a 256-entry lookup table per channel holding exactly
    those float32 values (bitwise the same as the arithmetic, measured 1.2 against 5.5 ms per
    360x640 image: decoding is part of every extraction's time, ``docs/inference.md``)."""
    h, w = pre.size
    if im.size != (w, h):
        # PIL's bilinear resize widens its filter when shrinking, i.e. it antialiases.
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    pixels = np.asarray(im)
    if not pre.grayscale and pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3:
        table = _normalisation_table(pre.mean, pre.std)
        return torch.from_numpy(np.ascontiguousarray(cv2.LUT(pixels, table).transpose(2, 0, 1)))
    arr = _normalise(np.asarray(pixels, dtype=np.float32), pre.mean, pre.std, pre.grayscale)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _normalise(arr: np.ndarray, mean, std, grayscale: bool = False) -> np.ndarray:
    """(H, W, 3) float32 pixel values 0..255 -> normalised float32, the reference arithmetic."""
    arr = arr / np.float32(255.0)
    if grayscale:
        gray = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        arr = np.repeat(gray[..., None], 3, axis=2)
    return (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


@functools.lru_cache(maxsize=16)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(1, 256, 3) float32: entry (0, v, c) is channel c's normalised value of pixel value v,
    computed with :func:`_normalise`'s float32 operations (hence bitwise equal)."""
    levels = np.repeat(np.arange(256, dtype=np.float32)[:, None], 3, axis=1)[None]
    return np.ascontiguousarray(_normalise(levels, mean, std), dtype=np.float32)


def load_tensor(path: str | Path, pre: Preprocess) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode + resize + normalise one image; returns (C,H,W) tensor and original (H, W)."""
    info: dict = {}
    im = open_image(path, pre.min_side, target=pre.size, info=info)
    return to_tensor(im, pre), info["size"]


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
