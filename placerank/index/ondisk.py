"""IVF indexes larger than RAM: inverted lists in a memory-mapped file (FAISS OnDiskInvertedLists).

The recipe of FAISS's ``ondisk_ivf`` demo: the trained, empty index is copied once per block of
database rows, each copy gets its block (with global ids) and is written to a block file; the
block files' lists are then merged, memory-mapped, into one ``OnDiskInvertedLists`` file with
``faiss.contrib.ondisk.merge_ondisk``, which replaces the trained index's lists. RAM holds one
block at a time; the search reads only the probed lists from the file (page cache).

The lists file is ``<folder>/index-<token>.ivfdata`` (a fresh name per build, so a running reader
of an older build is never overwritten); ``VPRIndex.save(folder)`` then writes ``index.faiss``
(the header, which names the lists file) and ``index.json``, and deletes older lists files. Loading
uses ``faiss.IO_FLAG_ONDISK_SAME_DIR``: the lists file is looked up next to ``index.faiss``, so the
folder can be moved as a whole. Results equal those of the same index held in RAM.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from placerank.errors import OutputError, PlaceRankError
from placerank.index.spec import nlist_of


def fill_on_disk(index: faiss.Index, descriptors, folder: str | Path, spec: str, block: int, progress: bool) -> str:
    """Add ``descriptors`` to the trained, empty IVF ``index`` with its lists in a new file in
    ``folder``; returns the file's name. ``descriptors`` is read ``block`` rows at a time."""
    from faiss.contrib.ondisk import merge_ondisk

    if nlist_of(index) == 0:
        raise PlaceRankError(f"on-disk inverted lists need an IVF index (e.g. IVF4096,PQ64), not '{spec}'")
    folder = Path(folder)
    name = f"index-{uuid.uuid4().hex[:12]}.ivfdata"
    blocks = folder / f".{name}.blocks.tmp"
    try:
        blocks.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError.from_os_error(e, blocks) from e
    try:
        empty = faiss.serialize_index(index)  # the trained index without rows, copied per block
        n = int(descriptors.shape[0])
        files = []
        bar = tqdm(total=n, desc=f"index on disk ({spec})", unit="img", leave=False, disable=not progress)
        for b, s in enumerate(range(0, n, block)):
            part = faiss.deserialize_index(empty)
            rows = np.ascontiguousarray(descriptors[s : s + block], dtype=np.float32)
            part.add_with_ids(rows, np.arange(s, s + len(rows), dtype=np.int64))
            files.append(str(blocks / f"block{b}.faiss"))
            faiss.write_index(part, files[-1])
            del part, rows
            bar.update(min(block, n - s))
        bar.close()
        merge_ondisk(index, files, str(folder / name))
    except OSError as e:
        raise OutputError.from_os_error(e, folder) from e
    finally:
        shutil.rmtree(blocks, ignore_errors=True)
    return name
