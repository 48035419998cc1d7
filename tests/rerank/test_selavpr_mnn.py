"""``selavpr-mnn`` re-ranker: MNN counts, chunking, float16 store, matches, contract errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from placerank.data.images import load_tensor
from placerank.descriptors.local_store import LocalFeatureStore
from placerank.errors import PlaceRankError
from placerank.models import create
from placerank.models.base import LocalFeatures
from placerank.rerank import create_reranker, list_rerankers, rerank_order
from placerank.rerank.selavpr_mnn import SelaVPRMNNReranker

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def small_model():
    return create("selavpr-effnet-lite0", image_size=(128, 224)).eval()


def _brute_mnn(q: np.ndarray, c: np.ndarray) -> int:
    s = c.astype(np.float64) @ q.astype(np.float64).T
    a = s.argmax(0)  # best candidate row per query column
    b = s.argmax(1)  # best query column per candidate row
    return int((b[a] == np.arange(q.shape[0])).sum())


def _lf(desc: np.ndarray) -> LocalFeatures:
    n = desc.shape[0]
    return LocalFeatures(keypoints=np.zeros((n, 2), np.float32), descriptors=desc, image_size=(10, 10))


def _unit(rng, n, d=128):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_registered_and_needs_a_selavpr_model():
    entry = {e.name: e for e in list_rerankers()}["selavpr-mnn"]
    assert entry.needs_model
    gem = create("effnet-lite0-gem", pretrained=False)
    with pytest.raises(PlaceRankError) as e:
        create_reranker("selavpr-mnn", model=gem)
    assert str(e.value) == "re-ranker 'selavpr-mnn' needs a SelaVPR model (--model selavpr-...), got 'effnet-lite0-gem'"
    with pytest.raises(PlaceRankError, match="got 'no model'"):
        create_reranker("selavpr-mnn")


def test_scores_are_mnn_counts_for_any_chunk(small_model):
    rng = np.random.default_rng(0)
    q = _unit(rng, 300)
    # candidates of different sizes, some sharing features with the query
    cands = []
    for k, n in enumerate([300, 250, 300, 120, 300, 10]):
        c = _unit(rng, n)
        m = min(n, 40 * k)
        c[:m] = q[:m] + 0.05 * _unit(rng, m)
        cands.append(c / np.linalg.norm(c, axis=1, keepdims=True))
    expected = np.array([_brute_mnn(q, c) for c in cands])
    expected[expected < 2] = 0  # official quirk: one match scores 0
    official = {"threshold": -1.0, "fusion": "none"}  # the official count (no threshold, no fusion)
    big = SelaVPRMNNReranker(small_model, max_chunk_mb=512, **official)
    tiny = SelaVPRMNNReranker(small_model, max_chunk_mb=0.5, **official)  # one candidate per product
    assert tiny.chunk_size(300, 300) == 1 and big.chunk_size(300, 300) > len(cands)
    s_big = big.score(_lf(q), [_lf(c) for c in cands])
    s_tiny = tiny.score(_lf(q), [_lf(c) for c in cands])
    assert np.array_equal(s_big, expected) and np.array_equal(s_tiny, expected)
    assert expected[4] > expected[2] > expected[1]  # more shared structure, more mutual matches
    # pairs from matches() are exactly what is counted
    pairs = big.matches(_lf(q), _lf(cands[4]))
    assert len(pairs) == expected[4]
    s = cands[4] @ q.T
    assert np.all(s.argmax(0)[pairs[:, 0]] == pairs[:, 1]) and np.all(s.argmax(1)[pairs[:, 1]] == pairs[:, 0])
    # order: descending count, ties by first-stage rank
    assert list(rerank_order(np.array([3, 5, 3, 0]))) == [1, 0, 2, 3]


def test_real_images_store_fp16_and_keypoints(small_model, gardens, tmp_path):
    rr = create_reranker("selavpr-mnn", model=small_model, fusion="none").to(torch.device("cpu"))
    assert rr.preprocess == small_model.preprocess and rr.dim == 128
    paths = [
        gardens / "day_right" / "Image050.jpg",
        gardens / "night_right" / "Image050.jpg",
        gardens / "day_right" / "Image120.jpg",
    ]
    batch, sizes = zip(*(load_tensor(p, rr.preprocess) for p in paths))
    feats = rr.extract(torch.stack(batch), list(sizes))
    gh, gw = small_model.grid_size()
    assert (gh, gw) == (13, 25)
    assert feats[0].descriptors.shape == (gh * gw, 128) and feats[1].image_size == (360, 640)
    assert feats[0].keypoints[:, 0].max() <= 959 and feats[0].keypoints[:, 1].max() <= 539
    store = LocalFeatureStore(tmp_path / "store", rr.signature(), rr.dim)
    store.add_many([(str(p), f) for p, f in zip(paths, feats)])
    assert store.bytes_per_image() == gh * gw * (2 * 128 + 8 + 4)
    back = [store.get(str(p)) for p in paths]
    assert back[0].descriptors.dtype == np.float16
    s32 = rr.score(feats[1], [feats[0], feats[2]])
    s16 = rr.score(back[1], [back[0], back[2]])
    assert np.abs(s16 - s32).max() <= 2  # fp16 storage may flip a near-tie, not the counts
    assert rr.signature().startswith(f"selavpr-mnn:selavpr-effnet-lite0:{small_model.weights_id}:128x224")


@pytest.mark.slow
def test_trained_head_rerank_beats_global_on_held_out_gardenspoint(gardens, tmp_path):
    """Train briefly (``placerank train --method selavpr``, GardensPoint frames 0-59 of the three
    traversals, 40 steps at 224x400), then retrieve held-out frames 100-139: database day_right,
    queries night_right, |i - j| <= 2, top-5 re-ranked by ``selavpr-mnn``.

    Measured here (deterministic on CPU, same with 1 or 2 threads): global R@1 0.65 before and
    after these 40 steps; MNN re-ranking with the untrained (random) head 0.575, with the trained
    head 0.70.
    """
    import torch.nn.functional as F

    from placerank.train.common import TrainConfig, run_training
    from placerank.train.selavpr import FeatureSource

    torch.manual_seed(0)
    cfg = TrainConfig(
        method="selavpr",
        train=[str(gardens / t) for t in ("day_left", "day_right", "night_right")],
        out=tmp_path / "run",
        frames=(0, 60),
        image_size=(224, 400),
        num_workers=0,
        options={"queries_per_loop": 160, "negative_pool": 180},
    )
    trained = create("selavpr-effnet-lite0", weights=str(run_training(cfg))).eval()
    untrained = create("selavpr-effnet-lite0", image_size=(224, 400)).eval()
    paths = [gardens / "day_right" / f"Image{k:03d}.jpg" for k in range(100, 140)] + [
        gardens / "night_right" / f"Image{k:03d}.jpg" for k in range(100, 140)
    ]

    prefix = FeatureSource(untrained, paths, "cpu").get(range(80))  # frozen stages: same for both

    def recalls(model):
        with torch.no_grad():
            fmap = model.backbone.forward_from_prefix(prefix).feature_map
            g = F.normalize(model.aggregator(fmap), dim=-1).numpy()
            dense = model.LocalAdapt(fmap).flatten(2).transpose(1, 2).numpy()
        top = np.argsort(-(g[40:] @ g[:40].T), axis=1)[:, :5]
        rr = create_reranker("selavpr-mnn", model=model, threshold=-1.0, fusion="none")  # official count
        reranked = np.stack(
            [top[q][rerank_order(rr.score(_lf(dense[40 + q]), [_lf(dense[j]) for j in top[q]]))] for q in range(40)]
        )

        def r1(ids):
            return float(np.mean(np.abs(ids[:, 0] - np.arange(40)) <= 2))

        return r1(top), r1(reranked)

    g0, rr0 = recalls(untrained)
    g1, rr1 = recalls(trained)
    print(f"global {g0:.3f} -> {g1:.3f}; selavpr-mnn untrained head {rr0:.3f}, trained head {rr1:.3f}")
    assert g0 >= 0.6 and g1 >= g0 - 0.025
    assert rr1 >= g1  # re-ranking keeps or improves R@1 (measured +0.05) ...
    assert rr1 >= rr0 + 0.075  # ... because the head was trained (measured +0.125)


def test_rank_fusion_hand_values_and_backbone_defaults(small_model, monkeypatch):
    from placerank.rerank.selavpr_mnn import rank_fusion

    # counts (0, 9, 0): z = (-0.7071, 1.4142, -0.7071); positions 0, -1, -2: z = (1.2247, 0, -1.2247)
    assert np.allclose(rank_fusion(np.array([0, 9, 0])), [0.5176381, 1.4142136, -1.9318517])
    assert list(rerank_order(rank_fusion(np.array([4, 4, 4])))) == [0, 1, 2]  # equal counts: global order
    cnn = create_reranker("selavpr-mnn", model=small_model)
    assert (cnn.threshold, cnn.fusion) == (0.7, "rank")
    from placerank.rerank.base import reranker_options

    opts = reranker_options("selavpr-mnn", ["fusion=none", "threshold=-1"])  # --rerank-option: the official count
    assert create_reranker("selavpr-mnn", model=small_model, **opts).fusion == "none"
    monkeypatch.setattr(small_model, "name", "selavpr-vitl14")  # official backbones: the official count
    vit = create_reranker("selavpr-mnn", model=small_model)
    assert (vit.threshold, vit.fusion) == (None, "none")
    with pytest.raises(PlaceRankError, match="^selavpr-mnn option fusion must be one of auto, none, rank, got 'sum'$"):
        create_reranker("selavpr-mnn", model=small_model, fusion="sum")


def test_default_scoring_does_not_lower_held_out_recall(gardens):
    """Untrained selavpr-effnet-lite0 at 224 x 400, GardensPoint frames 100-139, db day_right,
    queries night_right, |i - j| <= 2, top-5. Measured: global R@1 0.65; official count 0.55;
    default (cos > 0.7, rank fusion) 0.725."""
    torch.manual_seed(0)
    model = create("selavpr-effnet-lite0", image_size=(224, 400)).eval()
    feats = {}
    for t in ("day_right", "night_right"):
        batch = [load_tensor(gardens / t / f"Image{k:03d}.jpg", model.preprocess) for k in range(100, 140)]
        with torch.no_grad():
            feats[t] = model.encode(torch.stack([b[0] for b in batch]), [b[1] for b in batch], {})
    g = (feats["night_right"][0] @ feats["day_right"][0].T).numpy()
    top = np.argsort(-g, axis=1, kind="stable")[:, :5]

    def r1(rr) -> float:
        db, q = feats["day_right"][1], feats["night_right"][1]
        first = [top[i][rerank_order(rr.score(q[i], [db[j] for j in top[i]]))][0] for i in range(40)]
        return float(np.mean(np.abs(np.array(first) - np.arange(40)) <= 2))

    r_global = float(np.mean(np.abs(top[:, 0] - np.arange(40)) <= 2))
    r_official = r1(create_reranker("selavpr-mnn", model=model, threshold=-1.0, fusion="none"))
    r_default = r1(create_reranker("selavpr-mnn", model=model))
    print(f"global {r_global:.3f} official count {r_official:.3f} default {r_default:.3f}")
    assert r_global == pytest.approx(0.65) and r_official < r_global  # the problem, measured
    assert r_default > r_global  # measured 0.725
