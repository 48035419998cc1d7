"""The one Registry: plug-ins are found by scanning their package, so adding one is adding a file."""

from __future__ import annotations

import sys

import pytest

from placerank.errors import PlaceRankError
from placerank.registry import Registry


def _package(tmp_path, monkeypatch, files: dict[str, str]) -> str:
    pkg = tmp_path / "plugpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "plugpkg" or m.startswith("plugpkg.")]:
        monkeypatch.delitem(sys.modules, mod)
    return "plugpkg"


PLUGIN = """
from plugpkg.reg import REG

@REG.register("{name}", "a test plug-in", needs_model={needs})
def make(scale: float = 1.0, mode: str = "a"):
    return ("{name}", scale, mode)
"""


def test_a_new_module_is_a_new_plugin_without_any_list(tmp_path, monkeypatch):
    pkg = _package(
        tmp_path,
        monkeypatch,
        {
            "reg.py": "from placerank.registry import Registry\nREG = Registry('widget', 'plugpkg', skip=('reg',))\n",
            "alpha.py": PLUGIN.format(name="alpha", needs=False),
            "beta.py": PLUGIN.format(name="beta", needs=True),
            "_private.py": PLUGIN.format(name="hidden", needs=False),
        },
    )
    reg = __import__(f"{pkg}.reg", fromlist=["REG"]).REG
    assert reg.names() == ["alpha", "beta"]
    assert reg.get("beta").needs_model is True
    assert reg.get("alpha").module == "plugpkg.alpha"
    assert reg.create("alpha", scale=2.0) == ("alpha", 2.0, "a")


def test_unknown_name_is_one_line_listing_the_known_ones(tmp_path, monkeypatch):
    pkg = _package(
        tmp_path,
        monkeypatch,
        {
            "reg.py": "from placerank.registry import Registry\nREG = Registry('widget', 'plugpkg', skip=('reg',))\n",
            "alpha.py": PLUGIN.format(name="alpha", needs=False),
        },
    )
    reg = __import__(f"{pkg}.reg", fromlist=["REG"]).REG
    with pytest.raises(PlaceRankError) as e:
        reg.get("gamma")
    assert str(e.value) == "unknown widget 'gamma'; known widgets: alpha"


def test_registering_one_name_twice_is_refused():
    reg = Registry("widget", "placerank.presets")

    @reg.register("x")
    def one():
        return 1

    with pytest.raises(PlaceRankError, match="widget 'x' is registered twice"):

        @reg.register("x")
        def two():
            return 2


def test_options_of_a_plugin_come_from_its_factory_signature(tmp_path, monkeypatch):
    pkg = _package(
        tmp_path,
        monkeypatch,
        {
            "reg.py": "from placerank.registry import Registry\nREG = Registry('widget', 'plugpkg', skip=('reg',))\n",
            "alpha.py": PLUGIN.format(name="alpha", needs=False),
        },
    )
    reg = __import__(f"{pkg}.reg", fromlist=["REG"]).REG
    from placerank.options import parse_options

    opts = parse_options(reg.get("alpha").options(), ["scale=0.5"], what="widget option")
    assert (opts.scale, opts.mode) == (0.5, "a")


def test_every_kind_of_plugin_is_found_in_its_package():
    from placerank.models import list_models
    from placerank.models.localfeat import feature_kinds
    from placerank.rerank import list_rerankers
    from placerank.train.common import list_methods

    assert {"effnet-lite0-gem", "fol-effnet-lite0", "selavpr-effnet-lite0", "sfrs-vgg16"} <= {
        m.name for m in list_models()
    }
    assert {"fol-region", "selavpr-mnn", "ransac-xfeat"} <= {r.name for r in list_rerankers()}
    assert set(list_methods()) >= {"fol", "selavpr", "sfrs"}
    assert set(feature_kinds()) == {"xfeat", "aliked", "disk"}
