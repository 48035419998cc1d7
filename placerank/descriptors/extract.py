"""Feature extraction: batched inference over a DataLoader (decode + resize in workers),
with the on-disk descriptor cache and local-feature store in front of it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from placerank.data.images import check_batch_errors, make_loader
from placerank.descriptors.cache import DescriptorCache, cache_root, image_key, namespace


def descriptor_cache_for(model) -> DescriptorCache:
    ns = namespace(model.name, model.weights_id, model.preprocess.signature())
    return DescriptorCache(ns, model.descriptor_dim)


@torch.inference_mode()
def extract_global(
    model,
    paths: Sequence[str | Path],
    device: torch.device,
    batch_size: int = 16,
    num_workers: int | None = None,
    use_cache: bool = True,
    desc: str = "extract",
) -> np.ndarray:
    """(N, D) float32 L2-normalised descriptors of ``paths`` in order; cached images are read
    from the cache, the rest extracted and committed batch by batch (resumable)."""
    paths = [Path(p) for p in paths]
    out = np.zeros((len(paths), model.descriptor_dim), dtype=np.float32)
    keys = [image_key(p) for p in paths]
    cache = descriptor_cache_for(model) if use_cache else None
    todo = list(range(len(paths)))
    if cache is not None:
        hits = cache.get_many(keys)
        todo = [i for i, k in enumerate(keys) if k not in hits]
        for i, k in enumerate(keys):
            if k in hits:
                out[i] = hits[k]
    if todo:
        model.eval()
        loader = make_loader(
            [paths[i] for i in todo], model.preprocess, batch_size, num_workers, pin_memory=device.type == "cuda"
        )
        bar = tqdm(total=len(todo), desc=f"{desc} ({model.name})", unit="img", leave=False)
        for idx, images, _, errors in loader:
            check_batch_errors(errors)
            d = model(images.to(device, non_blocking=True)).float().cpu().numpy()
            rows = [todo[int(i)] for i in idx]
            out[rows] = d
            if cache is not None:
                cache.put_many((keys[r], d[j]) for j, r in enumerate(rows))
            bar.update(len(rows))
        bar.close()
    if cache is not None:
        cache.close()
    return out


def local_store_for(reranker):
    from placerank.descriptors.local_store import LocalFeatureStore

    folder = cache_root() / "local" / namespace(reranker.name, reranker.signature())
    return LocalFeatureStore(folder, reranker.signature(), reranker.dim)


@torch.inference_mode()
def extract_local(
    reranker,
    paths: Sequence[str | Path],
    store,
    device: torch.device,
    batch_size: int = 8,
    num_workers: int | None = None,
    desc: str = "local features",
) -> list[str]:
    """Make sure every image in ``paths`` has local features in ``store``; returns their keys."""
    paths = [Path(p) for p in paths]
    keys = [image_key(p) for p in paths]
    todo = [i for i, k in enumerate(keys) if k not in store]
    if todo:
        loader = make_loader(
            [paths[i] for i in todo], reranker.preprocess, batch_size, num_workers, pin_memory=device.type == "cuda"
        )
        bar = tqdm(total=len(todo), desc=f"{desc} ({reranker.name})", unit="img", leave=False)
        for idx, images, sizes, errors in loader:
            check_batch_errors(errors)
            feats = reranker.extract(images.to(device), [tuple(int(v) for v in s) for s in sizes])
            store.add_many([(keys[todo[int(i)]], f) for i, f in zip(idx, feats)])
            bar.update(len(idx))
        bar.close()
    return keys
