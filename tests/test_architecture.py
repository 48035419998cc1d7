"""The package's shape is part of its contract: imports only point down the pipeline, there are no
import circles, and no file or class grows past what a reader can hold (issue 12)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
assert _spec is not None and _spec.loader is not None
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

MAX_LINES = 420  # "about 400"
MAX_METHODS = 15


def test_the_graph_reader_sees_known_edges():
    graph = import_graph.build_graph()
    # a module-level import, a from-import of a module, and an import inside a function
    assert "placerank.registry" in graph["placerank.models.registry"]
    assert "placerank.rerank.topk" in graph["placerank.rerank.base"]
    assert any(d.startswith("placerank.eval") for d in graph["placerank.commands.eval"])


def test_a_planted_circle_and_upward_import_are_found():
    graph = {
        "placerank.data.a": {"placerank.data.b"},
        "placerank.data.b": {"placerank.data.a"},
        "placerank.models.m": {"placerank.train.t"},
        "placerank.train.t": set(),
    }
    assert import_graph.find_cycles(graph) == [["placerank.data.a", "placerank.data.b"]]
    assert import_graph.upward_imports(graph) == [("placerank.models.m", "placerank.train.t")]


def test_no_import_circles():
    assert import_graph.find_cycles(import_graph.build_graph()) == []


def test_imports_only_point_down_the_pipeline():
    assert import_graph.upward_imports(import_graph.build_graph()) == []


def test_no_file_is_too_long():
    long = {
        str(p.relative_to(REPO)): n
        for p in sorted((REPO / "placerank").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_no_class_has_too_many_methods():
    big = {}
    for path in sorted((REPO / "placerank").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                n = sum(isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) for b in node.body)
                if n > MAX_METHODS:
                    big[f"{path.relative_to(REPO)}:{node.name}"] = n
    assert big == {}
