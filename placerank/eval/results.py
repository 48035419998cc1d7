"""The one result schema: ``results.json`` written by eval, the benchmarks and the recipes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from placerank.utils import write_json_atomic


@dataclass
class EvalResult:
    """The one result schema written as ``results.json`` by eval, the benchmarks and recipes."""

    recall: dict[str, float]
    num_queries: int
    num_database: int
    timing_s: dict[str, float]
    peak_memory_mb: float
    recall_first_stage: dict[str, float] = field(default_factory=dict)
    num_queries_with_positives: int = 0
    dataset: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    rerank: dict | None = None
    device: str = "cpu"
    placerank_version: str = ""
    labelled: bool = True  # False: unlabelled data, ``recall`` is empty (never guessed)
    sequence: dict | None = None  # --sequence-length > 1: options, orders, cost (placerank.eval.sequence)

    # {"auc", "recall_at_100_precision", "threshold_at_100_precision", "confidence", "definition"}
    # of the final top-1s and of the first stage's (placerank.eval.precision); {} when unlabelled
    precision_recall: dict = field(default_factory=dict)
    precision_recall_first_stage: dict = field(default_factory=dict)
    # the first-stage index: {"spec", "options", "train_size", "bytes", "bytes_per_image", "build_s",
    # "search_ms_per_query"} (placerank.index.factory); None in results from before index kinds
    index: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """A saved ``results.json``; files from older versions (without later fields) load with
        those fields' defaults, and keys this version does not know are left out."""
        import json
        from dataclasses import fields

        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())
