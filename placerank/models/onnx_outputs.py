"""An exported model's outputs -> placerank's :class:`LocalFeatures`, in numpy.

The ONNX graph (:mod:`placerank.models.onnx_export`) stops where :meth:`VPRModel.encode` turns
tensors into per-image sets. This module is that last step, written from the file's outputs and
``metadata_props`` alone (no torch model), so it is both the reference for a deployment that
re-implements it and the test that the documented mapping is the one placerank uses: it gives
the same keypoints, descriptors and scores as ``model.encode(images, sizes, {})``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from placerank.errors import PlaceRankError
from placerank.models.base import LocalFeatures


def _cell_pixels(cells: np.ndarray, stride: float, in_hw: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """(n, 2) up-conv cells (row u, col v) -> (n, 2) pixel (x, y) in the original image: cell u sits
    at feature-map position u/4, i.e. input pixel ``stride*u/4 + stride/2``, scaled to the image
    and clamped into it (a "same"-padded CNN map overhangs the input by up to half a cell)."""
    (in_h, in_w), (oh, ow) = in_hw, size
    cells = cells.astype(np.float32)
    ys = ((cells[:, 0] / 4.0 * stride + stride / 2.0) * (float(oh) / in_h)).clip(0, oh - 1)
    xs = ((cells[:, 1] / 4.0 * stride + stride / 2.0) * (float(ow) / in_w)).clip(0, ow - 1)
    return np.stack([xs, ys], axis=1).astype(np.float32)


def _top_patches(score: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores, sorted by patch index (as ``FoLModel.select_regions``)."""
    order = np.argsort(-score, kind="stable")[: min(n, score.size)]
    return np.sort(order)


def _fol_sets(
    meta: Mapping[str, Any], out: Mapping[str, np.ndarray], sizes: Sequence[Sequence[int]], num_regions: int
) -> list[LocalFeatures]:
    stride, in_hw = float(meta["backbone_stride"]), meta["input_size"]
    mode = str(meta["local_mode"])
    R = out["region_score"]  # (B, h, w)
    B, h, w = R.shape
    L = out["local_map"]  # (B, 128, 4h-3, 4w-3)
    Hl, Wl = L.shape[-2:]
    sets = []
    for b in range(B):
        score = R[b].reshape(-1)
        idx = _top_patches(score, num_regions)
        size = (int(sizes[b][0]), int(sizes[b][1]))
        if mode in ("pool3", "center"):
            desc = out["patch_descriptors"][b].reshape(L.shape[1], h * w)[:, idx].T
            cells = np.stack([4 * (idx // w), 4 * (idx % w)], axis=1)
            scores = score[idx]
        else:  # dense: every cell whose nearest source patch (floor(u*h/H')) is selected
            src = ((np.arange(Hl) * h) // Hl)[:, None] * w + ((np.arange(Wl) * w) // Wl)[None, :]
            selected = np.zeros(h * w, dtype=bool)
            selected[idx] = True
            cell_idx = np.flatnonzero(selected[src.reshape(-1)])
            desc = L[b].reshape(L.shape[1], -1)[:, cell_idx].T
            cells = np.stack([cell_idx // Wl, cell_idx % Wl], axis=1)
            scores = score[src.reshape(-1)[cell_idx]]
        sets.append(
            LocalFeatures(
                keypoints=_cell_pixels(cells, stride, in_hw, size),
                descriptors=np.ascontiguousarray(desc, dtype=np.float32),
                scores=np.ascontiguousarray(scores, dtype=np.float32),
                image_size=size,
            )
        )
    return sets


def _dense_sets(meta: Mapping[str, Any], out: Mapping[str, np.ndarray], sizes: Sequence[Sequence[int]]):
    """SelaVPR: every cell of the dense map, row-major, at its grid position (``grid_positions``)."""
    stride, in_hw = float(meta["backbone_stride"]), meta["input_size"]
    L = out["local_map"]
    B, C, gh, gw = L.shape
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    cells = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1)
    return [
        LocalFeatures(
            keypoints=_cell_pixels(cells, stride, in_hw, (int(s[0]), int(s[1]))),
            descriptors=np.ascontiguousarray(L[b].reshape(C, -1).T, dtype=np.float32),
            image_size=(int(s[0]), int(s[1])),
        )
        for b, s in zip(range(B), sizes)
    ]


def local_features_from_outputs(
    meta: Mapping[str, Any],
    outputs: Mapping[str, np.ndarray],
    original_sizes: Sequence[Sequence[int]],
    num_regions: int | None = None,
) -> list[LocalFeatures]:
    """Each image's :class:`LocalFeatures` from an exported model's outputs (``outputs``: name ->
    array, ``meta``: :func:`~placerank.models.onnx_export.read_metadata`), keypoints in the
    original images' pixels (``original_sizes``: (height, width) per image). FoL takes the top
    ``num_regions`` (default: the model's) patches of ``region_score``."""
    if "region_score" in outputs:
        return _fol_sets(meta, outputs, original_sizes, int(num_regions or meta["num_regions"]))
    if "local_map" in outputs:
        return _dense_sets(meta, outputs, original_sizes)
    raise PlaceRankError(f"model '{meta.get('model')}' was exported without a local head")
