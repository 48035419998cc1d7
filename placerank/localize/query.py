"""``localize``: one photo against the database, through the shared stages: describe it
(:func:`~placerank.descriptors.extract.extract_features`: global descriptor, and local features
when re-ranking, in one backbone pass for a re-ranker on the model's own head), search the id-mapped index, optionally
re-rank the top-K (:func:`~placerank.rerank.topk.rerank_topk` on stored local features), then
estimate the position from the matches that agree (:mod:`placerank.localize.estimate`).

The query is described in the database's precision (``precision`` meta row; fp32 when none is
recorded), so it meets descriptors made the same way; ``--compile auto`` leaves one photo eager."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from placerank.data.exif import GpsReading, read_gps
from placerank.data.positions import LOCAL, WGS84, project_latlon, unproject, utm_label
from placerank.descriptors.extract import extract_features
from placerank.descriptors.fast import runtime_of
from placerank.errors import DataError, PlaceRankError
from placerank.localize.estimate import EstimateConfig, estimate_position
from placerank.localize.features import LocalFeatureCache, MemoryStore
from placerank.localize.metadata import Row
from placerank.localize.model import check_runtime_made, stored_precision
from placerank.localize.results import LocalizeResult, Match, QueryGps
from placerank.localize.store import Store
from placerank.rerank.sequence import frame_scores
from placerank.rerank.topk import rerank_topk


def common_frame(rows: list[Row], ref_epsg: int | None) -> np.ndarray:
    """(K,2) candidate positions in metres in one frame: the best candidate's UTM zone (lat/lon
    projected with pyproj, so neighbours across a zone border stay correct) or the local frame.
    NaN rows for candidates without a position."""
    out = np.full((len(rows), 2), np.nan)
    for k, r in enumerate(rows):
        if r.easting is None:
            continue
        if ref_epsg is None or r.epsg == ref_epsg:
            out[k] = (r.easting, r.northing)
        elif r.lat is not None:
            out[k] = project_latlon(np.array([[r.lat, r.lon]]), ref_epsg)[0]
    return out


def rerank(features: LocalFeatureCache, reranker, query_lf, cand: list[Row], name: str, notes: list[str]):
    """(order, scores in that order, extras for the pictures) of the candidates re-ranked by
    ``reranker`` against the query's local features ``query_lf``."""
    store = features.store(reranker, create=False)
    try:
        stored = {r.sha256 for r in cand if store is not None and r.sha256 in store}
        feats = {r.sha256: store.get(r.sha256) for r in cand if r.sha256 in stored} if store is not None else {}
    finally:
        if store is not None:
            store.close()
    missing = {r.sha256: Path(r.path) for r in cand if r.sha256 not in feats}
    if missing:
        feats.update(zip(missing, features.extract_now(reranker, list(missing.values()))))
        notes.append(
            f"{len(missing)} candidate(s) had no stored {reranker.name} features and were extracted now "
            f"(index with --rerank {name} to store them)"
        )
    cand_lf = [feats[r.sha256] for r in cand]
    ranked = rerank_topk(
        reranker,
        np.arange(len(cand))[None],
        len(cand),
        query_features=lambda q: query_lf,
        database_features=lambda j: cand_lf[j],
        progress=False,
    )
    order = ranked.ids[0]
    extras = {"reranker": reranker, "query_lf": query_lf, "cand_lf": [cand_lf[j] for j in order]}
    return order, ranked.scores[0], extras


def sequence_step(store: Store, sequence, path: Path, cand: list[Row], sims: np.ndarray, rerank_scores, top_k: int):
    """(candidate rows, their sequence scores, frames used) of ``path`` as the next frame."""
    scores = frame_scores(sims[None], None if rerank_scores is None else np.asarray(rerank_scores)[None])[0]
    best, seq_scores, used = sequence.step(path, np.array([r.id for r in cand], dtype=np.int64), scores, top_k)
    rows = store.images.rows(best)
    keep = [k for k, i in enumerate(best) if i in rows]
    return [rows[best[k]] for k in keep], np.asarray(seq_scores, dtype=np.float64)[keep], used


def localize(
    store: Store,
    features: LocalFeatureCache,
    model,
    image: str | Path,
    top_k: int,
    rerank_name: str | None,
    radius: float | None,
    rerank_options: dict | None,
    estimate: EstimateConfig | None,
    sequence=None,
) -> LocalizeResult:
    """``sequence``: a :class:`~placerank.localize.sequence.SequenceTracker` (``--sequence-length``):
    ``image`` is the next frame of a traversal; the top-``top_k`` are then ranked by sequence score
    (the per-frame candidates, re-ranked when asked, enter it; see ``docs/sequence.md``)."""
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    notes: list[str] = []
    path = Path(image)
    if top_k < 1:
        raise PlaceRankError(f"--top-k must be >= 1, got {top_k}")
    index = store.index()
    if len(index) == 0:
        raise PlaceRankError(f"{store.folder}: the database is empty; index photos first")
    if not path.is_file():
        raise DataError(f"{path}: image file does not exist")
    # The query's global descriptor and, when re-ranking, its local features: one backbone pass
    # when the re-ranker scores the model's own local head.
    reranker = features.reranker(rerank_name, rerank_options) if rerank_name else None
    mem = MemoryStore() if reranker is not None else None
    q, keys = extract_features(
        model,
        [path],
        features.device,
        1,
        0,
        use_cache=False,
        reranker=reranker,
        store=mem,
        desc="query",
        progress=False,
        precision=(precision := stored_precision(store.meta.all())),
    )
    check_runtime_made(store.folder, store.meta.all(), runtime_of(model))  # a runtime that fell back: one line
    timing["describe"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    sims, ids = index.search(q, max(top_k, sequence.candidates) if sequence is not None else top_k)
    found = [(int(i), float(s)) for s, i in zip(sims[0], ids[0]) if i >= 0]
    rows = store.images.rows([i for i, _ in found])
    found = [(i, s) for i, s in found if i in rows]  # a concurrent writer may just have removed one
    cand = [rows[i] for i, _ in found]
    cand_sims = np.array([s for _, s in found], dtype=np.float64)
    timing["search"] = time.perf_counter() - t1

    rerank_scores = None
    extras: dict = {}
    if reranker is not None and mem is not None and rerank_name:
        t2 = time.perf_counter()
        order, rerank_scores, extras = rerank(features, reranker, mem[keys[0]], cand[:top_k], rerank_name, notes)
        order = np.concatenate([order, np.arange(len(order), len(cand))]).astype(np.int64)  # past top_k: unmoved
        cand = [cand[j] for j in order]
        cand_sims = cand_sims[order]
        timing["rerank"] = time.perf_counter() - t2
    if sequence is not None:
        t3 = time.perf_counter()
        cand, cand_sims, used = sequence_step(store, sequence, path, cand, cand_sims, rerank_scores, top_k)
        rerank_scores, extras = None, {}  # the re-ranker's evidence is inside the sequence score now
        notes.append(
            f"sequence matching: similarity = mean per-frame score along the best path over the last {used} photo(s)"
        )
        timing["sequence"] = time.perf_counter() - t3

    default_radius = float(store.meta.get("radius") or 25.0)
    cfg = estimate or EstimateConfig(radius=float(radius) if radius is not None else default_radius)
    if radius is not None:
        cfg = EstimateConfig(**{**asdict(cfg), "radius": float(radius)})
    frame = store.meta.get("frame") or LOCAL
    ref_epsg = next((r.epsg for r in cand if r.epsg is not None), None)
    pos = common_frame(cand, ref_epsg)
    mode = "rerank" if rerank_scores is not None else "similarity"
    est = estimate_position(pos, rerank_scores if rerank_scores is not None else cand_sims, mode, cfg)
    if mode == "rerank" and est.position is None and np.isfinite(pos).all(axis=1).any():
        notes.append("the re-ranker found no geometric evidence for any candidate; estimate from global similarity")
        est = estimate_position(pos, cand_sims, "similarity", cfg)
    lat = lon = east = north = None
    if est.position is not None:
        east, north = (float(v) for v in est.position)
        if ref_epsg is not None:
            lat, lon = (float(v) for v in unproject(est.position[None], ref_epsg)[0])
    matches = []
    for k, r in enumerate(cand):
        dist = (
            float(np.linalg.norm(pos[k] - est.position))
            if est.position is not None and np.isfinite(pos[k]).all()
            else None
        )
        matches.append(
            Match(
                rank=k + 1,
                path=r.path,
                similarity=round(float(cand_sims[k]), 6),
                rerank_score=None if rerank_scores is None else float(rerank_scores[k]),
                weight=round(float(est.weights[k]), 6),
                agrees=bool(est.agrees[k]),
                distance_m=None if dist is None else round(dist, 3),
                lat=r.lat,
                lon=r.lon,
                easting=r.easting,
                northing=r.northing,
                utm_zone=utm_label(r.epsg),
                id=r.id,
            )
        )
    query_gps = None
    if frame == WGS84:
        try:
            g = read_gps(path)
        except DataError as e:
            g = None
            notes.append(f"query EXIF not used: {e}")
        if isinstance(g, GpsReading):
            err = None
            if ref_epsg is not None and est.position is not None:
                g_en = project_latlon(np.array([[g.lat, g.lon]]), ref_epsg)[0]
                extras["query_gps_en"] = g_en
                err = round(float(np.linalg.norm(g_en - est.position)), 3)
            query_gps = QueryGps(lat=g.lat, lon=g.lon, error_m=err)
    if est.position is None:
        notes.append("no top match has a position: no estimate")
    timing["total"] = time.perf_counter() - t0
    extras.update({"positions": pos, "ref_epsg": ref_epsg})
    return LocalizeResult(
        query=str(path.resolve()),
        frame=frame,
        lat=lat,
        lon=lon,
        easting=east,
        northing=north,
        utm_zone=utm_label(ref_epsg) if est.position is not None else "",
        confidence=round(est.confidence, 4),
        share=round(est.share, 4),
        margin=None if est.margin is None else round(est.margin, 4),
        margin_factor=round(est.margin_factor, 4),
        radius_m=cfg.radius,
        matches=matches,
        model=model.name,
        weights_id=model.weights_id,
        rerank=rerank_name,
        database=str(store.folder),
        database_size=len(index),
        query_gps=query_gps,
        precision=precision,
        timing_s={k: round(v, 4) for k, v in timing.items()},
        notes=notes,
        extras=extras,
    )
