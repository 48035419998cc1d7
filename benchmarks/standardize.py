"""Per-side descriptor standardisation (``placerank eval --standardize``): none vs center vs zscore.

    python benchmarks/standardize.py

Model: the default ``effnet-lite0-gem`` (ImageNet weights, never trained on these places), the
same inputs as ``benchmarks/sequence.py`` (GardensPoint 640x360, Nordland 64x32 thumbnails at
64x128) through the descriptor cache. Each side is standardised with its own statistics
(``placerank.descriptors.standardize.standardize``: the database's from the database, the
queries' from the queries: transductive). FAISS flat top-100, then sequence matching at the
default velocities 0.8..1.2 (``placerank.rerank.sequence.sequence_match``).

- GardensPoint day_left -> night_right, 140 x 140 (all frames), |i-j| <= 2 and strict: L = 1, 5, 10, 15, 20
- Nordland winter -> summer, 2,800 x 2,800, strict j == i: the same L, and L = 10, 20 with one velocity

Writes ``benchmarks/results/standardize.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from sequence import GARDENS, NORDLAND, RESULTS, describe, recall, run, search  # noqa: E402


def sweep(name: str, db, q, tolerances: dict, lengths=(1, 5, 10, 15, 20), **options) -> dict:
    from placerank.descriptors.standardize import MODES, standardize

    rows: dict = {}
    for mode in MODES:
        t0 = time.perf_counter()
        db_s, q_s = standardize(db, mode), standardize(q, mode)
        rows.setdefault(mode, {})["standardize_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        sims, ids, _ = search(db_s, q_s, 100)
        for length in lengths:
            top = ids if length == 1 else run(ids, sims, length, **options)[0]
            row = {f"R@1 {label}": recall(top, tol) for label, tol in tolerances.items()}
            rows.setdefault(mode, {})[f"L={length}"] = row
            print(name, mode, length, row, flush=True)
    return rows


def main() -> None:
    from placerank.utils import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t0 = time.perf_counter()
    result: dict = {
        "model": "effnet-lite0-gem (ImageNet weights)",
        "note": "each side standardised with its own statistics (transductive); FAISS flat; sequence v 0.8..1.2",
    }
    gp_db, gp_q = describe(GARDENS / "day_left", None), describe(GARDENS / "night_right", None)
    result["GardensPoint day_left->night_right (140 x 140, 640x360)"] = sweep(
        "GP", gp_db, gp_q, {"|i-j|<=2": 2, "strict": 0}
    )
    nl_db = describe(NORDLAND / "database_summer", (64, 128))
    nl_q = describe(NORDLAND / "queries_winter", (64, 128))
    result["Nordland winter->summer (2,800 x 2,800, 64x128)"] = sweep("NL", nl_db, nl_q, {"strict": 0})
    result["Nordland winter->summer (2,800 x 2,800, 64x128), --sequence-velocity 1"] = sweep(
        "NL v=1", nl_db, nl_q, {"strict": 0}, (10, 20), v_min=1.0, v_max=1.0
    )
    result["total_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(args.out / "standardize.json", result)
    print(f"wrote {args.out / 'standardize.json'}")


if __name__ == "__main__":
    main()
