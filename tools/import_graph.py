"""The import graph of ``placerank/``: module -> modules it imports (module-level and inside
functions alike), its circles, and the imports that run up the pipeline.

    python tools/import_graph.py                 # print circles and upward imports, exit 1 if any
    python tools/import_graph.py --png docs/import_graph.png   # also draw the stage graph

The stage order is the pipeline's (docs/architecture.md): a module may import its own stage and
any stage below it, never one above. ``tests/test_architecture.py`` runs the same checks.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "placerank"

#: the pipeline, bottom to top; a stage may import stages at its level or below
STAGES: list[tuple[str, ...]] = [
    ("errors", "utils", "version", "registry", "options"),
    ("data",),
    ("models",),
    ("descriptors",),
    ("index",),
    ("rerank",),
    ("viz",),
    ("eval", "train", "localize"),
    ("presets",),
    ("serve",),
    ("commands", "cli", "__main__"),
]
#: the package's __init__ only re-exports lazily; it sits above everything
TOP = ("__init__",)
#: stages at one level that must still not import each other
FORBIDDEN = {("eval", "train"), ("eval", "localize"), ("localize", "train"), ("localize", "eval")}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def level_of(stage: str) -> int:
    if stage in TOP:
        return len(STAGES)
    for i, group in enumerate(STAGES):
        if stage in group:
            return i
    raise KeyError(f"stage '{stage}' is not placed in tools/import_graph.py STAGES")


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def build_graph() -> dict[str, set[str]]:
    """module -> placerank modules it imports (``from a import b`` counts a.b when that is a module)."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph: dict[str, set[str]] = {}
    for f in files:
        mod = module_name(f)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, mod, f.name == "__init__.py")
                if base:
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t.startswith("placerank") and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where the imported module's stage is above the importer's, or
    the pair of stages is forbidden; a package's ``__init__`` re-exporting its own modules is fine."""
    bad = []
    for mod, deps in sorted(graph.items()):
        s = stage_of(mod)
        for d in sorted(deps):
            t = stage_of(d)
            if s == t:
                continue
            if level_of(t) > level_of(s) or (s, t) in FORBIDDEN:
                bad.append((mod, d))
    return bad


def stage_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], int]:
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for mod, deps in graph.items():
        for d in deps:
            a, b = stage_of(mod), stage_of(d)
            if a != b and a not in TOP and b not in TOP:
                edges[(a, b)] += 1
    return dict(edges)


def draw(graph: dict[str, set[str]], path: Path) -> None:
    """Stages as boxes on their pipeline level, imports as arrows (width ~ number of imports);
    an arrow that runs up is drawn red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = stage_edges(graph)
    stages = sorted(({s for e in edges for s in e} | {stage_of(m) for m in graph}) - set(TOP), key=level_of)
    rows: dict[int, list[str]] = defaultdict(list)
    for s in stages:
        rows[level_of(s)].append(s)
    pos = {}
    for lvl, names in rows.items():
        for i, n in enumerate(names):
            pos[n] = ((i + 1) / (len(names) + 1), lvl)
    fig, ax = plt.subplots(figsize=(9, 8), dpi=120)
    for (a, b), n in sorted(edges.items()):
        (x1, y1), (x2, y2) = pos[a], pos[b]
        up = level_of(b) > level_of(a)
        ax.annotate(
            "",
            xy=(x2, y2 + 0.18),
            xytext=(x1, y1 - 0.18),
            arrowprops=dict(
                arrowstyle="->",
                lw=0.5 + 0.25 * min(n, 8),
                alpha=0.55,
                color="red" if up else "#3b6ea5",
                connectionstyle="arc3,rad=0.08",
            ),
        )
    for n, (x, y) in pos.items():
        count = sum(1 for m in graph if stage_of(m) == n)
        label = f"{n}/\n{count} modules" if (PACKAGE / n).is_dir() else f"{n}.py"
        ax.text(
            x,
            y,
            label,
            ha="center",
            va="center",
            fontsize=9,
            bbox=dict(boxstyle="round,pad=0.4", fc="#f3f6fa", ec="#3b6ea5"),
        )
    cycles = find_cycles(graph)
    ups = upward_imports(graph)
    ax.set_title(
        f"placerank import graph by stage (top = commands, bottom = errors/utils)\n"
        f"{len(graph)} modules, {sum(len(d) for d in graph.values())} imports, "
        f"{len(cycles)} circles, {len(ups)} imports up the pipeline",
        fontsize=10,
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, len(STAGES) - 0.4)
    ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--png", type=Path, default=None, help="also draw the stage graph to this PNG")
    args = ap.parse_args(argv)
    graph = build_graph()
    cycles = find_cycles(graph)
    ups = upward_imports(graph)
    print(f"{len(graph)} modules, {sum(len(d) for d in graph.values())} imports")
    print(f"circles: {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(c))
    print(f"imports up the pipeline: {len(ups)}")
    for a, b in ups:
        print(f"  {a} -> {b}")
    if args.png:
        draw(graph, args.png)
        print(f"wrote {args.png}")
    return 1 if cycles or ups else 0


if __name__ == "__main__":
    sys.exit(main())
