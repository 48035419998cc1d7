"""Local-feature networks on the fast path (issue 19): channels_last + inference mode give the
features of the eager fp32 forward (same keypoints, descriptors within 1e-5) on real photos;
a reduced precision is a re-ranker option whose features get their own store; ``placerank
match --precision fp16`` on a CPU is a one-line error."""

from __future__ import annotations

import pytest
import torch

from placerank.cli import main
from placerank.data.images import Preprocess, load_tensor
from placerank.descriptors.extract import local_precision, local_store_for
from placerank.errors import PlaceRankError
from placerank.models.localfeat import create_features
from placerank.rerank.base import create_reranker
from placerank.rerank.ransac import AUTO_PRECISION, resolve_local_precision

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = (288, 512)  # 16:9 like GardensPoint, a multiple of 32


def _eager(net, images):
    """The forward as it was before issue 19: contiguous weights and input, no_grad."""
    net.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        out = net.detect(images.contiguous())
    net.to(memory_format=torch.channels_last)
    return out


def _pair_up(a, b, tol: float):
    """For every keypoint of ``a``, the distance to and index of the nearest keypoint of ``b``."""
    d, j = torch.cdist(a.keypoints, b.keypoints, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    assert len(a.keypoints) == len(b.keypoints)
    assert float(d.max()) <= tol, float(d.max())
    return j


@pytest.mark.parametrize(
    "kind,tol",
    # XFeat keypoints are pixel positions: exactly equal (near-tied scores may swap order).
    # ALIKED refines them by soft-argmax: equal up to float noise (measured 6e-5 px).
    [("xfeat", 0.0), ("aliked", 1e-3)],
)
def test_channels_last_inference_mode_matches_eager_fp32(gardens, kind, tol):
    net = create_features(kind, max_keypoints=1024)
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    pre = Preprocess(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), min_side=32)
    images = torch.stack(
        [load_tensor(gardens / side / "Image070.jpg", pre)[0] for side in ("day_right", "night_right")]
    )
    ref = _eager(net, images)
    fast = net.extract(images)
    for a, b in zip(ref, fast):
        assert b.descriptors.is_inference() and b.descriptors.dtype == torch.float32
        assert len(a.keypoints) > 200  # a real photo, real detections
        j = _pair_up(a, b, tol)
        assert float((a.descriptors - b.descriptors[j]).abs().max()) <= 1e-5
        assert float((a.scores - b.scores[j]).abs().max()) <= 1e-5


def test_bf16_xfeat_stays_close_to_fp32(gardens):
    """bf16 autocast of the CNN only: floors from benchmarks/local_extraction.py (>= 0.95 of the
    keypoints within 1 px, descriptor cosine >= 0.99 on GardensPoint at 360x640)."""
    net = create_features("xfeat", max_keypoints=1024)
    pre = Preprocess(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), min_side=32)
    images = load_tensor(gardens / "day_right" / "Image070.jpg", pre)[0][None]
    a = net.extract(images)[0]
    b = net.set_precision("bf16").extract(images)[0]
    assert b.descriptors.dtype == torch.float32
    d, j = torch.cdist(a.keypoints, b.keypoints, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    near = d <= 1.0
    assert float(near.float().mean()) >= 0.9
    assert float((a.descriptors[near] * b.descriptors[j[near]]).sum(-1).min()) >= 0.98
    with pytest.raises(PlaceRankError, match="precision 'int8': use one of fp32, bf16, fp16"):
        net.set_precision("int8")


def test_precision_option_keys_the_local_store(tmp_path):
    fp32 = create_reranker("ransac-xfeat", image_size=(288, 512), precision="fp32")
    bf16 = create_reranker("ransac-xfeat", image_size=(288, 512), precision="bf16")
    assert (fp32.precision, bf16.precision, bf16.net.precision) == ("fp32", "bf16", "bf16")
    assert bf16.signature() == fp32.signature() + ":bf16"  # fp32 stores from before keep their name
    assert local_precision(None, bf16, "fp32") == "bf16" and local_precision(None, fp32, "bf16") == "fp32"
    a = local_store_for(fp32, tmp_path, local_precision(None, fp32, "fp32"))
    b = local_store_for(bf16, tmp_path, local_precision(None, bf16, "fp32"))
    c = local_store_for(bf16, tmp_path, "fp32")  # the precision is in the folder name's hash too
    assert len({a.folder, b.folder, c.folder}) == 3 and b.signature.endswith(":bf16")
    for store in (a, b, c):
        store.close()
    auto = create_reranker("ransac-xfeat", image_size=(288, 512))  # default: precision=auto
    assert auto.precision == AUTO_PRECISION.get(("xfeat", "cpu"), "fp32")
    assert resolve_local_precision("auto", "disk", "cuda") == AUTO_PRECISION.get(("disk", "cuda"), "fp32")
    with pytest.raises(PlaceRankError, match="needs a CUDA device"):
        create_reranker("ransac-aliked", precision="fp16")
    with pytest.raises(PlaceRankError, match="precision 'fp64': use one of auto, fp32, bf16, fp16"):
        create_reranker("ransac-aliked", precision="fp64")


def test_match_fp16_on_cpu_is_one_line(gardens, capsys):
    img = str(gardens / "day_right" / "Image070.jpg")
    rc = main(["match", img, img, "--precision", "fp16", "--device", "cpu"])
    assert rc == 2
    assert capsys.readouterr().err == (
        "placerank: error: --precision fp16 needs a CUDA device (the device is cpu); "
        "use --precision bf16 or fp32 on CPU\n"
    )
