"""Named benchmark splits with pinned protocols: ``placerank eval --dataset NAME:ROOT``.

Each split says where its files may be under ROOT (the official ``.mat``, the
VPR-datasets-downloader tree, MSLS as unpacked), which query subset, which radius, and the image
counts the papers report; ``results.json`` records the protocol and whether the counts match.
ROOT may be the dataset folder itself or a folder above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from placerank.data.dataset import Dataset
from placerank.data.layouts.downloader import is_downloader_tree, read_downloader
from placerank.data.layouts.msls import find_cities, read_msls
from placerank.data.layouts.netvlad_mat import read_netvlad_mat
from placerank.errors import DataError, PlaceRankError
from placerank.presets import PRESETS, register_preset


@dataclass(frozen=True)
class Benchmark:
    name: str
    mat: str | None = None  # NetVLAD dbStruct file name
    folder: str | None = None  # VPR-datasets-downloader dataset folder
    split: str = "test"
    queries_subset: str | None = None
    msls_cities: tuple[str, ...] | None = None
    msls_subtask: str = "all"
    radius: float = 25.0
    expected: dict = field(default_factory=dict)  # {"database": N, "queries": M} as published
    note: str = ""

    def where(self) -> str:
        parts = [p for p in (self.mat, self.folder and f"{self.folder}/images/{self.split}/") if p]
        if self.msls_cities:
            parts.append(f"train_val/{{{','.join(self.msls_cities)}}}/")
        return " or ".join(parts)

    def load(self, root: str | Path, radius: float | None = None, images_root: str | Path | None = None) -> Dataset:
        root = Path(root)
        if not root.exists():
            raise DataError(f"{root}: does not exist; put the {self.name} data there ({self.where()})")
        r = self.radius if radius is None else radius
        ds = self._read(root, r, images_root)
        if ds is None:
            raise DataError(f"{root}: no {self.name} data found (looked for {self.where()})")
        counts = {"database": len(ds.database), "queries": len(ds.queries)}
        ds.protocol.update(
            benchmark=self.name,
            counts=counts,
            published_counts=self.expected or None,
            counts_match_published=(counts == self.expected) if self.expected else None,
            **({"note": self.note} if self.note else {}),
            **({"radius_overridden": r} if radius is not None else {}),
        )
        ds.name = self.name
        return ds

    def _read(self, root: Path, radius: float, images_root) -> Dataset | None:
        if self.mat:
            found = [root] if root.name == self.mat else [*root.glob(self.mat), *root.glob(f"*/{self.mat}")]
            found += [] if found else list(root.glob(f"*/*/{self.mat}"))
            if found:
                return read_netvlad_mat(sorted(found)[0], images_root, radius, self.queries_subset)
        if self.folder:
            for c in (root, root / self.folder):
                if c.is_dir() and _has_split(c, self.split):
                    return read_downloader(c, self.queries_subset, radius, split=self.split)
        if self.msls_cities and (root.name == "train_val" or (root / "train_val").is_dir()):
            return read_msls(find_cities(root, self.msls_cities), self.msls_subtask, radius)
        return None


def _has_split(folder: Path, split: str) -> bool:
    if split == "test":
        return is_downloader_tree(folder)
    return (folder / "images" / split).is_dir() or (folder / split).is_dir()


BENCHMARKS: dict[str, Benchmark] = {}


def _add(b: Benchmark, description: str) -> None:
    BENCHMARKS[b.name] = b
    register_preset(b.name, description, kind="benchmark")(lambda b=b: b)


_add(
    Benchmark("pitts30k-test", "pitts30k_test.mat", "pitts30k", expected={"database": 10000, "queries": 6816}),
    "Pitts30k test: 10000 database, 6816 queries, 25 m (NetVLAD .mat or downloader tree)",
)
_add(
    Benchmark("pitts30k-val", "pitts30k_val.mat", "pitts30k", "val", expected={"database": 10000, "queries": 7608}),
    "Pitts30k val: 10000 database, 7608 queries, 25 m",
)
_add(
    Benchmark("pitts250k-test", "pitts250k_test.mat", "pitts250k", expected={"database": 83952, "queries": 8280}),
    "Pitts250k test: 83952 database, 8280 queries, 25 m",
)
_add(
    Benchmark("tokyo247", "tokyo247.mat", "tokyo247", expected={"database": 75984, "queries": 315}),
    "Tokyo 24/7: 75984 database, 315 queries (v2 subset), 25 m",
)
for _t in ("day", "sunset", "night"):
    _add(
        Benchmark(f"tokyo247-{_t}", "tokyo247.mat", queries_subset=_t, note="subset from tokyo247_query_times.csv"),
        f"Tokyo 24/7 {_t} queries only (needs tokyo247_query_times.csv: name,time)",
    )
_add(
    Benchmark(
        "msls-val", folder="msls", split="val", msls_cities=("cph", "sf"), expected={"database": 18871, "queries": 740}
    ),
    "MSLS val (cph + sf), image-to-image, panoramas out, queries with a positive in 25 m: 740 queries",
)
_add(
    Benchmark(
        "nordland",
        folder="nordland",
        expected={"database": 27592, "queries": 2760},
        note="downloader dummy UTM: 25 m = within 10 frames",
    ),
    "Nordland (Patch-NetVLAD split, downloader tree): 2760 winter queries vs summer, within 10 frames",
)
_add(
    Benchmark("st-lucia", folder="st_lucia", expected={"database": 1549, "queries": 1464}),
    "St Lucia (downloader tree): 1549 database, 1464 queries, 25 m",
)
_add(
    Benchmark("amstertime", folder="amstertime", expected={"database": 1231, "queries": 1231}),
    "AmsterTime (downloader tree), 25 m",
)
for _q, _n in (("v1", 1000), ("v2", 598), ("night", 466), ("occlusion", 76)):
    _add(
        Benchmark(f"sf-xl-test-{_q}", folder="sf_xl", queries_subset=f"queries_{_q}", expected={"queries": _n}),
        f"SF-XL test, queries_{_q} ({_n} queries), 25 m",
    )
for _q in ("night", "overcast", "rain", "snow", "sun"):
    _add(
        Benchmark(f"svox-{_q}", folder="svox", queries_subset=f"queries_{_q}"),
        f"SVOX test: gallery vs queries_{_q}, 25 m",
    )


def split_dataset_arg(spec: str) -> tuple[Benchmark | None, str]:
    """``NAME:ROOT`` -> (benchmark, ROOT); a plain path -> (None, path). Unknown NAME: one line."""
    name, sep, rest = spec.partition(":")
    if sep and name in BENCHMARKS:
        return BENCHMARKS[name], rest
    if sep and not Path(spec).exists() and "/" not in name and "\\" not in name and len(name) > 1:
        known = ", ".join(e.name for e in PRESETS.entries() if e.kind == "benchmark")
        raise PlaceRankError(f"unknown benchmark '{name}'; known benchmarks: {known}")
    return None, spec
