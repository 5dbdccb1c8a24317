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
            echo: Callable[[str], None] = print, labels: str = "fine") -> Path:
    """Build `data_dir/cifar10.h5` from CIFAR-10 (downloaded, or the archive or folder `source`)
    or CIFAR-100 (`source`; `labels` fine or coarse); returns its path. Raises PartrainError on
    bad input."""
    try:
        return _prepare(data_dir, source, force, url, md5, progress, echo, labels)
    except OSError as e:  # anything the modules below did not already put into words
        where = f"{e.filename}: " if e.filename else ""
        raise PartrainError(f"{where}{e.strerror or e}") from None
    except MemoryError:  # reading, the statistics or the write: one line, never a traceback
        raise PartrainError("not enough memory to prepare CIFAR-10 (it needs about 400 MB "
                            "free)") from None


def _prepare(data_dir, source, force, url, md5, progress, echo, labels) -> Path:
    t0 = time.perf_counter()
    out = output_path(data_dir, force, echo)
    if out is None:
        return Path(data_dir) / store.FILENAME
    if source is None:
        source = _downloaded_archive(Path(data_dir), url, md5, progress, echo)
    raw = cifar10.read_source(source, labels)
    t_read = time.perf_counter() - t0
    data = store.write_store(out, raw.train_images, raw.train_labels, raw.test_images,
                             raw.test_labels, raw.class_names, raw.source_name, raw.source_sha256)
    echo(summary(data, raw.layout, out, t_read, time.perf_counter() - t0))
    return out


def output_path(data_dir, force: bool, echo) -> Path | None:
    """DATA_DIR/cifar10.h5 to write (the folder made), or None when a valid store is there
    and not `force`d (said with `echo`); a damaged one there is an error unless forced."""
    data_dir = Path(data_dir)
    out = data_dir / store.FILENAME
    if out.exists() and not force:
        try:
            d = store.inspect_store(out)
        except PartrainError as e:
            raise PartrainError(f"{out} exists but is not a valid dataset ({e}); "
                                "pass --force to replace it") from None
        echo(f"{out} already exists and is valid ({d.source_name}); pass --force to rebuild it")
        return None
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PartrainError(f"cannot create {data_dir}: {e.strerror or e}") from None
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
    layout = layout if "layout" in layout else f"{layout} layout"
    lines = [f"read {data.source_name} ({layout}, sha256 {data.source_sha256[:16]}...)"]
    lines += class_table(data.class_names, data.train_labels, data.test_labels)
    lines.append(statistics_line(data))
    lines.append(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {t_total:.1f} s "
                 f"(reading {t_read:.1f} s)")
    return "\n".join(lines)


def statistics_line(data: store.CifarData) -> str:
    _, h, w = data.image_shape
    return (f"  {h}x{w} RGB; train mean (R, G, B) " + " ".join(f"{v:.2f}" for v in data.mean)
            + "   std " + " ".join(f"{v:.2f}" for v in data.std))


def class_table(class_names, train_labels, test_labels, limit: int = 20) -> list[str]:
    """Images per class and split: up to `limit` classes a row each; more: the classes with the
    fewest and the most training images."""
    k = len(class_names)
    train = np.bincount(np.asarray(train_labels, np.int64), minlength=k)
    test = np.bincount(np.asarray(test_labels, np.int64), minlength=k)
    width = min(max(len(n) for n in class_names), 24)
    lines = [f"  {'class':<{width}}  {'train':>6}  {'test':>6}"]
    if k <= limit:
        lines += [f"  {n:<{width}}  {a:>6}  {b:>6}" for n, a, b in zip(class_names, train, test)]
    else:
        for what, i in (("fewest", int(np.argmin(train))), ("most", int(np.argmax(train)))):
            lines.append(f"  {class_names[i]:<{width}}  {train[i]:>6}  {test[i]:>6}   "
                         f"(the class with the {what} training images)")
    lines.append(f"  {'total':<{width}}  {len(train_labels):>6}  {len(test_labels):>6}   "
                 f"({k} classes)")
    return lines
