"""The re-rank stage: candidates + local features -> re-ranked candidates.

Local features are read from the stores; images missing there (a re-ranker with its own network
whose features were not extracted up front) are extracted first, only for the candidates that
are re-ranked. Then :func:`placerank.rerank.topk.rerank_topk`, the one re-rank-top-K loop.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from placerank.descriptors.extract import extract_local
from placerank.index.candidates import Candidates
from placerank.rerank.topk import RerankedCandidates, rerank_topk


def _reorder_similarities(before: np.ndarray, sims: np.ndarray, after: np.ndarray) -> np.ndarray:
    """First-stage similarities of ``after``'s ids (each row a permutation of ``before``'s)."""
    out = sims.copy()
    for q in range(len(before)):
        where = {int(j): s for j, s in zip(before[q], sims[q])}
        out[q] = [where.get(int(j), s) for j, s in zip(after[q], sims[q])]
    return out


def _scatter_rows(part: RerankedCandidates, all_ids: np.ndarray, rows: np.ndarray) -> RerankedCandidates:
    """``part`` re-ranked only ``rows`` of ``all_ids``: every query again, the others unchanged
    (NaN scores); ``ms_per_query`` stays the re-ranked queries' only."""
    ids = all_ids.copy()
    ids[rows] = part.ids
    scores = np.full((len(all_ids), part.top_k), np.nan)
    scores[rows] = part.scores
    return RerankedCandidates(ids=ids, scores=scores, ms_per_query=part.ms_per_query, top_k=part.top_k)


def jsonable(options: dict) -> dict:
    """Options as they read back from JSON (tuples become lists), for comparing runs."""
    return json.loads(json.dumps(options, default=str))


def rerank_candidates(
    candidates: Candidates,
    reranker,
    top_k: int,
    query_store,
    database_store,
    device: torch.device,
    num_workers: int | None = None,
    timer=None,
    options: dict | None = None,
    progress: bool = True,
    queries: np.ndarray | None = None,
) -> tuple[Candidates, RerankedCandidates]:
    """Re-rank the first ``top_k`` candidates of every query with ``reranker``; returns the new
    candidates (``scores``, ``rerank`` filled in) and the loop's timings. ``queries`` (Q,) bool
    (``eval --rerank-below``): only those are re-ranked, and only their local features extracted;
    the others keep their first-stage order and NaN scores."""
    timer = timer or (lambda stage: contextlib.nullcontext())
    rows = np.arange(len(candidates.ids)) if queries is None else np.flatnonzero(np.asarray(queries, dtype=bool))
    ids = candidates.ids[rows]
    k = max(0, min(int(top_k), ids.shape[1]))
    needed = np.unique(ids[:, :k])
    needed = needed[needed >= 0]
    db_paths = [Path(p) for p in candidates.database_paths]
    with timer("extract_local"):
        db_found = extract_local(
            reranker,
            [db_paths[j] for j in needed],
            database_store,
            device,
            num_workers=num_workers,
            desc="database local",
        )
        q_keys = extract_local(
            reranker,
            [candidates.query_paths[q] for q in rows],
            query_store,
            device,
            num_workers=num_workers,
            desc="query local",
        )
    db_keys = {int(j): key for j, key in zip(needed, db_found)}
    with timer("rerank"):
        reranked = rerank_topk(
            reranker,
            ids,
            k,
            lambda q: query_store.get(q_keys[q]),
            lambda j: database_store.get(db_keys[j]),
            progress=progress,
        )
    if queries is not None:  # back to every query: the skipped ones as they were
        reranked = _scatter_rows(reranked, candidates.ids, rows)
    info = {
        "name": reranker.name,
        "signature": reranker.signature(),
        "top_k": int(k),
        "options": jsonable(options or {}),
        "input": candidates.fingerprint(),
    }
    if queries is not None:
        info["queries_reranked"] = int(len(rows))
    out = replace(
        candidates,
        ids=reranked.ids,
        similarities=_reorder_similarities(candidates.ids, candidates.similarities, reranked.ids),
        scores=reranked.scores,
        rerank=info,
    )
    return out, reranked


def _store_root(side: dict) -> Path | None:
    folder = side.get("descriptors")
    return Path(folder) / "local" if folder and Path(folder).is_dir() else None


def reranker_for_candidates(
    candidates: Candidates,
    name: str,
    options: dict,
    device: torch.device,
    model_name: str | None = None,
    weights: str | None = None,
    image_size: tuple[int, int] | None = None,
):
    """Build re-ranker ``name``; one that uses a model's local head gets the model the candidates
    were searched with (its weights file and input size as recorded in the database descriptor
    folder) unless ``model_name`` / ``weights`` / ``image_size`` say otherwise."""
    from placerank.rerank.base import RERANKERS, create_reranker

    model = None
    if RERANKERS.get(name).needs_model:
        from placerank.descriptors.files import read_meta
        from placerank.models import create

        recorded: dict = {}
        if model_name is None or model_name == candidates.model:
            root = candidates.database.get("descriptors")
            if root and Path(root).is_dir():
                recorded = read_meta(root)
        kwargs = {}
        size = image_size or (tuple(recorded["input_size"]) if recorded.get("input_size") else None)
        if size:
            kwargs["image_size"] = size
        model = create(model_name or candidates.model, weights=weights or recorded.get("weights"), **kwargs)
        model = model.to(device).eval()
    return create_reranker(name, model=model, **options).to(device)


def rerank_folder(
    candidates_folder: str | Path,
    out: str | Path,
    reranker,
    top_k: int,
    device: torch.device,
    options: dict | None = None,
    num_workers: int | None = None,
) -> tuple[Candidates, bool]:
    """``placerank rerank``: candidates folder -> re-ranked candidates folder ``out``. Local
    features come from (and missing ones go to) the stores beside the descriptor folders the
    candidates were searched from, else the cache. Returns (candidates, skipped)."""
    from placerank.descriptors.extract import local_store_for
    from placerank.errors import PlaceRankError
    from placerank.index.candidates import load_candidates, read_candidates_meta

    candidates = load_candidates(candidates_folder)
    if candidates.rerank is not None:
        raise PlaceRankError(
            f"{candidates_folder}: these candidates were already re-ranked by {candidates.rerank.get('name')}; "
            "give the output of `placerank search`"
        )
    k = max(1, min(int(top_k), candidates.depth))
    options = dict(options or {})
    try:
        done = read_candidates_meta(out).get("rerank") or {}
        if done == {
            "name": reranker.name,
            "signature": reranker.signature(),
            "top_k": k,
            "options": jsonable(options),
            "input": candidates.fingerprint(),
        }:
            return load_candidates(out), True
    except PlaceRankError:
        pass
    q_root, db_root = _store_root(candidates.queries), _store_root(candidates.database)
    db_store = local_store_for(reranker, db_root)
    q_store = db_store if q_root == db_root else local_store_for(reranker, q_root)
    try:
        result, _ = rerank_candidates(candidates, reranker, k, q_store, db_store, device, num_workers, options=options)
    finally:
        db_store.close()
        if q_store is not db_store:
            q_store.close()
    result.save(out)
    return result, False
