"""The service behind the HTTP API: one read-only database, one model, one inference worker.

**Concurrency: a bounded queue in front of one worker thread.** Every request that touches the
model or the SQLite connection (localize, index, remove, place list refresh) is a job for a single
worker thread that owns the database; at most ``max_queue`` jobs wait, and the next request gets
503 at once (with ``Retry-After``). Why not micro-batching: on CPU one photo already uses every
core through torch's intra-op threads, so batching concurrent queries buys little throughput while
it multiplies peak activation memory; one worker keeps memory at one forward pass whatever the
number of clients, and the queue bound keeps waiting uploads bounded too. The SQLite connection
and the FAISS index are used from that thread only, so nothing else needs a lock.

The database is opened **read-only** (SQLite ``mode=ro``); ``POST /v1/index`` and
``DELETE /v1/places/{id}`` open a writer for the duration of the change, under the same
``write.lock`` as ``placerank index``, sharing the loaded model.

**Precision and compile**: queries are described in the database's precision (``precision``:
``auto`` = the database's own; another explicit one is refused at start). ``compile``: ``auto``
(default) keeps single queries eager (a compile costs ~35 s and repays itself only over a
thousand photos, docs/inference.md); ``on`` compiles the batch-of-one graph at start
(:func:`warm_up`), so no request waits for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from placerank.descriptors.fast import compile_mode, runtime_of
from placerank.errors import PlaceRankError
from placerank.localize.database import Database, DatabaseBusyError
from placerank.serve.uploads import CheckedImage
from placerank.serve.worker import NotFound, Pictures, ServiceBusy, Thumbnails, Worker


@dataclass
class ServeConfig:
    db: Path
    host: str = "127.0.0.1"
    port: int = 8000
    rerank: str | None = None
    token_file: Path | None = None
    max_upload_mb: float = 20.0
    tiles: str | None = None
    top_k: int = 10
    max_queue: int = 64
    upload_dir: Path | None = None  # photos added through POST /v1/index (default: DB-uploads beside DB)
    write_wait: float = 10.0  # seconds a write waits for another writer's lock before 409
    device: str = "auto"
    precision: str = "auto"  # auto: the database's own; another explicit one is refused
    compile: str = "auto"  # auto: one query at a time stays eager; on: compiled (and warmed up) at start
    runtime: str | None = None  # what runs the model (None: $PLACERANK_RUNTIME or auto; --runtime, docs/inference.md)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class Place:
    id: int
    path: str
    name: str  # relative to the common folder of the database's photos
    lat: float | None
    lon: float | None
    easting: float | None
    northing: float | None


def rss_mb() -> float | None:
    """This process's resident memory (Linux /proc), MB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


class LocalizeService:
    """Loads the database, model, index and re-ranker once; runs every database job on one worker."""

    def __init__(self, config: ServeConfig, log=print):
        self.config = config
        self.log = log
        self.token = read_token(config.token_file) if config.token_file else None
        self.upload_dir = Path(
            config.upload_dir or Path(config.db).resolve().parent / f"{Path(config.db).name}-uploads"
        )
        self.worker = Worker(config.max_queue)
        self.places: dict[int, Place] = {}
        self.pictures = Pictures()
        self.thumbnails = Thumbnails(lambda i: self.places[i].path if i in self.places else None)
        self.generation = -1
        self.info: dict = {}
        try:
            self.db: Database = self.worker.submit(self._open).result()
        except BaseException:
            self.worker.shutdown()
            raise

    # -- the worker's side (runs on the one worker thread) -----------------------------------------
    def _open(self) -> Database:
        c = self.config
        db = Database.open(
            c.db, device=c.device, read_only=True, precision=c.precision, compile=c.compile, runtime=c.runtime
        )
        try:
            _ = db.model  # load once, now
            warm_up(db, self.log)
            db.store.index()
            if self.config.rerank:
                db.features.reranker(self.config.rerank, None)
            self.db = db
            self._refresh()
        except BaseException:
            db.close()
            raise
        return db

    def _refresh(self) -> None:
        """Re-read the place list when the database changed (another writer, or ours)."""
        db = self.db
        gen = db.store.meta.generation
        if gen == self.generation:
            return
        index = db.store.index()
        rows = db.store.images.rows([int(i) for i in db.store.images.ids()])
        paths = [r.path for r in rows.values()]
        root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
        self.places = {
            r.id: Place(
                r.id, r.path, os.path.relpath(r.path, root) if root else r.path, r.lat, r.lon, r.easting, r.northing
            )
            for r in rows.values()
        }
        info = db.info()
        self.info = {
            "database": Path(info["path"]).name,
            "database_size": info["images"],
            "with_position": info["with_position"],
            "frame": info["frame"],
            "radius_m": info["radius_m"],
            "model": info["model"],
            "weights_id": info["weights_id"],
            "image_size": info["image_size"],
            "precision": info["precision"],
            "compile": compile_mode(db.model),
            "rerank": self.config.rerank,
            "index": {"type": "faiss IndexIDMap2(IndexFlatIP)", "count": len(index), "generation": gen},
        }
        self.thumbnails.clear()
        self.generation = gen

    def _localize(self, image: CheckedImage, name: str, top_k: int, rerank: str | None, queued: float) -> dict:
        started = time.perf_counter()
        self._refresh()
        with tempfile.TemporaryDirectory(prefix="placerank-serve-") as tmp:
            path = Path(tmp) / f"query{image.suffix}"
            path.write_bytes(image.data)
            try:
                result = self.db.localize(path, top_k=top_k, rerank=rerank)
            except PlaceRankError as e:
                raise PlaceRankError(self._public(str(e), {str(path): name})) from None
            picture = self._match_picture(result, path, name)
        out = result.to_json()
        if picture is not None:
            out["match_picture"] = f"/v1/pictures/{self.pictures.put(picture)}.jpg"
        out["query"] = name
        out["database"] = self.info["database"]
        for m in out["matches"]:
            place = self.places.get(m["id"])
            m["path"] = place.name if place else Path(m["path"]).name
        out["notes"] = [self._public(n, {str(path): name}) for n in out["notes"]]
        out["timing_s"]["queue"] = round(started - queued, 4)
        return out

    def _match_picture(self, result, query: Path, name: str) -> bytes | None:
        """With a re-ranker that exposes its matches: the verified matches to the best candidate
        (JPEG bytes), as ``placerank localize`` draws them in ``<photo>_inliers.png``."""
        from placerank.errors import DataError
        from placerank.localize.outputs import draw_best_match

        out = query.with_name("inliers.jpg")
        best = self.places.get(result.matches[0].id or -1) if result.matches else None
        try:
            if not draw_best_match(result, out, name, best.name if best else None):
                return None
        except DataError as e:  # the database photo was moved since indexing
            result.notes.append(f"match picture not drawn: {e}")
            return None
        return out.read_bytes()

    def _public(self, message: str, extra: dict[str, str]) -> str:
        """A message with server paths replaced by public names."""
        for old, new in extra.items():
            message = message.replace(old, new)
        return message.replace(str(self.db.folder), self.info.get("database", "database"))

    def _writer(self) -> Database:
        model = self.db.model  # shared: the same precision, and its compile mode as it is now
        return Database.open(
            self.config.db,
            model=model,
            device=self.config.device,
            compile=compile_mode(model),
            runtime=runtime_of(model),
        )

    def _add(self, files: list[tuple[str, CheckedImage]]) -> dict:
        batch = self.upload_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        batch.mkdir(parents=True)
        taken: set[str] = set()
        for name, image in files:
            stem = Path(name).stem
            while stem in taken:
                stem += "_"
            taken.add(stem)
            (batch / f"{stem}{image.suffix}").write_bytes(image.data)
        try:
            with self._writer() as writer:
                report = writer.add_folder(
                    batch, rerank=self.config.rerank, wait=self.config.write_wait, progress=False
                )
        except BaseException:
            shutil.rmtree(batch, ignore_errors=True)
            raise
        self._refresh()
        ids = {p.path: p.id for p in self.places.values()}
        public = {str(batch) + "/": ""}
        return {
            "added": [{"id": ids.get(p), "name": Path(p).name} for p in report.added + report.updated],
            "unchanged": report.unchanged + len(report.touched),
            "skipped": [{"name": Path(p).name, "reason": self._public(r, public)} for p, r in report.no_position],
            "failed": [{"name": Path(p).name, "reason": self._public(r, public)} for p, r in report.failed],
            "database_size": report.total,
        }

    def _remove(self, place_id: int) -> dict:
        self._refresh()
        place = self.places.get(place_id)
        if place is None:
            raise NotFound(f"no place with id {place_id}")
        with self._writer() as writer:
            writer.remove([place.path], wait=self.config.write_wait)
        self._refresh()
        return {"removed": place_id, "database_size": self.info["database_size"]}

    # -- the server's side -------------------------------------------------------------------------
    async def localize(self, image: CheckedImage, name: str, top_k: int, rerank: str | None) -> dict:
        return await self.worker.run(self._localize, image, name, top_k, rerank, time.perf_counter())

    async def add(self, files: list[tuple[str, CheckedImage]]) -> dict:
        return await self.worker.run(self._add, files)

    async def remove(self, place_id: int) -> dict:
        return await self.worker.run(self._remove, place_id)

    async def refresh(self) -> None:
        await self.worker.run(self._refresh)

    def close(self) -> None:
        self.worker.shutdown(last=self.db.close)


def warm_up(db: Database, log=print) -> None:
    """With ``compile on``: run one blank photo at the model's input size through the query
    path, so the compile (~35 s cold, seconds with inductor's cache warm) happens before the
    first request, not during it."""
    if compile_mode(db.model) != "on":
        return
    from PIL import Image

    from placerank.descriptors.extract import extract_features

    model = db.model
    height, width = model.preprocess.size
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="placerank-warm-") as tmp:
        path = Path(tmp) / "blank.jpg"
        Image.new("RGB", (int(width), int(height)), (128, 128, 128)).save(path)
        extract_features(
            model, [path], db.device, 1, 0, use_cache=False, desc="warm-up", progress=False, precision=db.precision
        )
    log(f"placerank serve: compiled {model.name} for one query at a time ({time.perf_counter() - started:.0f} s)")


def read_token(path: Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise PlaceRankError(f"{path}: cannot read the token file ({e.strerror})") from None
    if len(token) < 16:
        raise PlaceRankError(f"{path}: the token must be at least 16 characters")
    return token


__all__ = ["DatabaseBusyError", "LocalizeService", "NotFound", "ServeConfig", "ServiceBusy", "rss_mb"]
