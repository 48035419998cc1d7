"""``placerank models``: list registered models, re-rankers and presets."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list registered models, re-rankers and presets")
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.models import list_models
    from placerank.presets import list_presets
    from placerank.rerank import list_rerankers

    print("models:")
    for e in list_models():
        print(f"  {e.name:28s} {e.description}")
    print("re-rankers (--rerank):")
    for r in list_rerankers():
        print(f"  {r.name:28s} {r.description}")
    for kind, flag in (("dataset", "placerank demo --preset"), ("train", "placerank train --preset")):
        entries = list_presets(kind)
        if entries:
            print(f"{kind} presets ({flag}):")
            for e in entries:
                print(f"  {e.name:28s} {e.description}")
    return 0
