"""``placerank eval``: the extract, search and re-rank stages, then Recall@N, timings, pictures.

:func:`evaluate` calls the same stage functions as ``placerank extract``, ``search`` and
``rerank`` (:func:`~placerank.descriptors.files.extract_descriptors`,
:func:`~placerank.index.candidates.search`, :func:`~placerank.rerank.stage.rerank_candidates`),
keeping their outputs in memory, and adds the report."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from placerank.data.dataset import Dataset
from placerank.data.layouts import LayoutOptions, open_dataset
from placerank.descriptors.extract import check_precision, local_numerics, local_store_for
from placerank.descriptors.fast import check_compile_mode, precision_report, prepare_inference, resolve_precision
from placerank.descriptors.files import extract_descriptors, open_rows
from placerank.descriptors.runtime import check_runtime, choose_runtime, default_runtime
from placerank.descriptors.standardize import check_mode, standardize_sides
from placerank.eval.confidence import (
    check_rerank_below,
    global_confidence,
    queries_to_rerank,
    query_confidence,
    rerank_below_info,
)
from placerank.eval.precision import precision_recall_entries
from placerank.eval.recall import DEFAULT_NS, ns_for, recall_at_n
from placerank.eval.report import write_examples, write_predictions
from placerank.eval.results import EvalResult
from placerank.eval.sequence import apply_sequence, sequence_options, sequence_orders
from placerank.index.candidates import search
from placerank.rerank.base import shares_model_head
from placerank.rerank.stage import rerank_candidates
from placerank.utils import Timer, atomic_folder, check_output_folder, peak_memory_mb, resolve_device
from placerank.version import __version__
from placerank.viz.examples import plot_pr_curve, plot_recall_curve

# Database descriptors above this size go to a memory-mapped scratch file instead of RAM: below
# it (~50 000 images of 1280-d) the file would only add a write for no memory saved.
MEMMAP_ABOVE_BYTES = 256 * 2**20

# what eval writes under --out; the folder is replaced as a whole, so it may hold only these
EVAL_OUTPUTS = ("results.json", "predictions.csv", "recall_curve.png", "pr_curve.png", "examples")


@dataclass
class EvalConfig:
    database: str | Path | None = None
    queries: str | Path | None = None
    out: str | Path = "runs/eval"
    model: str = "effnet-lite0-gem"
    weights: str | Path | None = None
    rerank: str | None = None
    top_k: int = 20  # candidates re-ranked per query
    radius: float | None = None  # metres, for positions in metres
    frame_tolerance: int | None = None  # frames, for frame-aligned traversals (asks for frame alignment)
    layout: str = "auto"  # see placerank.data.layouts.LAYOUTS
    dataset: str | Path | None = None  # a dataset root (MSLS, .mat, downloader tree, .npz)
    msls_subtask: str = "all"
    queries_subset: str | None = None
    images_root: str | Path | None = None
    image_size: tuple[int, int] | None = None
    device: str = "auto"
    precision: str = "fp32"  # the model's forward: fp32, bf16 / fp16 (CUDA) autocast, or auto (docs/inference.md)
    compile: str = "off"  # torch.compile the backbone: auto (when it repays itself) | on | off
    runtime: str = field(default_factory=default_runtime)  # auto | torch | openvino (docs/inference.md)
    batch_size: int = 16
    num_workers: int | None = None
    use_cache: bool = True
    num_examples: int = 8
    rerank_options: dict | None = None
    rerank_below: float | None = None  # queries with a first-stage confidence >= this skip re-ranking
    sequence_length: int = 1  # >1: sequence matching over the last L query frames (docs/sequence.md)
    sequence_candidates: int = 100  # per-frame candidates the sequence aggregation reads
    sequence_velocity: tuple[float, float] = (0.8, 1.2)  # database frames per query frame, min and max
    nproc: int = 1  # >1: extraction by N local ranks (placerank.descriptors.launch), the rest here
    index: str = "flat"  # first-stage index kind: flat, flat-fp16 or a FAISS factory string (docs/index.md)
    index_options: dict | None = None  # its search options, e.g. {"nprobe": "32"}
    standardize: str = "none"  # none | center | zscore: per-side descriptor statistics (transductive)


def load_model(name: str, weights, image_size, device):
    from placerank.models import create

    kwargs = {"image_size": image_size} if image_size else {}
    model = create(name, weights=weights, **kwargs)
    return model.to(device).eval()


def open_eval_dataset(config: EvalConfig) -> Dataset:
    options = LayoutOptions(
        layout=config.layout,
        radius=config.radius,
        frame_tolerance=config.frame_tolerance,
        msls_subtask=config.msls_subtask,
        queries_subset=config.queries_subset,
        images_root=config.images_root,
    )
    return open_dataset(config.database, config.queries, config.dataset, options)


def evaluate(config: EvalConfig, model=None, dataset: Dataset | None = None) -> EvalResult:
    """Run the whole evaluation and write ``results.json``, ``recall_curve.png``,
    ``predictions.csv`` and ``examples/*.png`` under ``config.out``. A pre-built ``model`` may be
    passed (benchmarks, recipes) instead of a registry name, and a pre-read ``dataset`` (a named
    benchmark split) instead of paths. Unlabelled data: predictions and pictures, no recall.

    The outputs are written into a temporary folder beside ``config.out`` that replaces it only
    when complete: a failed run keeps the previous run's outputs, a finished one replaces them
    all (no stale example pictures). ``config.out`` is checked before any work."""
    timer = Timer()
    t_start = time.perf_counter()
    final_out = check_output_folder(config.out, owned=EVAL_OUTPUTS)
    check_eval_numbers(config)
    device = resolve_device(config.device)
    if config.precision != "auto":
        check_precision(config.precision, device)
    check_compile_mode(config.compile)
    check_runtime(config.runtime, device, config.precision)
    ds = dataset if dataset is not None else open_eval_dataset(config)
    seq = sequence_options(config.sequence_length, config.sequence_candidates, config.sequence_velocity)
    orders = sequence_orders(ds) if seq is not None else None  # unordered data fails before any work
    positives = ds.positives
    if model is None:
        model = load_model(config.model, config.weights, config.image_size, device)
    runtime = choose_runtime(config.runtime, model, device, len(ds.database) + len(ds.queries))
    prepare_inference(model, device, config.compile, runtime)  # eval mode, channels_last, compile, runtime
    config = replace(config, precision=resolve_precision(config.precision, model, device))
    from placerank.index.spec import check_spec

    check_spec(config.index, config.index_options, int(model.descriptor_dim), len(ds.database))  # before work

    reranker = store = None
    rerank_options: dict = {}
    if config.rerank:
        from placerank.rerank.base import create_reranker, reranker_options

        rerank_options = reranker_options(config.rerank, config.rerank_options or {})
        reranker = create_reranker(config.rerank, model=model, **rerank_options).to(device)
        store = local_store_for(reranker, numerics=local_numerics(model, reranker, config.precision))
    # A re-ranker on the model's own local head gets its features in the same backbone pass.
    shared = store if shares_model_head(model, reranker) else None
    # a large database's descriptors stream into a memmap in a scratch folder ($TMPDIR), not RAM
    scratch = tempfile.TemporaryDirectory(prefix="placerank-eval-")
    db_bytes = len(ds.database) * int(model.descriptor_dim) * 4
    db_rows = (
        open_rows(Path(scratch.name) / "database.npy", len(ds.database), int(model.descriptor_dim))
        if db_bytes > MEMMAP_ABOVE_BYTES
        else None
    )
    with timer("extract"):
        if model.needs_data_init:
            model.init_from_images(ds.database.paths)
        sharded = _extract_in_processes(config, model, ds, reranker if shared is not None else None)
        db_desc, q_desc = sharded or (
            extract_descriptors(
                model,
                images.paths,
                device,
                config.batch_size,
                config.num_workers,
                config.use_cache,
                reranker=reranker if shared is not None else None,
                store=shared,
                desc=side,
                precision=config.precision,
                out=db_rows if side == "database" else None,
            )
            for images, side in ((ds.database, "database"), (ds.queries, "queries"))
        )
    standardized: dict = {"mode": "none"}
    if config.standardize != "none":  # each side with its own statistics (placerank.descriptors.standardize)
        db_desc, q_desc, standardized = standardize_sides(db_desc, q_desc, config.standardize, scratch.name)
    depth = min(len(ds.database), max(DEFAULT_NS[-1], config.top_k, seq.candidates if seq else 0))
    with timer("search"):
        candidates = search(
            db_desc, q_desc, depth, device=device, index_spec=config.index, index_options=config.index_options
        )
    del db_desc, db_rows
    scratch.cleanup()
    ids = candidates.ids
    ns = ns_for(depth)
    recall_first = recall_at_n(ids, positives, ns) if ds.labelled else {}
    first_stage_ids = ids.copy()
    first_confidence = global_confidence(ds, candidates.similarities, ids)  # placerank.eval.confidence
    rerun = queries_to_rerank(first_confidence, config.rerank_below)

    rerank_info = None
    reranked = None
    if reranker is not None and store is not None:
        k = min(config.top_k, depth)
        candidates, reranked = rerank_candidates(
            candidates, reranker, k, store, store, device, config.num_workers, timer, rerank_options,
            queries=None if config.rerank_below is None else rerun,
        )  # fmt: skip
        ids = candidates.ids
        rerank_info = {
            "name": reranker.name,
            "top_k": int(k),
            "signature": reranker.signature(),
            "bytes_per_image": round(store.bytes_per_image(), 1),
            **reranked.timing_summary(),
            "ties": "broken by first-stage rank (stable sort)",
            **rerank_below_info(config.rerank_below, rerun, timer.totals),
        }
    scores = None if reranked is None else reranked.scores
    confidence = query_confidence(first_confidence, scores, rerun, config.rerank)
    pr_label = f"+ re-rank {config.rerank} (top-{rerank_info['top_k']})" if rerank_info else None
    pr_final, pr_first, pr_curves = (
        precision_recall_entries(confidence, first_stage_ids, ids, positives, pr_label) if ds.labelled else ({}, {}, {})
    )  # before sequence matching: the single-frame answers the confidences belong to
    sequence_info: dict | None = None
    if seq is not None and orders is not None:
        recall_frames = recall_at_n(ids, positives, ns) if ds.labelled else {}
        with timer("sequence"):
            ids, sequence_info = apply_sequence(candidates, orders, seq, depth)
        sequence_info["recall_single_frame"] = recall_frames
    recall = recall_at_n(ids, positives, ns) if ds.labelled else {}

    timing = {k: round(v, 3) for k, v in timer.totals.items()}
    timing.setdefault("rerank", 0.0)
    timing["total"] = round(time.perf_counter() - t_start, 3)
    result = EvalResult(
        recall=recall,
        recall_first_stage=recall_first,
        num_queries=len(ds.queries),
        num_database=len(ds.database),
        num_queries_with_positives=int(sum(len(p) > 0 for p in positives)),
        timing_s=timing,
        peak_memory_mb=round(peak_memory_mb(), 1),
        dataset={
            "database": str(ds.protocol.get("database", config.database)),
            "queries": str(ds.protocol.get("queries", config.queries)),
            "name": ds.name,
            "rule": ds.rule.describe(),
            "protocol": ds.describe(),
        },
        model={**model.describe(), **precision_report(model, device, config.precision), "standardize": standardized},
        rerank=rerank_info,
        device=str(device),
        placerank_version=__version__,
        labelled=ds.labelled,
        sequence=sequence_info,
        precision_recall=pr_final,
        precision_recall_first_stage=pr_first,
        index=candidates.index,
    )
    try:
        with atomic_folder(final_out) as out:
            result.save(out / "results.json")
            write_predictions(out / "predictions.csv", ds, ids, positives, confidence)
            if ds.labelled:
                curves = {"global retrieval": recall_first}
                if config.rerank:
                    label = f"+ re-rank {config.rerank} (top-{(rerank_info or {}).get('top_k')})"
                    curves[label] = sequence_info["recall_single_frame"] if sequence_info else recall
                if sequence_info:
                    curves[f"+ sequence matching (L={config.sequence_length})"] = recall
                title = f"{model.name} | {ds.name} | {ds.rule.describe()}"
                plot_recall_curve(curves, out / "recall_curve.png", title=title)
                plot_pr_curve(pr_curves, out / "pr_curve.png", title=title)
            write_examples(out / "examples", ds, first_stage_ids, ids, positives, config.num_examples, reranker, store)
    finally:
        if store is not None:
            store.close()
    return result


def _extract_in_processes(config: EvalConfig, model, ds: Dataset, reranker) -> list | None:
    """With ``nproc`` > 1: database and query descriptors from ``nproc`` ranks (one-pass local
    features of ``reranker`` into the cache's store); else None (extracted here)."""
    if config.nproc <= 1:
        return None
    from placerank.descriptors.launch import extract_in_processes

    sets = [list(ds.database.paths), list(ds.queries.paths)]
    return extract_in_processes(
        model, sets, config.nproc, config.device, config.batch_size, config.num_workers, config.use_cache,
        reranker, config.precision,
    )  # fmt: skip


def check_eval_numbers(config: EvalConfig) -> None:
    """The numbers of a config built in Python (the CLI checks its flags when parsing them)."""
    from placerank.errors import PlaceRankError

    if config.top_k < 1:
        raise PlaceRankError(f"top_k must be >= 1, got {config.top_k}")
    if config.radius is not None and not (0 < config.radius < float("inf")):
        raise PlaceRankError(f"radius must be a number of metres > 0, got {config.radius}")
    if config.frame_tolerance is not None and config.frame_tolerance < 0:
        raise PlaceRankError(f"frame_tolerance must be >= 0, got {config.frame_tolerance}")
    if config.batch_size < 1:
        raise PlaceRankError(f"batch_size must be >= 1, got {config.batch_size}")
    from placerank.descriptors.shards import check_nproc

    check_nproc(config.nproc)
    check_mode(config.standardize)
    if check_rerank_below(config.rerank_below) is not None and not config.rerank:
        raise PlaceRankError("rerank_below (--rerank-below) needs a re-ranker (--rerank NAME)")
