"""``placerank models``: list every registered plug-in: models, re-rankers, local features,
training methods and presets of each kind."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list registered models, re-rankers and presets")
    p.set_defaults(func=run)


def run(args) -> int:
    from placerank.models import list_models
    from placerank.models.localfeat import feature_kinds
    from placerank.presets import list_presets
    from placerank.rerank import list_rerankers
    from placerank.train.common import list_methods

    print("models:")
    for e in list_models():
        print(f"  {e.name:28s} {e.description}")
    print("re-rankers (--rerank):")
    for r in list_rerankers():
        print(f"  {r.name:28s} {r.description}")
    print("local features (placerank match --features):")
    print("  " + ", ".join(feature_kinds()))
    print("training methods (placerank train --method):")
    print("  " + ", ".join(list_methods()))
    for kind, flag in PRESET_KINDS:
        entries = list_presets(kind)
        if entries:
            print(f"{kind} presets ({flag}):")
            for e in entries:
                print(f"  {e.name:28s} {e.description}")
    return 0


PRESET_KINDS = (
    ("dataset", "placerank demo --preset"),
    ("train", "placerank train --preset"),
    ("benchmark", "placerank eval --dataset NAME:ROOT"),
    ("published", "placerank reproduce NAME"),
)
