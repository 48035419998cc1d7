"""``index``: bring the database up to date with a folder of photos (and/or a positions CSV).

Only new or changed photos are read: a photo whose mtime and size are unchanged is skipped, one
with a new mtime but the same sha256 is only touched, one whose content is already indexed under
another path reuses that descriptor. The rest is described by the shared extraction, chunk by
chunk, each chunk one transaction. Your photos are only read (opened read-only for decoding, EXIF
and sha256).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from placerank.data.exif import GpsReading, read_gps
from placerank.data.positions import LOCAL, WGS84, Position, read_positions_csv
from placerank.descriptors.fast import runtime_of
from placerank.errors import DataError, PlaceRankError
from placerank.localize.features import CHUNK_BATCHES, LocalFeatureCache, compile_for, describe, image_sizes
from placerank.localize.metadata import FileRow
from placerank.localize.model import check_runtime_made, stored_precision
from placerank.localize.results import IndexReport
from placerank.localize.store import NewPhoto, Store

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png")


def is_under(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def list_photos(folder: Path) -> list[Path]:
    """Every .jpg/.jpeg/.png under ``folder`` (recursive), skipping hidden files and folders."""
    from placerank.data.readers import list_images

    folder = Path(folder).resolve()
    return [
        p
        for p in list_images(folder, recursive=True)
        if p.suffix.lower() in PHOTO_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def not_an_image(path: Path) -> str | None:
    """The one-line reason ``path`` is not a readable image (header check only), else None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{path}: cannot read image ({type(e).__name__}: {e})"
    return None


def frame_error(folder: Path, db_frame: str, new_frame: str, path: Path) -> str:
    names = {WGS84: "GPS (lat/lon, UTM)", LOCAL: "a local metric frame (easting/northing without a UTM zone)"}
    return (
        f"{folder}: the database holds positions in {names[db_frame]}, but {path} has a position in "
        f"{names[new_frame]}; use a separate --db"
    )


@dataclass
class _Plan:
    todo: list[NewPhoto] = field(default_factory=list)  # need a descriptor (new or changed content)
    touched: list[tuple[int, int, int]] = field(default_factory=list)  # (id, mtime, size): same content
    moved: list[tuple[int, Position, str]] = field(default_factory=list)  # (id, position, source)
    stale: list[str] = field(default_factory=list)  # indexed photos whose new content cannot be indexed
    frame: str = ""


class FolderIndexer:
    """One ``index`` run of a database (the caller holds the write lock)."""

    def __init__(
        self, store: Store, features: LocalFeatureCache, model: Callable, say: Callable, progress: bool, nproc: int = 1
    ):
        self.store, self.features, self.model, self.say, self.progress = store, features, model, say, progress
        self.nproc = nproc  # > 1: new photos' global descriptors from that many local ranks

    def run(
        self,
        folder,
        positions,
        allow_no_gps: bool,
        rerank: str | None,
        rerank_options: dict | None,
        prune: bool,
        batch_size: int,
        num_workers: int | None,
    ) -> IndexReport:
        report = IndexReport()
        files, csv_pos, root = self._files(folder, positions, report, prune)
        store = self.store
        rows = store.images.files()
        plan = self._plan(files, rows, csv_pos, positions, allow_no_gps, report)
        reranker = self.features.reranker(rerank, rerank_options) if rerank else None
        stored_before = self.features.count(reranker) if reranker is not None else 0
        if plan.touched or plan.moved or (plan.frame and plan.frame != store.meta.get("frame")):
            with store.meta.transaction():
                for row_id, mtime, size in plan.touched:
                    store.images.set_file(row_id, mtime, size)
                for row_id, pos, source in plan.moved:
                    store.images.set_position(row_id, pos, source)
                store.meta.set("frame", plan.frame)
        try:
            self._add(plan, report, batch_size, num_workers, reranker)
            if plan.stale:  # changed on disk into something unindexable: the old descriptor is wrong now
                report.removed.extend(store.remove(plan.stale))
            if root is not None:
                gone = sorted(p for p in rows if is_under(Path(p), root) and not Path(p).exists())
                if prune and gone:
                    report.removed.extend(store.remove(gone))
                elif not prune:
                    report.missing_on_disk = gone
        finally:
            store.save_index()  # what was committed, also when interrupted
        if reranker is not None:
            self._local(reranker, report, num_workers)
            report.local_extracted = self.features.count(reranker) - stored_before
        return report

    def _files(self, folder, positions, report: IndexReport, prune: bool):
        csv_pos = read_positions_csv(positions) if positions is not None else None
        root = Path(folder).resolve() if folder is not None else None
        if root is None and csv_pos is None:
            raise PlaceRankError("give a folder of photos, a --positions CSV, or both")
        files: list[Path] = []
        if root is not None:
            if not root.is_dir():
                raise DataError(f"{folder}: folder does not exist" if not root.exists() else f"{folder}: not a folder")
            files = list_photos(root)
        if csv_pos is not None:
            listed = sorted(p for p in csv_pos if root is None or is_under(p, root))
            report.not_in_csv = len(set(files) - set(listed))
            for p in listed:
                if not p.exists():
                    report.failed.append((str(p), f"{p}: listed in {positions} but the file does not exist"))
            files = [p for p in listed if p.exists()]
            if len({pos.frame for pos in csv_pos.values()}) > 1:
                raise DataError(
                    f"{positions}: some rows have a UTM zone and some do not; give every row the same kind of position"
                )
        files = [p for p in files if not is_under(p, self.store.folder)]
        if not files and not prune:
            raise DataError(f"{folder if folder is not None else positions}: no .jpg/.jpeg/.png photos found")
        return files, csv_pos, root

    def _plan(self, files, rows: dict[str, FileRow], csv_pos, positions, allow_no_gps, report) -> _Plan:
        plan = _Plan()
        # The frame is fixed by the first photo with a position (an emptied database is free again).
        plan.frame = self.store.meta.get("frame") if self.store.images.count(with_position=True) else ""
        csv_source = f"csv:{Path(positions).name}" if positions is not None else ""

        def check_frame(pos: Position, p: Path) -> None:
            if plan.frame and pos.frame != plan.frame:
                raise DataError(frame_error(self.store.folder, plan.frame, pos.frame, p))
            plan.frame = pos.frame

        def new_position(old: FileRow, pos: Position | None, p: Path) -> bool:
            if pos is None or old.same_position(pos):
                return False
            check_frame(pos, p)
            plan.moved.append((old.id, pos, csv_source))
            report.position_updated.append(str(p))
            return True

        for p in files:
            key = str(p)
            try:
                st = p.stat()
            except OSError as e:
                report.failed.append((key, f"{p}: cannot read file ({e.strerror or e})"))
                continue
            old = rows.get(key)
            pos = csv_pos.get(p) if csv_pos is not None else None
            if old is not None and old.mtime_ns == st.st_mtime_ns and old.size == st.st_size:
                if not new_position(old, pos, p):
                    report.unchanged += 1
                continue
            try:
                sha = sha256_of(p)
            except OSError as e:
                report.failed.append((key, f"{p}: cannot read file ({e.strerror or e})"))
                continue
            if old is not None and old.sha256 == sha:
                plan.touched.append((old.id, st.st_mtime_ns, st.st_size))
                new_position(old, pos, p)
                report.touched.append(key)
                continue
            source = csv_source if csv_pos is not None else "exif"
            if pos is None and csv_pos is None:
                try:
                    gps = read_gps(p)
                except DataError as e:
                    why: str | None = str(e)
                else:
                    why = None
                    if isinstance(gps, GpsReading):
                        pos = Position.from_latlon(gps.lat, gps.lon)
                    elif (bad := not_an_image(p)) is not None:
                        why = bad  # say "unreadable", not "no GPS"
                    elif not allow_no_gps:
                        report.no_position.append(
                            (key, f"{p}: {gps.reason}; skipped (give --positions CSV or --allow-no-gps)")
                        )
                        if old is not None:
                            plan.stale.append(key)
                        continue
                    else:
                        source = f"none ({gps.reason})"
                if why is not None:
                    report.failed.append((key, why))
                    if old is not None:
                        plan.stale.append(key)
                    continue
            if pos is not None:
                check_frame(pos, p)
            plan.todo.append(
                NewPhoto(p, sha, st.st_mtime_ns, st.st_size, pos, source, old.id if old is not None else None)
            )
        return plan

    def _add(self, plan: _Plan, report: IndexReport, batch_size: int, num_workers: int | None, reranker) -> None:
        """Add the planned photos: known content reuses its descriptor, the rest is extracted."""
        store = self.store
        fresh = []
        for item in plan.todo:
            known = store.images.descriptor_of(item.sha)
            if known is None:
                fresh.append(item)
                continue
            item.desc, item.hw = known
            self._commit([item], report)
            report.reused += 1
        if not fresh:
            return
        model = self.model()
        self.say(f"extracting {len(fresh)} photo(s) with {model.name} on {self.features.device}")
        local, view = (None, None)
        if reranker is not None and self.nproc <= 1:  # one backbone pass for both on the model's own head
            local, view = self.features.one_pass(reranker, model, {it.path: it.sha for it in fresh})
        try:
            self._describe(
                fresh, model, report, plan, batch_size, num_workers, reranker if view is not None else None, view
            )
        finally:
            if local is not None:
                local.close()

    def _describe(self, fresh, model, report, plan, batch_size, num_workers, reranker, view) -> None:
        paths = [it.path for it in fresh]
        device = self.features.device
        meta = self.store.meta.all()
        precision = stored_precision(meta)  # the database's, for every photo it holds
        if self.nproc > 1 and self._describe_in_processes(fresh, model, report, batch_size, num_workers, precision):
            return
        with compile_for(model, len(fresh), batch_size, precision, device):  # --compile auto: for the whole run
            for done, descs, failed in describe(
                model, paths, device, batch_size, num_workers, reranker, view, self.progress, precision
            ):
                for i, why in failed:
                    report.failed.append((str(paths[i]), why))
                    if fresh[i].old_id is not None:
                        plan.stale.append(str(paths[i]))
                if done:
                    check_runtime_made(self.store.folder, meta, runtime_of(model))  # a fallback is not stored
                    batch = [fresh[i] for i in done]
                    for it, d, hw in zip(batch, descs, image_sizes([it.path for it in batch])):
                        it.desc, it.hw = d, hw
                    self._commit(batch, report)
                    report.extracted += len(batch)

    def _describe_in_processes(
        self, fresh, model, report, batch_size: int, num_workers: int | None, precision: str = "fp32"
    ) -> bool:
        """``--nproc N``: the global descriptors of the new photos from N ranks (the sharded,
        resumable extraction of ``placerank extract --nproc``), committed in chunks. False when a
        rank failed (e.g. an unreadable photo): the one-process path then finds and reports the
        photos that cannot be read and indexes the others. Local features for a re-ranker are
        extracted afterwards, in this process, by :meth:`_local`."""
        from placerank.descriptors.launch import extract_in_processes

        paths = [it.path for it in fresh]
        try:
            (ds,) = extract_in_processes(
                model, [paths], self.nproc, str(self.features.device), batch_size, num_workers, use_cache=False,
                precision=precision,
            )  # fmt: skip
        except PlaceRankError as e:
            self.say(f"{e}; extracting in one process instead")
            return False
        check_runtime_made(self.store.folder, self.store.meta.all(), ds.runtime)  # the ranks' runtime
        chunk = max(1, batch_size) * CHUNK_BATCHES
        for start in range(0, len(fresh), chunk):
            batch = fresh[start : start + chunk]
            descs = np.asarray(ds.descriptors[start : start + chunk], dtype=np.float32)
            for it, d, hw in zip(batch, descs, image_sizes([it.path for it in batch])):
                it.desc, it.hw = d, hw
            self._commit(batch, report)
            report.extracted += len(batch)
        return True

    def _commit(self, items: list[NewPhoto], report: IndexReport) -> None:
        self.store.add(items)
        for it in items:
            (report.updated if it.old_id is not None else report.added).append(str(it.path))

    def _local(self, reranker, report: IndexReport, num_workers: int | None) -> None:
        need = self.store.images.contents()
        store = self.features.store(reranker, create=True)
        assert store is not None
        try:
            missing = sum(1 for sha in need if sha not in store)
        finally:
            store.close()
        if missing:
            self.say(f"extracting local features ({reranker.name}) for {missing} photo(s)")
        _, failed = self.features.fill(reranker, need, num_workers, progress=self.progress)
        report.failed.extend(failed)
        meta = self.store.meta
        known = json.loads(meta.get("rerankers") or "{}")
        if known.get(reranker.name) != reranker.signature():
            known[reranker.name] = reranker.signature()
            with meta.transaction():
                meta.set("rerankers", json.dumps(known))
