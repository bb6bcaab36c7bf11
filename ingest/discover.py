"""Discovery: from source roots to input items, accounting for every file.

An item is what becomes one manifest record: an image file (with its data
companions, e.g. ``.img`` beside ``.hdr``), a DICOM series (grouped later by
SeriesInstanceUID across the candidate files), or a label map attached to its
image. Anything else found is a :class:`Problem` with a reason, so the
manifest can say what happened to every file under the roots.

Source names are paths relative to each root's parent, so ``ingest
/data/hospA`` records ``hospA/...`` and several roots stay distinguishable.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Literal

from medssl_scale.io import dicom, files

LABEL_DIR = re.compile(r"^(labels?|segmentations?|masks?)(.*)$", re.IGNORECASE)
MODALITY_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net's per-channel suffix: case_0000.nii.gz <-> labels/case.nii.gz


@dataclasses.dataclass
class Item:
    kind: Literal["file", "dicom"]
    source: str
    paths: list[str]  # absolute; the main file first
    names: list[str]  # source names of all files in ``paths``
    modality: str | None = None  # a user's override
    label_path: str | None = None
    label_source: str | None = None
    classes: dict[str, str] | None = None  # label value -> class name, where a dataset.json says


@dataclasses.dataclass
class Problem:
    source: str
    status: Literal["skipped", "failed"]
    reason: str
    kind: Literal["image", "label"] = "image"


@dataclasses.dataclass
class Found:
    items: list[Item] = dataclasses.field(default_factory=list)
    problems: list[Problem] = dataclasses.field(default_factory=list)
    dicom_files: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (abs path, source name)


class SourceError(ValueError):
    pass


def parse_overrides(specs: list[str]) -> list[tuple[str, str]]:
    """``--modality [PATTERN=]CT|MR``: PATTERN is a source prefix or glob; bare value means all."""
    out = []
    for spec in specs:
        pattern, _, value = spec.rpartition("=")
        value = value.strip().upper()
        if value not in ("CT", "MR"):
            raise SourceError(f"--modality {spec!r}: the modality must be CT or MR")
        out.append((pattern or "*", value))
    return out


def modality_for(source: str, overrides: list[tuple[str, str]]) -> str | None:
    chosen = None
    for pattern, value in overrides:  # the last matching rule wins, as on a command line
        p = pattern.rstrip("/")
        if fnmatch.fnmatchcase(source, pattern) or source == p or source.startswith(p + "/"):
            chosen = value
    return chosen


def root_names(roots: list[Path]) -> dict[Path, str]:
    names: dict[Path, str] = {}
    for r in roots:
        if not r.exists() and not r.is_symlink():
            raise SourceError(f"source {r} does not exist")
        name = r.resolve().name if r.name in ("", ".", "..") else r.name
        if name in names.values():
            raise SourceError(f"two sources are named {name!r}; their records would collide: give them distinct folder names")
        names[r] = name
    return names


def discover(roots: list[Path], overrides: list[tuple[str, str]] | None = None, skip: Path | None = None) -> Found:
    """Walk ``roots`` (files or folders, recursively, following symlinks safely).

    ``skip``: a folder not to descend into (the output dataset, if it lies under a root).
    """
    overrides = overrides or []
    found = Found()
    images: dict[str, tuple[str, str]] = {}  # abs path -> (source name, format)
    labels: dict[str, tuple[str, str]] = {}
    companions_seen: dict[str, str] = {}  # abs path -> source name

    def visit_file(path: str, name: str) -> None:
        try:
            classify(path, name)
        except Exception as e:  # e.g. a header naming a data file whose name is too long: report, go on
            found.problems.append(Problem(name, "failed", f"unreadable: {type(e).__name__}"))

    def classify(path: str, name: str) -> None:
        base = os.path.basename(path)
        if base.startswith("."):
            found.problems.append(Problem(name, "skipped", "hidden file"))
            return
        fmt = files.image_format(path)
        if fmt is not None:
            in_label_dir = LABEL_DIR.match(os.path.basename(os.path.dirname(path))) is not None
            (labels if in_label_dir else images)[path] = (name, fmt)
        elif files.is_companion_suffix(path):
            companions_seen[path] = name
        elif dicom.looks_like_dicom(path):
            found.dicom_files.append((path, name))
        elif base.lower() in ("dataset.json", "labels.json"):
            found.problems.append(Problem(name, "skipped", "dataset description (read for label class names)"))
        else:
            found.problems.append(Problem(name, "skipped", "not a medical image (unrecognised file type)"))

    for root, rname in root_names(roots).items():
        _walk(root, rname, visit_file, found.problems, skip)

    claimed: set[str] = set()
    for path, (name, _fmt) in sorted(images.items()):
        comp = _companions(path)
        claimed.update(comp)
        names = [name] + [companions_seen.get(c) or _sibling_name(name, c) for c in comp]
        item = Item("file", name, [path, *comp], names, modality_for(name, overrides))
        label = _find_label(path, labels)
        if label is not None:
            item.label_path = label
            item.label_source = labels.pop(label)[0]
            item.classes = _class_names(Path(label).parent)
            claimed.update(_companions(label))
        found.items.append(item)
    for path, (name, _fmt) in sorted(labels.items()):
        found.problems.append(Problem(name, "skipped", "label map without a matching image", kind="label"))
    for path, name in sorted(companions_seen.items()):
        if path not in claimed:
            found.problems.append(Problem(name, "skipped", "data file without its header file"))
    return found


def _companions(path: str) -> list[str]:
    """Data files named by a header; none if the header is too broken to say (its read fails later, with a reason)."""
    try:
        return [str(c) for c in files.companions(path)]
    except Exception:
        return []


def _sibling_name(name: str, path: str) -> str:
    return f"{name.rsplit('/', 1)[0]}/{os.path.basename(path)}" if "/" in name else os.path.basename(path)


def _walk(root: Path, rname: str, visit, problems: list[Problem], skip: Path | None) -> None:
    """Depth-first walk that reports loops, dangling links and unreadable folders."""
    skip_id = _dir_id(skip) if skip is not None and skip.exists() else None
    if not root.is_dir():
        if root.is_symlink() and not root.exists():
            problems.append(Problem(rname, "failed", "broken symlink (its target does not exist)"))
        else:
            visit(str(root.absolute()), rname)
        return
    seen: set[tuple[int, int]] = set()

    def walk(d: str, name: str, ancestors: frozenset[tuple[int, int]]) -> None:
        did = _dir_id(Path(d))
        if did == skip_id:
            return
        if did in ancestors:
            problems.append(Problem(name, "failed", "symlink loop: the link points back to a folder that contains it"))
            return
        if did in seen:
            problems.append(Problem(name, "skipped", "folder already scanned through another path (symlink)"))
            return
        seen.add(did)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            problems.append(Problem(name, "failed", f"cannot read folder: {e.strerror}"))
            return
        for e in entries:
            child = f"{name}/{e.name}"
            try:
                is_dir = e.is_dir(follow_symlinks=True)
                exists = is_dir or e.is_file(follow_symlinks=True)
            except OSError as err:  # e.g. ELOOP on a self-referencing link
                problems.append(Problem(child, "failed", f"unreadable: {err.strerror}"))
                continue
            if is_dir:
                walk(e.path, child, ancestors | {did})
            elif not exists and e.is_symlink():
                problems.append(Problem(child, "failed", "broken symlink (its target does not exist)"))
            elif exists:
                visit(os.path.abspath(e.path), child)
            else:
                problems.append(Problem(child, "skipped", "not a regular file (device, socket or pipe)"))

    walk(str(root.absolute()), rname, frozenset())


def _dir_id(p: Path) -> tuple[int, int]:
    st = p.stat()
    return (st.st_dev, st.st_ino)


def _find_label(image: str, labels: dict[str, tuple[str, str]]) -> str | None:
    """A same-named file in a labels folder beside the image (or beside its images folder)."""
    d, base = os.path.split(image)
    stem, ext = _split_ext(base)
    names = [base]
    if MODALITY_SUFFIX.search(stem):
        names.append(MODALITY_SUFFIX.sub("", stem) + ext)
    parent, dname = os.path.split(d)
    dirs = [os.path.join(d, "labels"), os.path.join(parent, "labels")]
    if dname.lower().startswith("images"):
        dirs.insert(0, os.path.join(parent, "labels" + dname[len("images"):]))
    for ld in dirs:
        for n in names:
            cand = os.path.join(ld, n)
            if cand in labels:
                return cand
    return None


def _split_ext(name: str) -> tuple[str, str]:
    lower = name.lower()
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".mgz", ".mgh"):
        if lower.endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    stem, ext = os.path.splitext(name)
    return stem, ext


def _class_names(label_dir: Path) -> dict[str, str] | None:
    """Class names from a labels.json in the label folder or an MSD/nnU-Net dataset.json beside it."""
    for cand in (label_dir / "labels.json", label_dir.parent / "dataset.json", label_dir / "dataset.json"):
        if not cand.is_file():
            continue
        try:
            data = json.loads(cand.read_text())
        except (OSError, ValueError):
            continue
        mapping = data.get("labels", data) if isinstance(data, dict) else None
        if not isinstance(mapping, dict):
            continue
        out: dict[str, str] = {}
        for k, v in mapping.items():
            if str(k).isdigit():  # MSD: {"1": "spleen"}
                out[str(int(k))] = str(v)
            elif isinstance(v, int) or (isinstance(v, str) and v.isdigit()):  # nnU-Net v2: {"spleen": 1}
                out[str(int(v))] = str(k)
        out.pop("0", None)
        if out:
            return out
    return None
