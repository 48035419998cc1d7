"""A database whose re-ranker scores the model's own local head (FoL's ``fol-region``): ``index
--rerank`` stores each photo's global descriptor and region features from one backbone pass, and
``localize --rerank`` describes the query with one pass too, reading candidates from the store."""

from __future__ import annotations

import pytest

import placerank

pytestmark = pytest.mark.usefixtures("single_thread")


def test_fol_region_database_runs_the_backbone_once_per_photo(tum, tum_positions, make_model, tmp_path):
    positions = tum_positions("one_pass.csv", 0, 96, 12)
    model = make_model("fol-effnet-lite0", image_size=(128, 224))  # ImageNet backbone, seeded random heads
    seen = {"images": 0}
    model.backbone.register_forward_hook(lambda m, inp, out: seen.__setitem__("images", seen["images"] + len(inp[0])))

    with placerank.Database.create(tmp_path / "db", model=model, radius=0.3) as db:
        rep = db.add_folder(positions=positions, rerank="fol-region", progress=False)
        assert len(rep.added) == 8 and rep.extracted == 8 and rep.local_extracted == 8 and rep.failed == []
        assert seen["images"] == 8  # global descriptor + region features: one pass per photo
        assert len(list((tmp_path / "db" / "local").glob("fol-region-*/meta.json"))) == 1

        rep = db.add_folder(positions=positions, rerank="fol-region", progress=False)
        assert (rep.unchanged, rep.extracted, rep.local_extracted, seen["images"]) == (8, 0, 0, 8)

        seen["images"] = 0
        query = tum / "queries" / "0400_1305031466.127640.jpg"
        res = db.localize(query, top_k=5, rerank="fol-region")
        assert seen["images"] == 1  # the query once; the candidates' features come from the store
        assert not any("extracted now" in n for n in res.notes)
        scores = [m.rerank_score for m in res.matches]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        assert res.found and res.rerank == "fol-region"
