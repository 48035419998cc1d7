"""Every benchmark layout read from a tiny replica (real images, synthetic coordinates):
reader -> dataset -> positives equal a brute-force check; labels are never guessed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from placerank.data.layouts import LayoutOptions, open_dataset
from placerank.data.readers import load_dataset, read_image_set
from placerank.errors import DataError, PlaceRankError

_spec = importlib.util.spec_from_file_location("layout_replicas", Path(__file__).with_name("replicas.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)


def _pos(ds) -> list[list[int]]:
    return [p.tolist() for p in ds.positives]


def _sources(image_set) -> list[Path]:
    return [Path(p).resolve() for p in image_set.paths]


def test_msls_replica_protocol_and_positives(tmp_path, gardens):
    city = R.build_msls(tmp_path, gardens)
    db, q = R.places(gardens)
    ds = open_dataset(city / "database", city / "query")  # auto-detected from the two folders
    assert _sources(ds.database) == [s.resolve() for s, _, _ in db]  # the panorama is out
    assert _sources(ds.queries) == [s.resolve() for s, _, _ in q[:-1]]  # far query + non-subtask query out
    assert _pos(ds) == R.brute_positives(db, q[:-1])
    p = ds.describe()
    assert p["layout"] == "msls" and p["subtask"] == "all" and p["radius_m"] == 25.0
    assert p["queries_without_positives"] == "dropped (1)" and p["counts"]["cph"]["database"]["panoramas_dropped"] == 1
    # the root form reads the same city; a subtask filters both sides by its column
    same = open_dataset(dataset=tmp_path, options=LayoutOptions(msls_cities=None))
    assert _pos(same) == _pos(ds)
    sub = open_dataset(city / "database" / "images", city / "query", options=LayoutOptions(msls_subtask="night2day"))
    assert all(int(Path(x).stem[1:5]) % 2 == 0 for x in sub.database.paths)
    json.dumps(ds.describe())


def test_netvlad_mat_v5_and_v73_read_the_same(tmp_path, gardens):
    db, q = R.places(gardens)
    v5 = R.build_mat_v5(tmp_path / "v5", gardens)
    v73 = R.build_mat_v73(tmp_path / "v73", gardens)
    a, b = open_dataset(dataset=v5), open_dataset(dataset=v73)
    for ds in (a, b):
        assert _sources(ds.database) == [s.resolve() for s, _, _ in db]
        assert _sources(ds.queries) == [s.resolve() for s, _, _ in q]  # queries_real/, not the same-named db file
        assert _pos(ds) == R.brute_positives(db, q)
        assert ds.describe()["radius_source"] == "posDistThr" and ds.describe()["which_set"] == "test"
    assert open_dataset(dataset=v5, options=LayoutOptions(radius=40.0)).describe()["radius_m"] == 40.0
    with pytest.raises(DataError, match=r"query subsets need a name,time CSV .*pitts30k_test_query_times.csv$"):
        open_dataset(dataset=v5, options=LayoutOptions(queries_subset="night"))


def test_tokyo_subsets_come_from_the_times_file(tmp_path, gardens):
    mat = R.build_mat_v5(tmp_path, gardens, name="tokyo247.mat")
    _, q = R.places(gardens)
    times = ["day", "sunset", "night", "day", "sunset", "night"]
    rows = [[f"000/{k:06d}_pitch1_yaw1.jpg", t] for k, t in enumerate(times)]
    R.write_csv(tmp_path / "tokyo247_query_times.csv", ["name", "time"], rows)
    ds = open_dataset(dataset=mat, options=LayoutOptions(queries_subset="night"))
    assert _sources(ds.queries) == [q[2][0].resolve(), q[5][0].resolve()]
    assert ds.describe()["query_subset"] == "night"


def test_downloader_tree_uses_the_paths_list(tmp_path, gardens):
    db, q = R.places(gardens)
    root = R.build_downloader(tmp_path / "pitts30k", gardens)
    ds = open_dataset(dataset=root)
    assert _sources(ds.database) == [s.resolve() for s, _, _ in reversed(db)]  # the list's order
    rev = list(reversed(db))
    assert _pos(ds) == R.brute_positives(rev, q)
    assert ds.describe()["image_lists"] == ["database"]
    # the same folders given as --database/--queries read as @UTM@ folders
    test = root / "images" / "test"
    assert _pos(open_dataset(test / "database", test / "queries")) == _pos(ds)


def test_multi_query_sets_need_a_named_subset(tmp_path, gardens):
    root = R.build_downloader(tmp_path / "svox", gardens, ("queries_night", "queries_sun"), db_dir="gallery")
    test = root / "images" / "test"
    with pytest.raises(DataError) as e:
        open_dataset(dataset=root)
    assert str(e.value) == (
        f"{test}: ambiguous layout: 2 query folders (queries_night, queries_sun); pick one with --queries-subset"
    )
    ds = open_dataset(dataset=root, options=LayoutOptions(queries_subset="night"))
    assert ds.describe()["queries"] == "queries_night" and ds.describe()["database"] == "gallery"
    assert len(ds.queries) == 6


def test_patchnetvlad_lists_and_npz(tmp_path, gardens):
    db, q = R.places(gardens)
    gt, index, query = R.build_patchnetvlad(tmp_path, gardens)
    ds = open_dataset(index, query, dataset=gt, options=LayoutOptions(images_root=tmp_path))
    assert _sources(ds.queries) == [s.resolve() for s, _, _ in q]
    assert _pos(ds) == R.brute_positives(db, q)


def test_named_benchmarks_find_their_files(tmp_path, gardens):
    from placerank.presets import get_preset
    from placerank.presets.benchmarks import split_dataset_arg

    R.build_mat_v5(tmp_path / "pitts", gardens)
    bench, root = split_dataset_arg(f"pitts30k-test:{tmp_path}")
    ds = bench.load(root)
    p = ds.describe()
    assert p["benchmark"] == "pitts30k-test" and p["counts"] == {"database": 12, "queries": 6}
    assert p["counts_match_published"] is False and p["published_counts"] == {"database": 10000, "queries": 6816}
    R.build_msls(tmp_path / "msls", gardens, city="sf")
    with pytest.raises(DataError, match=r"cph missing"):
        get_preset("msls-val", "benchmark").load(tmp_path / "msls")
    with pytest.raises(DataError, match=r"no st-lucia data found \(looked for st_lucia/images/test/\)$"):
        get_preset("st-lucia", "benchmark").load(tmp_path)
    with pytest.raises(PlaceRankError, match=r"^unknown benchmark 'pitts31k'; known benchmarks: .*msls-val"):
        split_dataset_arg("pitts31k:/x")


# ---- labels are never guessed -----------------------------------------------------------------


def test_plain_folder_is_unlabelled_and_frames_only_when_asked(gardens):
    s = read_image_set(gardens / "day_right")
    assert s.kind == "none"
    ds = load_dataset(gardens / "day_right", gardens / "night_right")
    assert not ds.labelled and all(len(p) == 0 for p in ds.positives)
    assert ds.describe() == {
        "layout": "unlabelled",
        "database": str(gardens / "day_right"),
        "queries": str(gardens / "night_right"),
        "positives": "unlabelled",
        "labelled": False,
    }
    for frames in (read_image_set(gardens / "day_right", "frames"), read_image_set(gardens / "day_right", "traversal")):
        assert frames.kind == "frame" and frames.positions.tolist() == list(range(140))
    asked = load_dataset(gardens / "day_right", gardens / "night_right", frame_tolerance=2)
    assert asked.rule.describe() == "|i-j| <= 2" and asked.describe()["layout"] == "frames"


def test_mixed_layouts_are_one_line_errors(tmp_path, gardens):
    mixed = tmp_path / "mixed"
    R.link(gardens / "day_right" / "Image000.jpg", mixed / "@500000.00@5000000.00@a@.jpg")
    R.link(gardens / "day_right" / "Image001.jpg", mixed / "plain.jpg")
    with pytest.raises(DataError) as e:
        read_image_set(mixed)
    assert str(e.value) == (
        f"{mixed}: mixed layout: 1 of 2 images have @UTM@ names but plain.jpg has not; "
        "rename or remove the odd ones, or pass --layout unlabelled"
    )
    utm = tmp_path / "utm"
    R.link(gardens / "day_right" / "Image000.jpg", utm / "@500000.00@5000000.00@a@.jpg")
    with pytest.raises(DataError, match=r"^mixed layout: .*utm has 'utm' positions but .*night_right has none"):
        load_dataset(utm, gardens / "night_right")
    city = R.build_msls(tmp_path / "m", gardens)
    with pytest.raises(DataError, match=r"^mixed layout: only one of .* is an MSLS city folder"):
        open_dataset(city / "database", gardens / "night_right")
