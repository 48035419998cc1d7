"""Re-rankers: reorder the top-K candidates using local evidence."""

from placerank.rerank.base import (  # noqa: F401
    Reranker,
    create_reranker,
    list_rerankers,
    register_reranker,
    rerank_order,
)
