"""Published configurations: ``placerank reproduce MODEL --dataset NAME:ROOT``.

Each :class:`Published` pins one released model as its paper evaluates it (registry model,
input size, re-ranker, top-K and re-ranker thresholds, weights file and where it comes from) and
lists the published Recall@1/5/10 per named benchmark split (:mod:`placerank.presets.benchmarks`)
with the table they come from. :func:`reproduce` runs it through the one evaluation
(:func:`placerank.eval.evaluate.evaluate`) and :func:`compare` sets measured against published.
Only numbers whose source could be read are listed; ``docs/reproduce.md`` says what was left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from placerank.errors import DataError, PlaceRankError, WeightsError
from placerank.presets import register_preset
from placerank.presets.benchmarks import Benchmark, split_dataset_arg

TOLERANCE = 0.5  # points of Recall@N: `--check` fails beyond it
NS = ("1", "5", "10")

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Numbers:
    """Published R@1/5/10 (percent) of one configuration on one split: after re-ranking and/or
    of the global retrieval alone, and the table they are read from."""

    source: str
    reranked: Triple | None = None
    global_: Triple | None = None


@dataclass(frozen=True)
class Published:
    name: str
    label: str
    model: str  # registry model name
    weights_file: str
    weights_from: str
    image_size: tuple[int, int]
    rerank: str | None = None
    top_k: int = 100
    rerank_options: dict = field(default_factory=dict)
    numbers: dict[str, Numbers] = field(default_factory=dict)
    paper: str = ""

    def describe(self) -> str:
        h, w = self.image_size
        rr = f", re-rank {self.rerank} top-{self.top_k}" if self.rerank else ", global retrieval only"
        return f"{self.label} @{h}x{w}{rr}; published on {', '.join(self.numbers)}"

    def settings(self) -> dict:
        """What the run pins, as recorded in ``reproduce.json``."""
        d = asdict(self)
        d.pop("numbers")
        return d

    def weights_path(self, weights: str | Path | None) -> Path:
        """The weights file (given, or ``weights_file`` in the weights folders); missing: one line
        saying which file to put where."""
        from placerank.models.weights import weights_search_dirs

        where = f"{self.weights_file} ({self.weights_from})"
        if weights is not None:
            p = Path(weights).expanduser()
            if not p.is_file():
                raise WeightsError(f"{p}: no such weights file; put {where} there or pass --weights with its path")
            return p
        for d in weights_search_dirs():
            if (d / self.weights_file).is_file():
                return d / self.weights_file
        raise WeightsError(
            f"{self.label} weights not found: put {where} in $PLACERANK_WEIGHTS (or ../shared/weights)"
            " or pass --weights FILE"
        )

    def benchmark(self, dataset: str) -> tuple[Benchmark, str]:
        """``NAME:ROOT`` -> (benchmark, ROOT); NAME must be a split with published numbers."""
        published = ", ".join(self.numbers)
        benchmark, root = split_dataset_arg(dataset)
        if benchmark is None:
            raise DataError(f"--dataset needs NAME:ROOT; {self.name} has published numbers on: {published}")
        if benchmark.name not in self.numbers:
            raise DataError(
                f"{self.name} has no published number on {benchmark.name} (published on: {published};"
                " see docs/reproduce.md)"
            )
        if not root:
            raise DataError(f"--dataset {dataset}: give the folder after the colon ({benchmark.where()})")
        return benchmark, root


@dataclass(frozen=True)
class Row:
    stage: str  # "re-ranked" or "global"
    n: str
    measured: float  # percent
    published: float

    @property
    def delta(self) -> float:
        return self.measured - self.published

    @property
    def ok(self) -> bool:
        return abs(self.delta) <= TOLERANCE + 1e-9


PUBLISHED: dict[str, Published] = {}


def _add(p: Published) -> None:
    PUBLISHED[p.name] = p
    register_preset(p.name, p.describe(), kind="published")(lambda p=p: p)


def get_published(name: str) -> Published:
    if name not in PUBLISHED:
        raise PlaceRankError(f"unknown published configuration '{name}'; known: {', '.join(PUBLISHED)}")
    return PUBLISHED[name]


def compare(published: Published, benchmark: str, result) -> list[Row]:
    """Measured (an :class:`~placerank.eval.results.EvalResult`) against published, R@1/5/10,
    for each stage with a published number."""
    numbers = published.numbers[benchmark]
    rows = []
    for stage, pub, measured in (
        ("global", numbers.global_, result.recall_first_stage),
        ("re-ranked", numbers.reranked, result.recall),
    ):
        if pub is None:
            continue
        for n, value in zip(NS, pub):
            if n not in measured:
                raise DataError(f"no R@{n} measured (the database has fewer than {n} images)")
            rows.append(Row(stage, n, 100.0 * float(measured[n]), value))
    return rows


def failures(rows: list[Row]) -> list[Row]:
    return [r for r in rows if not r.ok]


def reproduce(
    name: str,
    dataset: str,
    weights: str | Path | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    image_size: tuple[int, int] | None = None,
    batch_size: int = 16,
    num_workers: int | None = None,
    use_cache: bool = True,
    precision: str = "fp32",
):
    """Run a published configuration on ``NAME:ROOT``; returns (result, rows, out folder). Writes
    ``OUT/reproduce.json`` (settings, published and measured numbers, deltas) and eval's outputs
    in ``OUT/eval/``. ``image_size`` overrides the published input size (smoke runs only:
    recorded as a protocol deviation)."""
    from placerank.eval.evaluate import EvalConfig, evaluate
    from placerank.utils import check_output_folder, write_json_atomic

    pub = get_published(name)
    benchmark, root = pub.benchmark(dataset)
    weights_path = pub.weights_path(weights)
    out = Path(out) if out is not None else Path("runs") / "reproduce" / f"{pub.name}-{benchmark.name}"
    check_output_folder(out)
    ds = benchmark.load(root)
    if not ds.labelled:
        raise DataError(f"{root}: {benchmark.name} read without positions; cannot compare recall")
    cfg = EvalConfig(
        out=out / "eval",
        model=pub.model,
        weights=weights_path,
        rerank=pub.rerank,
        top_k=pub.top_k,
        image_size=image_size or pub.image_size,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=num_workers,
        use_cache=use_cache,
        rerank_options=dict(pub.rerank_options),
    )
    result = evaluate(cfg, dataset=ds)
    rows = compare(pub, benchmark.name, result)
    deviation = None if image_size is None or tuple(image_size) == pub.image_size else list(image_size)
    write_json_atomic(
        out / "reproduce.json",
        {
            "configuration": pub.settings(),
            "benchmark": benchmark.name,
            "source": pub.numbers[benchmark.name].source,
            "image_size_overridden": deviation,
            "precision": result.model.get("precision", precision),
            "tolerance": TOLERANCE,
            "rows": [{**asdict(r), "delta": round(r.delta, 2), "ok": r.ok} for r in rows],
            "all_within_tolerance": not failures(rows),
        },
    )
    return result, rows, out


# --- the published configurations ---------------------------------------------------------

_FOL_PAPER = "Wang et al., Focus on Local, AAAI 2025 (github.com/chenshunpeng/FoL)"
_FOL_SRC = "FoL README @09cd23b, 'Performance' table (ViT-L, 504x504)"
_FOL_SRC_322 = "FoL README @09cd23b, 'Additional Results at 322x322' table"
_FOL_HF = "huggingface.co/shunpeng/FoL"
_FOL_RERANK = {"threshold": 0.7, "mode": "dense", "min_matches": 0}


def _fol(rows: dict[str, tuple[Triple, Triple]], source: str) -> dict[str, Numbers]:
    return {k: Numbers(source, reranked=r, global_=g) for k, (g, r) in rows.items()}


_add(
    Published(
        "fol-vitl14",
        "FoL ViT-L/14",
        "fol-vitl14",
        "FoL_large.pth",
        _FOL_HF,
        (504, 504),
        "fol-region",
        100,
        _FOL_RERANK,
        _fol(
            {
                "pitts30k-test": ((93.9, 97.2, 98.1), (94.5, 97.4, 98.2)),
                "pitts250k-test": ((96.5, 99.1, 99.5), (97.0, 99.2, 99.5)),
                "msls-val": ((93.1, 96.9, 97.4), (93.5, 96.9, 97.6)),
                "tokyo247": ((96.2, 98.7, 98.7), (98.4, 99.1, 99.4)),
                "amstertime": ((64.6, 84.3, 88.2), (70.1, 89.0, 91.8)),
                "sf-xl-test-v1": ((91.5, 94.8, 95.6), (95.0, 96.5, 96.8)),
                "sf-xl-test-v2": ((95.0, 98.0, 98.3), (95.0, 97.8, 98.5)),
                "sf-xl-test-night": ((53.4, 65.9, 71.7), (60.5, 72.8, 75.8)),
                "sf-xl-test-occlusion": ((51.3, 65.8, 73.7), (61.8, 77.6, 77.6)),
                "svox-night": ((98.3, 99.6, 99.6), (98.8, 99.8, 99.9)),
                "svox-overcast": ((97.9, 99.2, 99.3), (98.3, 99.3, 99.7)),
                "svox-rain": ((96.5, 99.6, 99.7), (98.2, 99.9, 99.9)),
                "svox-snow": ((99.1, 99.7, 99.8), (99.3, 99.8, 99.9)),
                "svox-sun": ((98.1, 99.4, 99.5), (98.8, 99.8, 99.9)),
            },
            _FOL_SRC,
        ),
        _FOL_PAPER,
    )
)
_add(
    Published(
        "fol-vitl14-322",
        "FoL ViT-L/14",
        "fol-vitl14",
        "FoL_large.pth",
        _FOL_HF,
        (322, 322),
        "fol-region",
        100,
        _FOL_RERANK,
        _fol(
            {
                "pitts30k-test": ((93.6, 96.9, 97.9), (93.9, 96.9, 98.1)),
                "msls-val": ((92.8, 96.9, 97.2), (90.1, 95.7, 96.9)),
                "tokyo247": ((96.5, 98.1, 98.4), (97.1, 97.8, 98.7)),
                "sf-xl-test-v1": ((90.4, 93.8, 94.7), (93.4, 95.6, 96.1)),
                "sf-xl-test-v2": ((94.1, 98.2, 98.5), (93.5, 97.7, 98.5)),
                "sf-xl-test-night": ((53.4, 67.0, 70.2), (56.0, 70.0, 75.8)),
                "sf-xl-test-occlusion": ((44.7, 67.1, 71.1), (51.3, 72.4, 78.9)),
                "svox-night": ((98.4, 99.5, 99.8), (98.2, 99.6, 99.9)),
                "svox-overcast": ((97.7, 99.2, 99.4), (98.2, 99.4, 99.7)),
                "svox-rain": ((97.4, 99.6, 99.6), (98.6, 99.7, 99.8)),
                "svox-snow": ((98.3, 99.7, 99.8), (98.7, 99.5, 99.8)),
                "svox-sun": ((97.8, 99.4, 99.6), (97.9, 99.4, 99.5)),
            },
            _FOL_SRC_322,
        ),
        _FOL_PAPER,
    )
)
_add(
    Published(
        "fol-vitb14",
        "FoL ViT-B/14",
        "fol-vitb14",
        "FoL_base.pth",
        _FOL_HF,
        (322, 322),
        "fol-region",
        100,
        _FOL_RERANK,
        _fol(
            {
                "pitts30k-test": ((92.1, 96.4, 97.6), (93.1, 96.9, 97.7)),
                "msls-val": ((91.1, 95.7, 96.4), (91.5, 96.2, 96.8)),
                "tokyo247": ((94.6, 96.5, 96.8), (97.5, 98.1, 98.4)),
                "sf-xl-test-v1": ((86.1, 91.4, 92.7), (90.0, 93.4, 94.4)),
                "sf-xl-test-v2": ((94.1, 97.7, 98.5), (94.8, 97.2, 98.0)),
                "sf-xl-test-night": ((44.8, 56.7, 61.8), (52.8, 64.8, 67.6)),
                "sf-xl-test-occlusion": ((48.7, 56.6, 60.5), (46.1, 61.8, 67.1)),
                "svox-night": ((93.1, 98.2, 99.0), (96.5, 98.4, 99.3)),
                "svox-overcast": ((97.7, 99.2, 99.4), (97.7, 99.3, 99.4)),
                "svox-rain": ((96.2, 99.1, 99.6), (97.9, 99.7, 99.8)),
                "svox-snow": ((98.7, 99.5, 99.5), (97.7, 99.7, 99.7)),
                "svox-sun": ((96.7, 98.9, 99.3), (96.6, 98.9, 99.5)),
            },
            _FOL_SRC_322,
        ),
        _FOL_PAPER,
    )
)

_SELA_PAPER = (
    "Lu et al., Towards Seamless Adaptation of Pre-trained Models for VPR, ICLR 2024 (github.com/Lu-Feng/SelaVPR)"
)
_SELA_SRC = "SelaVPR README @11f88b2, 'Trained Models' table"
_SELA_RERANK = {"min_matches": 2}  # the official count: a single mutual match scores 0
_add(
    Published(
        "selavpr-vitl14-msls",
        "SelaVPR ViT-L/14 (MSLS fine-tune)",
        "selavpr-vitl14",
        "SelaVPR_msls.pth",
        "Google Drive file 1vy05l0JTEgr6n8iSoz_P_yjWfEzFPAkV, linked from the SelaVPR README",
        (224, 224),
        "selavpr-mnn",
        100,
        _SELA_RERANK,
        {
            "msls-val": Numbers(f"{_SELA_SRC} (MSLS model)", reranked=(90.8, 96.4, 97.2)),
            "st-lucia": Numbers(f"{_SELA_SRC} (MSLS model)", reranked=(99.8, 100.0, 100.0)),
        },
        _SELA_PAPER,
    )
)
_add(
    Published(
        "selavpr-vitl14-pitts30k",
        "SelaVPR ViT-L/14 (MSLS then Pitts30k fine-tune)",
        "selavpr-vitl14",
        "SelaVPR_pitts30k.pth",
        "Google Drive file 1LKTZZRHfMH3dY3UPagCt2TIlMN5LguGO, linked from the SelaVPR README",
        (224, 224),
        "selavpr-mnn",
        100,
        _SELA_RERANK,
        {
            "tokyo247": Numbers(f"{_SELA_SRC} (Pitts30k model)", reranked=(94.0, 96.8, 97.5)),
            "pitts30k-test": Numbers(f"{_SELA_SRC} (Pitts30k model)", reranked=(92.8, 96.8, 97.7)),
            "pitts250k-test": Numbers(f"{_SELA_SRC} (Pitts30k model)", reranked=(95.7, 98.8, 99.2)),
        },
        _SELA_PAPER,
    )
)
_add(
    Published(
        "sfrs-vgg16",
        "SFRS VGG16-NetVLAD-PCA4096",
        "sfrs-vgg16",
        "vgg16_netvlad.pth",
        "github.com/yxgeee/OpenIBL/releases/download/v0.1.0-beta/vgg16_netvlad.pth",
        (480, 640),
        None,
        100,
        {},
        {
            "pitts250k-test": Numbers(
                "OpenIBL docs/MODEL_ZOO.md @701c8eb, SFRS row (trained on Pitts30k-train)", global_=(90.7, 96.4, 97.6)
            ),
        },
        "Ge et al., Self-supervising Fine-grained Region Similarities, ECCV 2020 (github.com/yxgeee/OpenIBL)",
    )
)
