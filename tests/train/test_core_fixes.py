"""Core behaviours other modules rely on: worker error messages, MNN edge cases, training data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from placerank.data.images import Preprocess
from placerank.data.places import read_training_places
from placerank.errors import DataError
from placerank.rerank.mutual_nn import mnn_counts
from placerank.train.common import PlaceImageDataset


def test_error_raised_in_a_dataloader_worker_stays_one_line(tmp_path, gardens):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    places = read_training_places([gardens / "day_left"], frames=(0, 3))
    places.paths[1] = bad
    loader = torch.utils.data.DataLoader(PlaceImageDataset(places, Preprocess((32, 32))), batch_size=3, num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    assert str(e.value).startswith(f"{bad}: cannot read image (")


def test_mnn_counts_hand_checked_and_empty_candidate():
    q = np.eye(4, dtype=np.float32)
    c1 = np.eye(4, dtype=np.float32)[[2, 0]]  # two exact matches
    c2 = np.zeros((0, 4), dtype=np.float32)  # nothing stored
    c3 = np.array([[0.6, 0.8, 0, 0]], dtype=np.float32)  # one match, cosine 0.8
    assert mnn_counts(q, [c1, c2, c3]).tolist() == [2, 0, 1]
    assert mnn_counts(q, [c1, c2, c3], threshold=0.85).tolist() == [2, 0, 0]
    assert mnn_counts(q, [c1, c2, c3], min_matches=2).tolist() == [2, 0, 0]


def test_traversals_of_different_routes_are_not_merged(shared_data, gardens):
    with pytest.raises(DataError, match="traversal folders from different routes"):
        read_training_places([gardens / "day_left", shared_data / "nordland_seqslam_64x32" / "database_summer"])
    same_route = read_training_places([gardens / "day_left", gardens / "day_right"], frames=(0, 10))
    assert len(same_route) == 20 and sorted(set(same_route.positions.tolist())) == sorted(str(k) for k in range(10))
