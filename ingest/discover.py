"""Discovery: from source roots to input items, accounting for every file.

An item is what becomes one manifest record: an image file (with its data
companions, e.g. ``.img`` beside ``.hdr``), a DICOM series (grouped later by
SeriesInstanceUID across the candidate files), or a label map attached to its
image. Anything else found is a :class:`Problem` with a reason, so the
manifest can say what happened to every file under the roots.

Source names are paths relative to each root's parent, so ``ingest
/data/hospA`` records ``hospA/...`` and several roots stay distinguishable;
each part is in the recorded form of :mod:`ingest.source_names`.

Containment: a root's items may only open files that resolve inside it
(:class:`medssl_scale.io.containment.SourceRoot`). Symlinks leaving the root,
to files or folders, are reported and not followed unless
``follow_symlinks``; FIFOs, devices and system pseudo-files are refused
from their ``stat``, before anything opens them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import stat
from pathlib import Path
from typing import Literal

from ingest.source_names import record_name
from medssl_scale.io import dicom, files
from medssl_scale.io.bounded import read_bounded
from medssl_scale.io.containment import SourceRoot, is_system_path, special_file_reason

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
    root: SourceRoot | None = None  # where every file its readers open must resolve
    roots: list[SourceRoot] | None = None  # per path instead, for a DICOM series found under several sources


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
    dicom_roots: dict[str, SourceRoot] = dataclasses.field(default_factory=dict)  # abs path -> its source root


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
        name = record_name(r.resolve().name if r.name in ("", ".", "..") else r.name)
        if name in names.values():
            raise SourceError(f"two sources are named {name!r}; their records would collide: give them distinct folder names")
        names[r] = name
    return names


def discover(roots: list[Path], overrides: list[tuple[str, str]] | None = None, skip: Path | None = None,
             follow_symlinks: bool = False) -> Found:
    """Walk ``roots`` (files or folders, recursively, following symlinks safely).

    ``skip``: a folder not to descend into (the output dataset, if it lies under a root).
    ``follow_symlinks``: also follow links that leave the roots (never to special files).
    """
    overrides = overrides or []
    found = Found()
    images: dict[str, tuple[str, str]] = {}  # abs path -> (source name, format)
    labels: dict[str, tuple[str, str]] = {}
    companions_seen: dict[str, str] = {}  # abs path -> source name
    root_of: dict[str, SourceRoot] = {}  # abs path -> the root it was found under

    def visit_file(path: str, name: str, area: SourceRoot) -> None:
        root_of[path] = area
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
        elif files.is_companion_suffix(path) or files.is_sidecar_suffix(path):
            companions_seen[path] = name  # claimed by its header below, or reported
        elif dicom.looks_like_dicom(path):
            found.dicom_files.append((path, name))
            found.dicom_roots[path] = root_of[path]
        elif base.lower() in ("dataset.json", "labels.json"):
            found.problems.append(Problem(name, "skipped", "dataset description (read for label class names)"))
        else:
            found.problems.append(Problem(name, "skipped", "not a medical image (unrecognised file type)"))

    for root, rname in root_names(roots).items():
        area = SourceRoot.of(root, follow_symlinks)
        _walk(root, rname, lambda p, n, a=area: visit_file(p, n, a), found.problems, skip, area)

    claimed: set[str] = set()
    for path, (name, _fmt) in sorted(images.items()):
        comp = _companions(path)
        claimed.update(comp)
        area = root_of[path]
        refused = _refused_companion(comp, area)
        if refused:  # e.g. scan.img -> /etc/shadow: the item fails, nothing of it is opened
            found.problems.append(Problem(name, "failed", refused))
            continue
        names = [name] + [companions_seen.get(c) or _sibling_name(name, c) for c in comp]
        item = Item("file", name, [path, *comp], names, modality_for(name, overrides), root=area)
        label = _find_label(path, labels)
        if label is not None:
            label_name = labels.pop(label)[0]
            label_comp = _companions(label)
            claimed.update(label_comp)
            refused = _refused_companion(label_comp, root_of[label])
            if refused:
                found.problems.append(Problem(label_name, "failed", refused, kind="label"))
            else:
                item.label_path = label
                item.label_source = label_name
                item.classes = _class_names(Path(label).parent, root_of[label])
        found.items.append(item)
    for path, (name, _fmt) in sorted(labels.items()):
        found.problems.append(Problem(name, "skipped", "label map without a matching image", kind="label"))
    for path, name in sorted(companions_seen.items()):
        if path in claimed:
            continue
        if files.is_sidecar_suffix(path):  # e.g. a MATLAB .mat with no Analyze header beside it
            found.problems.append(Problem(name, "skipped", "not a medical image (unrecognised file type)"))
        else:
            found.problems.append(Problem(name, "skipped", "data file without its header file"))
    return found


def _companions(path: str) -> list[str]:
    """Data files named by a header; none if the header is too broken to say (its read fails later, with a reason)."""
    try:
        return [str(c) for c in files.companions(path)]
    except Exception:
        return []


def _refused_companion(comp: list[str], area: SourceRoot) -> str | None:
    for c in comp:
        reason = area.refusal(c, "its data file")
        if reason:
            return reason
    return None


def _sibling_name(name: str, path: str) -> str:
    base = record_name(os.path.basename(path))
    return f"{name.rsplit('/', 1)[0]}/{base}" if "/" in name else base


def _entry_refusal(path: str, st: os.stat_result) -> str | None:
    """Why a file found by the walk (or given as a source) is not even classified."""
    reason = special_file_reason(st)
    if reason:
        return reason
    real = os.path.realpath(path)
    if is_system_path(real):
        return f"resolves into /{real.split('/')[1]}: a system pseudo-file, refusing to open it"
    return None


def _walk(root: Path, rname: str, visit, problems: list[Problem], skip: Path | None, area: SourceRoot) -> None:
    """Depth-first walk that reports loops, dangling links, links leaving the root,
    special files and unreadable folders."""
    skip_id = _dir_id(skip) if skip is not None and skip.exists() else None
    if not root.is_dir():
        try:
            st = os.stat(root)
        except FileNotFoundError:
            problems.append(Problem(rname, "failed", "broken symlink (its target does not exist)"))
            return
        except OSError as e:
            problems.append(Problem(rname, "failed", f"unreadable: {e.strerror}"))
            return
        reason = _entry_refusal(str(root), st)  # named on the command line: a link is the user's choice
        if reason:
            problems.append(Problem(rname, "failed", reason))
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
            child = f"{name}/{record_name(e.name)}"
            try:
                st = os.stat(e.path)  # follows links; never opens, so a FIFO cannot block
            except FileNotFoundError:
                problems.append(Problem(child, "failed", "broken symlink (its target does not exist)"))
                continue
            except OSError as err:  # e.g. ELOOP on a self-referencing link
                problems.append(Problem(child, "failed", f"unreadable: {err.strerror}"))
                continue
            reason = None if stat.S_ISDIR(st.st_mode) else _entry_refusal(e.path, st)
            if reason:
                problems.append(Problem(child, "skipped", reason))
            elif e.is_symlink() and not area.follow_symlinks and not area.contains(os.path.realpath(e.path)):
                problems.append(Problem(child, "skipped", "symlink leading outside the source folder: not followed "
                                        "(--follow-symlinks follows it)"))
            elif stat.S_ISDIR(st.st_mode):
                walk(e.path, child, ancestors | {did})
            else:
                visit(os.path.abspath(e.path), child)

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


MAX_DESCRIPTION_BYTES = 1 << 20


def _class_names(label_dir: Path, area: SourceRoot) -> dict[str, str] | None:
    """Class names from a labels.json in the label folder or an MSD/nnU-Net dataset.json beside it
    (only one inside the source folder: its names go into the dataset)."""
    for cand in (label_dir / "labels.json", label_dir.parent / "dataset.json", label_dir / "dataset.json"):
        if not os.path.lexists(cand) or area.refusal(cand) is not None:
            continue
        try:  # one that is too large or not JSON names no classes (the labels keep their numbers)
            data = json.loads(read_bounded(cand, MAX_DESCRIPTION_BYTES, "a label description"))
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
