"""The one typed options parser: every --option / --rerank-option value is checked before work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from placerank.errors import PlaceRankError
from placerank.options import options_dataclass, parse_options, split_key_values


@dataclass(frozen=True)
class Opts:
    threshold: float = 0.7
    chunk: int = 128
    mode: Literal["pool3", "dense", "center"] = "pool3"
    fast: bool = False
    num_regions: int | None = None
    frames: tuple[int, int] = (0, 10)


def test_values_are_converted_to_the_field_types():
    o = parse_options(Opts, ["threshold=0.5", "chunk=64", "mode=dense", "fast=yes", "num-regions=9", "frames=3,7"])
    assert o == Opts(0.5, 64, "dense", True, 9, (3, 7))
    assert parse_options(Opts, ["num_regions=none"]).num_regions is None
    assert parse_options(Opts, {}) == Opts()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["thresold=0.5"], "unknown option 'thresold'; known: chunk, fast, frames, mode, num_regions, threshold"),
        (["chunk=1.5"], "option chunk: expected a whole number, got '1.5'"),
        (["threshold=high"], "option threshold: expected a number, got 'high'"),
        (["threshold=nan"], "option threshold: expected a number, got 'nan'"),
        (["mode=sparse"], "option mode: 'sparse' is not one of pool3, dense, center"),
        (["fast=maybe"], "option fast: expected true or false, got 'maybe'"),
        (["chunk"], "--option expects KEY=VALUE, got 'chunk'"),
    ],
)
def test_bad_options_are_one_line(given, message):
    with pytest.raises(PlaceRankError) as e:
        parse_options(Opts, given)
    assert str(e.value) == message


def test_key_values_keep_everything_after_the_first_equals():
    assert split_key_values(["path=a=b.csv", "x-y=1"]) == {"path": "a=b.csv", "x_y": "1"}


def test_factory_keywords_become_a_typed_dataclass():
    def factory(model=None, threshold: float = 0.7, min_matches: int = 0, device="cpu"):
        return threshold, min_matches

    cls = options_dataclass(factory, "fol-region")
    assert cls.__name__ == "FolRegionOptions"
    assert [f for f in cls.__dataclass_fields__] == ["threshold", "min_matches"]
    with pytest.raises(PlaceRankError, match="expected a whole number"):
        parse_options(cls, ["min_matches=two"])
