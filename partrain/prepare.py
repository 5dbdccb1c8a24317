"""`partrain prepare`: get CIFAR-10 (download or a local source) into one verified HDF5 file."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from .datasets import cifar10, store
from .errors import PartrainError


def prepare(data_dir="data", source=None, force: bool = False, *, url: str = cifar10.URL,
            md5: str | None = cifar10.MD5, progress: bool = True,
            echo: Callable[[str], None] = print) -> Path:
    """Build `data_dir/cifar10.h5`; returns its path. Raises PartrainError on bad input."""
    try:
        return _prepare(data_dir, source, force, url, md5, progress, echo)
    except OSError as e:  # anything the modules below did not already put into words
        where = f"{e.filename}: " if e.filename else ""
        raise PartrainError(f"{where}{e.strerror or e}") from None
    except MemoryError:  # reading, the statistics or the write: one line, never a traceback
        raise PartrainError("not enough memory to prepare CIFAR-10 (it needs about 400 MB "
                            "free)") from None


def _prepare(data_dir, source, force, url, md5, progress, echo) -> Path:
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    out = data_dir / store.FILENAME
    if out.exists() and not force:
        try:
            d = store.inspect_store(out)
        except PartrainError as e:
            raise PartrainError(f"{out} exists but is not a valid dataset ({e}); "
                                "pass --force to replace it") from None
        echo(f"{out} already exists and is valid ({d.source_name}); pass --force to rebuild it")
        return out
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PartrainError(f"cannot create {data_dir}: {e.strerror or e}") from None
    if source is None:
        source = _downloaded_archive(data_dir, url, md5, progress, echo)
    raw = cifar10.read_source(source)
    t_read = time.perf_counter() - t0
    data = store.write_store(out, raw.train_images, raw.train_labels, raw.test_images,
                             raw.test_labels, raw.class_names, raw.source_name, raw.source_sha256)
    echo(summary(data, raw.layout, out, t_read, time.perf_counter() - t0))
    return out


def _downloaded_archive(data_dir: Path, url: str, md5: str | None, progress: bool, echo) -> Path:
    archive = data_dir / cifar10.ARCHIVE_NAME
    if archive.exists():
        got = cifar10.file_md5(archive) if md5 else None
        if got != md5:
            raise PartrainError(f"{archive} has md5 {got}, expected {md5}; delete it to download "
                                "again, or pass a copy you trust with --source")
        echo(f"using {archive} (md5 ok)")
        return archive
    echo(f"downloading {url}")
    return cifar10.download(url, archive, md5, progress=progress)


def summary(data: store.CifarData, layout: str, out: Path, t_read: float, t_total: float) -> str:
    train = np.bincount(data.train_labels, minlength=10)
    test = np.bincount(data.test_labels, minlength=10)
    width = max(len(n) for n in data.class_names)
    lines = [f"read {data.source_name} ({layout} layout, sha256 {data.source_sha256[:16]}...)",
             f"  {'class':<{width}}  {'train':>6}  {'test':>6}"]
    lines += [f"  {n:<{width}}  {a:>6}  {b:>6}" for n, a, b in zip(data.class_names, train, test)]
    lines += [f"  {'total':<{width}}  {len(data.train_labels):>6}  {len(data.test_labels):>6}",
              "  train mean (R, G, B) " + " ".join(f"{v:.2f}" for v in data.mean)
              + "   std " + " ".join(f"{v:.2f}" for v in data.std),
              f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {t_total:.1f} s "
              f"(reading {t_read:.1f} s)"]
    return "\n".join(lines)
