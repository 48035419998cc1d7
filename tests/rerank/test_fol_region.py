"""``--rerank fol-region``: MNN counts (cos > 0.7) on region features, float16 store, matches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from placerank.data.images import load_tensor
from placerank.descriptors.local_store import LocalFeatureStore
from placerank.errors import PlaceRankError
from placerank.models import create
from placerank.models.base import LocalFeatures
from placerank.rerank.base import create_reranker, list_rerankers, rerank_order


def _lf(desc) -> LocalFeatures:
    d = np.asarray(desc, dtype=np.float32)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    return LocalFeatures(keypoints=np.zeros((len(d), 2), np.float32), descriptors=d, image_size=(10, 10))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # ImageNet backbone, randomly initialised FoL heads (seeded)
    return create("fol-effnet-lite0").eval()


def test_registered_and_refuses_other_models():
    entry = {e.name: e for e in list_rerankers()}["fol-region"]
    assert entry.needs_model
    with pytest.raises(
        PlaceRankError,
        match=r"^--rerank fol-region needs a FoL model \(fol-effnet-lite0, fol-vitb14, "
        r"fol-vitl14\), got 'effnet-lite0-gem'$",
    ):
        create_reranker("fol-region", model=create("effnet-lite0-gem"))


def test_score_counts_mutual_nn_above_threshold_and_matches(model):
    rr = create_reranker("fol-region", model=model)
    q = _lf([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    c_two = _lf([[1, 0.1, 0], [0.1, 1, 0], [-1, 0, 0.2]])  # two mutual NNs with cos ~.995
    c_low = _lf([[1, 1.2, 0], [0, 0, -1]])  # mutual NN (q1, c0) has cos .77; q0 not mutual
    c_none = _lf([[1, 1, 1]])  # cos .577 < .7
    c_empty = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 3), np.float32))
    scores = rr.score(q, [c_none, c_low, c_two, c_empty])
    assert scores.tolist() == [0.0, 1.0, 2.0, 0.0]
    assert rerank_order(np.array([1.0, 2.0, 2.0, 0.0])).tolist() == [1, 2, 0, 3]  # ties by first-stage rank
    assert rr.matches(q, c_two).tolist() == [[0, 0], [1, 1]]
    assert rr.matches(q, c_low).tolist() == [[1, 0]]
    assert rr.matches(q, c_empty).shape == (0, 2)
    strict = create_reranker("fol-region", model=model, threshold=0.8)
    assert strict.score(q, [c_low]).tolist() == [0.0]


def test_single_pair_before_the_threshold_official_for_vit_models(model, monkeypatch):
    # c_low of the test above: one mutual pair before the 0.7 threshold, (q1, c0) at cos .77
    q = _lf([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    c_low = _lf([[1, 1.2, 0], [0, 0, -1]])
    c_two = _lf([[1, 0.1, 0], [0.1, 1, 0], [-1, 0, 0.2]])
    cnn = create_reranker("fol-region", model=model)
    assert cnn.single_pair_zero is False and cnn.score(q, [c_low, c_two]).tolist() == [1.0, 2.0]
    official = create_reranker("fol-region", model=model, single_pair_zero=True)
    assert official.score(q, [c_low, c_two]).tolist() == [0.0, 2.0]  # official match_batch_tensor
    # fol-vit* (official backbones and weights) default to the official rule; the decision reads
    # only the model's name (building a ViT here would take half a minute)
    monkeypatch.setattr(model, "name", "fol-vitl14")
    vit = create_reranker("fol-region", model=model)
    assert vit.single_pair_zero is True and vit.score(q, [c_low]).tolist() == [0.0]
    assert create_reranker("fol-region", model=model, single_pair_zero=False).single_pair_zero is False


def test_real_images_store_bytes_and_same_place_ranking(model, gardens, tmp_path):
    rr = create_reranker("fol-region", model=model).to("cpu")
    paths = [gardens / "day_left" / "Image120.jpg"] + [
        gardens / "day_right" / f"Image{k:03d}.jpg" for k in (10, 60, 120)
    ]
    images, sizes = zip(*(load_tensor(p, rr.preprocess) for p in paths))
    feats = rr.extract(torch.stack(images), list(sizes))
    assert all(len(f) == 225 and f.descriptors.shape == (225, 128) for f in feats)
    assert feats[0].image_size == (540, 960) and feats[0].keypoints[:, 0].max() < 960
    store = LocalFeatureStore(tmp_path / "store", rr.signature(), rr.dim)
    store.add_many([(str(p), f) for p, f in zip(paths[1:], feats[1:])])
    assert store.bytes_per_image() == 225 * (2 * 128 + 8 + 4) <= 64 * 1024  # 60,300 B per image
    back = [store.get(str(p)) for p in paths[1:]]
    assert back[2].descriptors.dtype == np.float16
    s16 = rr.score(feats[0], back)
    s32 = rr.score(feats[0], feats[1:])
    assert np.abs(s16 - s32).max() <= 2  # float16 storage barely moves the counts
    # same place (frame 120, lateral shift) beats frames 10 and 60 even with untrained heads
    assert int(np.argmax(s16)) == 2 and s16[2] >= s16[:2].max() + 10
    # the dense (official) set of the same region is ~15x larger
    dense = create_reranker("fol-region", model=model, mode="dense").extract(images[0][None], [sizes[0]])[0]
    assert 9 * 225 <= len(dense) <= 16 * 225
    assert rr.signature() != create_reranker("fol-region", model=model, mode="dense").signature()
    store.close()


def test_cpu_scorer_equals_batched_torch_scorer():
    from placerank.rerank.mutual_nn import mnn_counts, mnn_counts_cpu

    rng = np.random.default_rng(0)

    def unit(n):
        x = rng.standard_normal((n, 16)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    q = unit(60)
    cands = [unit(n) for n in (60, 31, 90, 60, 1, 0)]
    for th in (0.3, 0.5, 0.7):
        ours = mnn_counts_cpu(q, cands, th)
        assert np.array_equal(ours, mnn_counts(q, cands, threshold=th, chunk=4)) and ours[-1] == 0
    assert mnn_counts_cpu(q, cands, 0.3, min_matches=5).min() == 0
    assert np.array_equal(mnn_counts_cpu(q, cands, 0.5, max_chunk_mb=0.01), mnn_counts_cpu(q, cands, 0.5))
    assert mnn_counts_cpu(q[:0], cands).tolist() == [0] * 6
