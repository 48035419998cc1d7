"""OpenVINO checks run in their own process by tests/descriptors/test_runtime.py: OpenVINO and
ONNX Runtime (which tests/models/test_onnx_export.py loads) in one process corrupted the heap here,
so the pytest process never loads OpenVINO. ``python openvino_checks.py NAME`` prints JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from placerank.descriptors.extract import extract_features
from placerank.descriptors.fast import prepare_inference
from placerank.descriptors.runtime import exported_path
from placerank.models import create
from placerank.rerank.base import create_reranker

CPU = torch.device("cpu")


class Sink(dict):
    def add_many(self, items):
        self.update(items)


def global_descriptors(images: list[Path]) -> dict:
    torch.manual_seed(0)
    model = create("effnet-lite0-gem", image_size=(96, 128)).eval()
    reference = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False)[0]
    prepare_inference(model, CPU, "off", "openvino")
    d = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False)[0]
    bf16 = extract_features(model, images, CPU, 4, 0, use_cache=False, progress=False, precision="bf16")[0]
    return {
        "fp32_max_diff": float(np.abs(d - reference).max()),
        "bf16_min_cosine": float(np.sum(bf16 * reference, axis=1).min()),
        "exported": exported_path(model).is_file(),
        # the export was checked with OpenVINO: ONNX Runtime's native libraries never loaded here
        "onnxruntime_loaded": "onnxruntime" in sys.modules,
    }


def fol_local(images: list[Path]) -> dict:
    torch.manual_seed(0)
    model = create("fol-effnet-lite0", image_size=(128, 160)).eval()
    reranker = create_reranker("fol-region", model=model)
    want, have = Sink(), Sink()
    ref, _ = extract_features(model, images, CPU, 4, 0, False, reranker=reranker, store=want, progress=False)
    prepare_inference(model, CPU, "off", "openvino")
    got, _ = extract_features(model, images, CPU, 4, 0, False, reranker=reranker, store=have, progress=False)
    same_keys = sorted(have) == sorted(want)
    return {
        "global_max_diff": float(np.abs(got - ref).max()),
        "same_keys": same_keys,
        "keypoints_equal": same_keys and all(np.array_equal(have[k].keypoints, want[k].keypoints) for k in want),
        "descriptor_max_diff": max(float(np.abs(have[k].descriptors - want[k].descriptors).max()) for k in want),
        "score_max_diff": max(float(np.abs(have[k].scores - want[k].scores).max()) for k in want),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    name, folder = sys.argv[1], Path(sys.argv[2])
    paths = sorted(folder.glob("*.jpg"))[10:15]
    print(json.dumps({"global": global_descriptors, "fol": fol_local}[name](paths)))
