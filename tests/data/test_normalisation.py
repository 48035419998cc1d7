"""The lookup-table normalisation gives exactly the reference arithmetic's tensors, so every
descriptor (and descriptor cache) made before it stays valid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from placerank.data.images import Preprocess, open_image, to_tensor


def _reference(im: Image.Image, pre: Preprocess) -> np.ndarray:
    h, w = pre.size
    arr = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    if pre.grayscale:
        gray = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        arr = np.repeat(gray[..., None], 3, axis=2)
    arr = (arr - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return arr.transpose(2, 0, 1)


@pytest.mark.parametrize(
    "pre",
    [
        Preprocess((360, 640)),  # ImageNet statistics
        Preprocess((240, 320), mean=(123.68 / 255, 116.779 / 255, 103.939 / 255), std=(1 / 255,) * 3),  # SFRS
        Preprocess((120, 160), grayscale=True),
    ],
    ids=["imagenet", "vgg-0-255", "grayscale"],
)
def test_tensors_equal_the_reference_arithmetic_bitwise(pre, gardens):
    for folder in ("day_right", "night_right"):
        for path in sorted((gardens / folder).glob("*.jpg"))[:6]:
            im = open_image(path)
            got = to_tensor(im, pre)
            assert got.shape == (3, *pre.size) and got.is_contiguous()
            assert np.array_equal(got.numpy(), _reference(im, pre)), path


def test_every_pixel_value_maps_like_the_arithmetic():
    pre = Preprocess((16, 256))
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 16, axis=0).repeat(3, axis=2)
    ramp[..., 1] = ramp[..., 1][:, ::-1]  # each channel its own order
    im = Image.fromarray(ramp)
    got = to_tensor(im, pre).numpy()
    assert np.array_equal(got, _reference(im, pre))
    # hand-derived: pixel 255 in the red channel is (1 - 0.485) / 0.229
    assert got[0, 0, 255] == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)
