"""FoL evaluation with ``fol-region``: one backbone pass per image gives the global descriptor
and the region features, with the recall and ranking of the two-pass pipeline."""

from __future__ import annotations

import pytest
import torch

import placerank.eval.evaluate as evaluate_mod
from placerank.eval.evaluate import EvalConfig, evaluate
from placerank.models import create

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    ("model_name", "reranker"), [("fol-effnet-lite0", "fol-region"), ("selavpr-effnet-lite0", "selavpr-mnn")]
)
def test_local_head_rerank_runs_the_backbone_once_per_image(
    frames_csv, model_name, reranker, tmp_path, gardens, monkeypatch
):
    torch.manual_seed(0)  # ImageNet backbone, seeded random heads
    model = create(model_name, image_size=(128, 224)).eval()
    seen = {"images": 0}
    model.backbone.register_forward_hook(lambda m, inp, out: seen.__setitem__("images", seen["images"] + len(inp[0])))
    db = frames_csv(tmp_path / "db.csv", gardens / "day_right", range(0, 64, 4))
    q = frames_csv(tmp_path / "q.csv", gardens / "night_right", range(2, 64, 4))

    def run(out: str):
        cfg = EvalConfig(
            database=db,
            queries=q,
            frame_tolerance=2,
            out=tmp_path / out,
            rerank=reranker,
            top_k=5,
            num_examples=0,
            use_cache=False,
            num_workers=0,
        )
        seen["images"] = 0
        result = evaluate(cfg, model=model)
        return result, seen["images"], (tmp_path / out / "predictions.csv").read_text()

    one, passes_one, ranking_one = run("one")
    assert passes_one == 16 + 16  # every database and query image once
    # the two-pass pipeline: global pass, then the re-ranker's own pass over candidates and queries
    monkeypatch.setenv("PLACERANK_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(evaluate_mod, "shares_model_head", lambda model, reranker: False)
    two, passes_two, ranking_two = run("two")
    assert passes_two > 16 + 16 + 16
    assert one.recall == two.recall and one.recall_first_stage == two.recall_first_stage
    assert ranking_one == ranking_two
