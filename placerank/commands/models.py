"""``placerank models``: list registered models and re-rankers."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list registered models and re-rankers")
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.models import list_models
    from placerank.rerank import list_rerankers

    print("models:")
    for e in list_models():
        print(f"  {e.name:28s} {e.description}")
    print("re-rankers (--rerank):")
    for r in list_rerankers():
        print(f"  {r.name:28s} {r.description}")
    return 0
