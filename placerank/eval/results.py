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

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())
