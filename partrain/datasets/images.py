"""The user's own images: decoding one file, and listing a folder of class subfolders or a CSV of
`path,label` rows (what `partrain prepare --images` and `--csv` read; the store is written by
prepare_images.py).

Each image is centre-cropped to a square (the largest one, in the middle) and resized to
size x size with Lanczos filtering, as RGB; transparent pixels are put on white. It is never
padded: padding would teach the network black bars that test photos do not have. Pillow is an
optional extra (`pip install 'partrain[images]'`), needed only here.
"""
from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PartrainError
from .store import excerpt

# What Pillow reads, by suffix (case ignored); other files in a class folder are listed as
# skipped, never guessed at.
IMAGE_SUFFIXES = frozenset(".png .jpg .jpeg .jpe .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm "
                           ".tga .ico".split())
# A classifier of small images needs nothing near Pillow's own limit (89 Mpixel, then a warning,
# up to 179 Mpixel: 530 MB for one PNG). JPEGs are decoded at 1/2 to 1/8 scale first (draft), so
# this bounds what is decoded, not what a camera makes.
MAX_PIXELS = 1 << 24  # 4096 x 4096


def pillow(hint: str = ""):
    """PIL.Image and PIL.ImageOps, or one line saying how to get them."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise PartrainError("reading image files needs Pillow: pip install 'partrain[images]'"
                            + hint) from None
    return Image, ImageOps


def read_image(path: str | Path, size: int = 32, hint: str = "",
               content: bytes | None = None) -> np.ndarray:
    """An image file as a (3, size, size) uint8 RGB array (see the module doc). content: the
    file's bytes, if already read. Any unreadable, damaged or oversized image is a PartrainError
    naming `path`; images of more than MAX_PIXELS are refused from their header."""
    path = Path(path)
    Image, ImageOps = pillow(hint)
    if content is None and not path.is_file():
        raise PartrainError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(content) if content is not None else path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PartrainError(f"{path} is too large to be read safely (over "
                            f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpixel; partrain reads up to "
                            f"{MAX_PIXELS // 2**20} Mpixel)") from None
    except Exception as e:  # UnidentifiedImageError, and whatever a damaged header raises
        if type(e).__name__ == "UnidentifiedImageError":
            raise PartrainError(f"{path} is not an image (Pillow cannot read it)") from None
        raise PartrainError(f"{path} is a damaged image: {excerpt(str(e) or type(e).__name__)}"
                            ) from None
    try:
        with img:
            img.draft("RGB", (4 * size, 4 * size))  # JPEG only: decode at a reduced scale
            if img.width * img.height > MAX_PIXELS:
                raise PartrainError(f"{path} is {img.width} x {img.height} pixels, more than "
                                    f"partrain reads ({MAX_PIXELS // 2**20} Mpixel; the model sees "
                                    f"{size} x {size}): shrink it first")
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            img = ImageOps.fit(img.convert("RGB"), (size, size), method=Image.Resampling.LANCZOS)
            array = np.asarray(img, dtype=np.uint8)
    except PartrainError:
        raise
    except Image.DecompressionBombError:  # a frame larger than the header said
        raise PartrainError(f"{path} is too large to be read safely") from None
    except Exception as e:  # truncated or corrupt image data (OSError, ValueError, ...)
        raise PartrainError(f"{path} is a damaged image: {excerpt(str(e) or type(e).__name__)}"
                            ) from None
    return np.ascontiguousarray(array.transpose(2, 0, 1))


@dataclass
class Listing:
    """What a folder or CSV names: images with their class, before any is decoded."""

    class_names: list[str]
    items: list[tuple[Path, int]]              # (file, label), in the order they are stored
    notes: list[str] = field(default_factory=list)  # what the user should know (empty classes...)


def list_folder(root: str | Path, class_names: list[str] | None = None) -> Listing:
    """The images of folder `root`: one subfolder per class (its name the class name, classes in
    sorted order), images anywhere below it, in sorted path order. Hidden files and folders are
    ignored; files that are not images by their suffix are counted in a note; a class folder
    without images is left out with a note. class_names: the classes a test folder must use (the
    train folder's): a subfolder of another name is an error, a missing one only a note."""
    root = Path(root)
    if not root.is_dir():
        raise PartrainError(f"{root} is not a folder" if root.exists() else f"{root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    notes = ([f"{root}: {len(loose)} file(s) beside the class folders were ignored (images go in "
              "one subfolder per class)"] if loose else [])
    found: dict[str, list[Path]] = {}
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if len(files) > len(images):
            notes.append(f"{folder}: {len(files) - len(images)} file(s) that are not images by "
                         "their suffix were skipped")
        if images:
            found[folder.name] = images
        else:
            notes.append(f"{folder}: empty class (no images): left out")
    names = _class_names(found, class_names, root)
    index = {n: i for i, n in enumerate(names)}
    items = [(p, index[n]) for n in sorted(found, key=index.get) for p in found[n]]
    return Listing(names, items, notes)


def list_csv(path: str | Path, class_names: list[str] | None = None) -> Listing:
    """The images a CSV (or, by a .tsv suffix or tabs, TSV) file names: rows `path,label`, paths
    relative to the file's folder (or absolute), labels class names; a first row `path,label`
    (any two names) that names no existing file is a header and skipped. Classes in sorted order
    (numerically when every label is a whole number). A row that is not two fields, or names no
    file, is an error naming its line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PartrainError(f"{path} is not a text (UTF-8) file") from None
    except OSError as e:
        raise PartrainError(f"cannot read {path}: {e.strerror or e}") from None
    tsv = path.suffix.lower() == ".tsv" or ("\t" in text.split("\n", 1)[0])
    rows = list(csv.reader(io.StringIO(text), delimiter="\t" if tsv else ","))
    base = path.parent
    found: dict[str, list[Path]] = {}
    for line, row in enumerate(rows, 1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise PartrainError(f"{path}, line {line}: expected 2 fields (path, label), got "
                                f"{len(row)}: {excerpt(row)}")
        file, label = (cell.strip() for cell in row)
        image = Path(file) if Path(file).is_absolute() else base / file
        if line == 1 and not image.exists() and not found:
            continue  # a header row
        if not label:
            raise PartrainError(f"{path}, line {line}: empty label")
        found.setdefault(label, []).append(image)
    if not found:
        raise PartrainError(f"{path} names no images")
    names = _class_names(found, class_names, path, numeric=True)
    index = {n: i for i, n in enumerate(names)}
    items = [(p, index[n]) for n in sorted(found, key=index.get) for p in found[n]]
    return Listing(names, items, [])


def _class_names(found: dict, given: list[str] | None, where: Path, numeric=False) -> list[str]:
    if given is not None:
        unknown = sorted(set(found) - set(given))
        if unknown:
            raise PartrainError(f"{where} has classes the training images lack: "
                                f"{excerpt(unknown)} (the classes are {excerpt(given)})")
        return list(given)
    if len(found) < 2:
        raise PartrainError(f"{where} holds images of {len(found)} class(es); a classifier needs "
                            "at least 2 (one subfolder or label per class)")
    if numeric and all(n.lstrip("-").isdigit() for n in found):
        return sorted(found, key=int)
    return sorted(found)


def held_out(listing: Listing, fraction: float, seed: int) -> tuple[Listing, Listing]:
    """(train, test): `fraction` of each class's images, chosen with `seed`, held out for test
    (at least one per class with two or more images; every class keeps at least one for train)."""
    if not 0 < fraction < 1:
        raise PartrainError(f"--test-fraction must lie between 0 and 1, got {fraction}")
    labels = np.array([label for _, label in listing.items], np.int64)
    test = np.zeros(len(labels), bool)
    for k in range(len(listing.class_names)):
        idx = np.flatnonzero(labels == k)
        n = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        chosen = np.random.default_rng([seed, k]).permutation(idx)[:n]
        test[chosen] = True
    pick = lambda keep: [item for item, t in zip(listing.items, test) if t == keep]  # noqa: E731
    return (Listing(listing.class_names, pick(False), listing.notes),
            Listing(listing.class_names, pick(True), []))
