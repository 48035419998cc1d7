"""Uploaded photos are checked before any model sees them: size, type, pixel count, decodability.

Every refusal is an :class:`UploadError` with the HTTP status and a one-line message:
413 (over the size limit), 415 (not an image, or a format we do not read), 422 (corrupt or
truncated pixels, or a decompression bomb: more pixels than ``max_pixels``, checked from the
header before any pixel is decoded).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# What the extraction loop reads (PIL) and a phone or robot sends.
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
MAX_PIXELS = 100_000_000  # 100 MP: above any phone photo; a bomb is refused from its header


class UploadError(Exception):
    """A refused upload: ``status`` (413, 415, 422) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    format: str  # PIL's name: JPEG, PNG, ...
    suffix: str  # file suffix to write it under
    width: int
    height: int


def safe_name(filename: str | None, default: str = "upload") -> str:
    """The client's file name reduced to a harmless base name (no folders, no odd characters)."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:100]
    return base or default


def check_image(data: bytes, limit_bytes: int, max_pixels: int = MAX_PIXELS) -> CheckedImage:
    """Refuse anything that is not a decodable still image of a sensible size."""
    if len(data) > limit_bytes:
        raise UploadError(413, f"upload is {len(data) / 1e6:.1f} MB; the limit is {limit_bytes / 1e6:g} MB")
    if not data:
        raise UploadError(422, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UploadError(415, "not an image (expected JPEG, PNG, WebP, BMP or TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(422, "image has too many pixels (decompression bomb refused)") from None
    except Exception as e:  # a header PIL cannot parse
        raise UploadError(422, f"corrupt image ({type(e).__name__})") from None
    with img:
        fmt = img.format or ""
        if fmt not in FORMATS:
            raise UploadError(415, f"image format {fmt or 'unknown'} is not accepted (JPEG, PNG, WebP, BMP, TIFF)")
        width, height = img.size
        if width * height > max_pixels:
            raise UploadError(
                422, f"image is {width}x{height} = {width * height / 1e6:.0f} MP; the limit is {max_pixels / 1e6:g} MP"
            )
        if getattr(img, "n_frames", 1) > 1 and fmt != "TIFF":
            raise UploadError(415, "animated images are not accepted")
        try:
            img.draft("RGB", (min(width, 1024), min(height, 1024)))  # JPEG: decode at reduced size (fast)
            img.load()
        except Exception as e:  # truncated or damaged pixels
            raise UploadError(422, f"corrupt image: cannot decode its pixels ({type(e).__name__})") from None
    return CheckedImage(data, fmt, FORMATS[fmt], width, height)
