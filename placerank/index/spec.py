"""Index specs: a FAISS index-factory string (plus two short names) -> an empty FAISS index,
how much it must be trained on, and its search options.

``"flat"`` is ``IndexFlatIP`` (exact), ``"flat-fp16"`` is FAISS ``"SQfp16"`` (exact ranking up to
float16 rounding, half the bytes); anything else goes to ``faiss.index_factory`` with the inner
product metric ("IVF4096,PQ64", "OPQ64,IVF65536_HNSW32,PQ64", "HNSW32", "IVF1024,Flat", ...).
FAISS's own messages are kept but cut to their last clause, so every problem is one line.

Training sample. An index that needs training (IVF, PQ, OPQ) runs k-means with ``k`` centroids
(``nlist`` for IVF, ``2**nbits`` = 256 for PQ / OPQ codebooks; the largest counts). It is trained on
``default_train_size(N, k) = min(N, max(64 k, min(10 000, 256 k)))`` database rows drawn at random
with seed 0 (FAISS's guidance is 30 k to 256 k points; k-means itself subsamples above 256 k), and
needs at least ``k`` rows.
"""

from __future__ import annotations

import re
from typing import Any

import faiss
import numpy as np

from placerank.errors import PlaceRankError

#: short names that are not FAISS factory strings
ALIASES = {"flat-fp16": "SQfp16"}
#: the seed of the random training sample (the same rows for the same N, every time)
TRAIN_SEED = 0
#: nprobe used when an IVF index is given none (FAISS's own default of 1 loses much recall)
DEFAULT_NPROBE = 32


def faiss_message(e: BaseException) -> str:
    """FAISS's RuntimeError text without its C++ location prefix: the part a user can act on."""
    msg = " ".join(str(e).split())
    msg = re.sub(r"^Error in .*? at \S+:\d+: ", "", msg)
    msg = re.sub(r"^Error: '.*?' failed: ", "", msg)
    return msg.removeprefix("ParameterSpace::set_index_parameter:")


def make_index(dimension: int, spec: str) -> faiss.Index:
    """An empty FAISS index for ``spec``, inner-product metric where FAISS offers it."""
    if not isinstance(spec, str) or not spec.strip():
        raise PlaceRankError(f"index spec '{spec}' is empty: use flat, flat-fp16 or a FAISS factory string")
    spec = spec.strip()
    if spec == "flat":
        return faiss.IndexFlatIP(int(dimension))
    try:
        index = faiss.index_factory(int(dimension), ALIASES.get(spec, spec), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise PlaceRankError(
            f"index spec '{spec}' is not valid: FAISS says '{faiss_message(e)}' "
            "(use flat, flat-fp16 or a FAISS index-factory string such as IVF1024,Flat or IVF4096,PQ64)"
        ) from None
    _no_polysemous(index)
    return index


def _no_polysemous(index_: faiss.Index) -> None:
    """Turn off polysemous training of PQ codes: it optimises the codes for the Hamming pre-filter
    of the ``ht`` option only and costs 5-10x the PQ training time."""
    index: Any = faiss.downcast_index(index_)
    if isinstance(index, faiss.IndexPreTransform):
        _no_polysemous(index.index)
    elif isinstance(index, (faiss.IndexIVFPQ, faiss.IndexPQ)):
        setattr(index, "do_polysemous_training", False)  # noqa: B010 (the stubs lack the field)
    elif isinstance(index, faiss.IndexHNSW) and index.storage is not None:
        _no_polysemous(index.storage)


def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError, TypeError):
        return None


def nlist_of(index: faiss.Index) -> int:
    """The number of inverted lists of an IVF index (0 for others)."""
    ivf = _ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


def kmeans_sizes(index_: faiss.Index) -> list[int]:
    """The number of centroids of every k-means that training ``index_`` runs."""
    index: Any = faiss.downcast_index(index_)
    sizes: list[int] = []
    if isinstance(index, faiss.IndexPreTransform):
        chain: Any = index.chain
        for i in range(chain.size()):
            if isinstance(faiss.downcast_VectorTransform(chain.at(i)), faiss.OPQMatrix):
                sizes.append(256)  # OPQ trains through a PQ with 8-bit codes
        return sizes + kmeans_sizes(index.index)
    if isinstance(index, faiss.IndexIVF):
        sizes.append(int(index.nlist))
    if isinstance(index, (faiss.IndexIVFPQ, faiss.IndexPQ)):
        sizes.append(int(index.pq.ksub))
    if isinstance(index, faiss.IndexHNSW) and index.storage is not None:
        sizes += kmeans_sizes(index.storage)
    if isinstance(index, faiss.IndexRefine):
        sizes += kmeans_sizes(index.base_index)
    return sizes


def opq_min_rows(index_: faiss.Index) -> int:
    """Training rows an OPQ rotation needs (0 without OPQ): at least its input dimension and 256
    (the codebook size). With fewer rows than dimensions FAISS 1.15's OPQ training crashes the
    whole process (segfault on 1 000 x 1280-d, ``malloc(): corrupted top size`` on 1 279, measured
    in a subprocess), so the check runs before FAISS is called."""
    index: Any = faiss.downcast_index(index_)
    if not isinstance(index, faiss.IndexPreTransform):
        return 0
    chain: Any = index.chain
    need = 0
    for i in range(chain.size()):
        vt: Any = faiss.downcast_VectorTransform(chain.at(i))
        if isinstance(vt, faiss.OPQMatrix):
            need = max(need, int(vt.d_in), 256)
    return need


def needs_training(index: faiss.Index) -> bool:
    return not bool(index.is_trained)


def default_train_size(n: int, k: int) -> int:
    """Rows to train on: 64 per centroid, at least 10 000 (but no more than 256 per centroid, where
    k-means would subsample anyway), never more than the N rows there are."""
    return int(min(n, max(64 * k, min(10_000, 256 * k))))


def train_rows(n: int, size: int) -> np.ndarray:
    """The sorted row numbers of the training sample: ``size`` of ``n`` at random, seed
    :data:`TRAIN_SEED` (sorted so a memory-mapped file is read front to back)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(TRAIN_SEED).choice(n, size=size, replace=False)).astype(np.int64)


def check_train_size(spec: str, index: faiss.Index, n: int, train_size: int | None) -> int:
    """The training sample size for ``n`` database rows (``train_size`` or the default), or a
    one-line error saying how many rows the spec needs."""
    if not needs_training(index):
        return 0
    k = max(kmeans_sizes(index) or [1])
    size = default_train_size(n, k) if train_size is None else min(int(train_size), n)
    need = opq_min_rows(index)
    if need and size < need:  # FAISS 1.15 crashes the process (segfault / heap corruption) here
        raise PlaceRankError(
            f"index '{spec}' needs at least {need} training vectors, got {size}: its OPQ rotation "
            f"is trained on {index.d}-d descriptors and FAISS crashes on fewer rows than dimensions; "
            "index more images or drop OPQ (e.g. IVF16,PQ64)"
        )
    if size < k:
        have = f"{n} database descriptors" if size == n else f"a training sample of {size}"
        raise PlaceRankError(
            f"index '{spec}' needs at least {k} descriptors to train (its k-means has {k} centroids), got {have}: "
            "index more images, use fewer lists (e.g. IVF16,Flat) or --index flat"
        )
    return size


def valid_options(index: faiss.Index) -> list[str]:
    """The search parameters FAISS's ParameterSpace can set on ``index``."""
    ps = faiss.ParameterSpace()
    ps.initialize(index)
    names = [ps.parameter_ranges.at(i).name for i in range(ps.parameter_ranges.size())]
    if _ivf(index) is not None:
        names.append("max_codes")
    return sorted(set(names))


def normalize_options(options: dict | None) -> dict[str, str]:
    """``{"nprobe": 32}`` or ``{"nprobe": "32"}`` -> ``{"nprobe": "32"}`` (stored as given, as strings)."""
    out: dict[str, str] = {}
    for key, value in (options or {}).items():
        key, value = str(key).strip(), str(value).strip()
        try:
            float(value)
        except ValueError:
            raise PlaceRankError(f"index option {key}={value}: the value must be a number") from None
        out[key] = value
    return out


def rescore_of(options: dict[str, str], spec: str) -> int:
    """The ``rescore`` option (0 when absent): candidates K searched in the compressed index and
    re-scored exactly from the database descriptors. Not a FAISS parameter; an integer >= 1, and
    only for approximate kinds (``flat`` is exact already). One-line error otherwise."""
    if "rescore" not in options:
        return 0
    value = options["rescore"]
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1 or str(k) != value:
        raise PlaceRankError(f"index option rescore={value}: must be a whole number of candidates >= 1, e.g. 100")
    if spec.strip() == "flat":
        raise PlaceRankError("index option rescore is for approximate kinds (IVF, PQ, HNSW ...): flat is exact already")
    return k


def with_defaults(index: faiss.Index, options: dict[str, str]) -> dict[str, str]:
    """``options`` plus ``nprobe`` = min(nlist, :data:`DEFAULT_NPROBE`) for an IVF index given none."""
    nlist = nlist_of(index)
    if nlist and "nprobe" not in options:
        return {**options, "nprobe": str(min(nlist, DEFAULT_NPROBE))}
    return dict(options)


def apply_options(index: faiss.Index, options: dict[str, str], spec: str = "") -> None:
    """Set each search option on ``index`` with faiss.ParameterSpace; an option the index does not
    have is a one-line error listing those it has."""
    valid = valid_options(index)
    for key, value in options.items():
        if key == "rescore":
            raise PlaceRankError(
                f"index '{spec}': the option rescore is only supported by eval and search (which have the "
                "descriptors at hand), not here"
            )
        if key not in valid:
            have = ", ".join(valid) if valid else "none (it has no search parameters)"
            raise PlaceRankError(f"index '{spec}' has no option '{key}': its options are {have}")
        try:
            faiss.ParameterSpace().set_index_parameter(index, key, float(value))
        except RuntimeError as e:
            raise PlaceRankError(f"index '{spec}': cannot set {key}={value}: {faiss_message(e)}") from None


def check_spec(spec: str, options: dict | None, dimension: int, count: int | None = None) -> None:
    """Everything about an index request that can be checked before descriptors exist: the spec
    parses for this dimension, the options exist, and (given ``count``) there are enough
    database rows to train it. One-line :class:`PlaceRankError` otherwise."""
    index = make_index(dimension, spec)
    options = normalize_options(options)
    rescore_of(options, spec)
    options.pop("rescore", None)
    if float(options.pop("on_disk", "0")) and nlist_of(index) == 0:
        raise PlaceRankError(f"on-disk inverted lists need an IVF index (e.g. IVF4096,PQ64), not '{spec.strip()}'")
    apply_options(index, with_defaults(index, options), spec.strip())
    if count is not None:
        check_train_size(spec.strip(), index, count, None)


def hnsw_of(index_: faiss.Index):
    """The HNSW graph of an HNSW index (also under a pre-transform or an id map), else None."""
    index: Any = faiss.downcast_index(index_)
    while isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    return index.hnsw if isinstance(index, faiss.IndexHNSW) else None


class at_least_k:
    """Context: an HNSW graph searched with efSearch >= k. FAISS returns fewer than k rows when
    efSearch < k, so a search for k rows raises efSearch to k for its duration."""

    def __init__(self, index: faiss.Index, k: int):
        self.hnsw, self.k, self.old = hnsw_of(index), int(k), None

    def __enter__(self) -> None:
        if self.hnsw is not None and self.hnsw.efSearch < self.k:
            self.old, self.hnsw.efSearch = self.hnsw.efSearch, self.k

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            self.hnsw.efSearch = self.old
