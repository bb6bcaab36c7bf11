"""One item, start to finish, inside a worker: read -> check -> canonicalise ->
de-identify -> write volume, label and shard sample.

Returns manifest records and never raises for a bad input: a reader's
:class:`InputError` becomes a skipped/failed record, and anything unexpected
becomes a failed record naming the exception (the run goes on).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from ingest.deid import Pseudonymizer, scrub
from ingest.discover import Item
from medssl_scale.io import FailedInput, InputError, Limits, RawVolume, dicom, files
from medssl_scale.io.canonical import geometry, resample, resampled_shape, to_canonical
from medssl_scale.io.types import not_enough_memory
from medssl_scale.io.modality import infer_modality
from medssl_scale.store import foreground
from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.manifest import ManifestRecord
from medssl_scale.store.shards import write_sample_fragment
from medssl_scale.store.volumes import VolumeLayout, label_store, volume_store

VOLUME_ID_VERSION = b"medssl-volume-v1"
INT16 = np.iinfo(np.int16)


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a worker needs; picklable, sent once per worker."""

    out: Path
    secret: bytes
    spacing: tuple[float, float, float] | None = None
    limits: Limits = Limits()
    layout: VolumeLayout = VolumeLayout()
    shard_codec: str = "npy"
    hash_paths: bool = False
    subject_pattern: str | None = None
    # True when the process that commits the item also writes the shards (one worker):
    # the sample then goes straight into the shard instead of through a fragment file.
    direct_shards: bool = False


@dataclasses.dataclass
class Result:
    records: list[ManifestRecord]
    bytes_out: int = 0
    log: list[str] = dataclasses.field(default_factory=list)
    sample: tuple[np.ndarray, dict[str, Any], np.ndarray | None] | None = None  # only with direct_shards


def file_digest(paths: list[str]) -> tuple[str, int, int]:
    """(sha256, total bytes, newest mtime) of the item's files.

    Several files (a DICOM series, a header/data pair) hash as the sorted list
    of their digests: the content decides, not names or order.
    """
    digests, size, mtime = [], 0, 0
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
        st = os.stat(p)
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
        digests.append(h.hexdigest())
    if len(digests) == 1:
        return digests[0], size, mtime
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest(), size, mtime


def volume_id(array: np.ndarray, affine: np.ndarray) -> str:
    """Content address: voxels (in Fortran order), dtype, shape and geometry (rounded to 0.1 um)."""
    h = hashlib.sha256(VOLUME_ID_VERSION)
    h.update(json.dumps([list(array.shape), array.dtype.str, np.round(affine, 4).tolist()]).encode())
    h.update(memoryview(np.asfortranarray(array).T).cast("B"))  # .T of a Fortran array is a C-contiguous view
    return "v" + h.hexdigest()[:19]


def intensity_stats(array: np.ndarray) -> dict[str, float]:
    """Robust statistics on a 1/64 subsample: what load-time normalisation needs."""
    sub = array[::4, ::4, ::4].astype(np.float32, copy=False)
    lo, hi = np.percentile(sub, [0.5, 99.5])
    clipped = np.clip(sub, lo, hi)
    return {
        "min": float(array.min()),
        "max": float(array.max()),
        "mean": round(float(sub.mean()), 4),
        "std": round(float(sub.std()), 4),
        "p0_5": round(float(lo), 4),
        "p99_5": round(float(hi), 4),
        # What MR normalisation (percentile clip, then z-score) needs from the whole volume.
        "clip_mean": round(float(clipped.mean()), 4),
        "clip_std": round(float(clipped.std()), 4),
    }


def _finite(vol: RawVolume, warnings: list[str]) -> np.ndarray:
    a = vol.array
    if not np.issubdtype(a.dtype, np.floating):
        return a
    if np.isfinite(a.min()) and np.isfinite(a.max()):  # NaN propagates through min/max: no mask for a clean volume
        return a
    bad = ~np.isfinite(a)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return a
    if n_bad == a.size:
        raise FailedInput("all voxels are NaN or infinite")
    fill = float(np.min(a[~bad]))
    if a.flags.writeable:
        a[bad] = fill  # the reader's own array: no second copy of the volume
    else:
        a = np.where(bad, fill, a).astype(a.dtype, copy=False)
    warnings.append(f"{n_bad:,} of {a.size:,} voxels ({100 * n_bad / a.size:.3g}%) were NaN/Inf and set to the volume minimum")
    return a


def _storage_dtype(a: np.ndarray, modality: str, warnings: list[str]) -> np.ndarray:
    """CT keeps Hounsfield units as int16; MR keeps its scanner intensities as float32.

    CT is converted a slab at a time: rounding and clipping a whole float
    volume would hold two more copies of it (5x the stored bytes at the peak).
    """
    if modality == "MR":
        return a.astype(np.float32, copy=False)
    if a.dtype == np.int16:
        return a
    rounds = np.issubdtype(a.dtype, np.floating)
    lo, hi = a.min(), a.max()
    if rounds:
        lo, hi = np.rint(lo), np.rint(hi)
    clips = lo < INT16.min or hi > INT16.max
    out = np.empty_like(a, dtype=np.int16)  # same memory layout as the source
    n_clipped = 0
    for idx in _slabs(a):
        part = np.rint(a[idx]) if rounds else a[idx]
        if clips:
            n_clipped += int(np.count_nonzero((part < INT16.min) | (part > INT16.max)))
            part = np.clip(part, INT16.min, INT16.max)
        out[idx] = part
    if n_clipped:
        warnings.append(f"{n_clipped:,} voxels outside the int16 range were clipped")
    return out


def _slabs(a: np.ndarray, nbytes: int = 4 << 20) -> list[tuple[slice, ...]]:
    """Index tuples cutting ``a`` into contiguous slabs of about ``nbytes`` along its slowest axis."""
    axis = a.ndim - 1 if a.flags.f_contiguous else 0
    step = max(1, nbytes // max(1, a.nbytes // max(1, a.shape[axis])))
    cut = [slice(None)] * a.ndim
    return [tuple(cut[:axis] + [slice(i, i + step)] + cut[axis + 1:]) for i in range(0, a.shape[axis], step)]


def _label_array(path: str, image_raw: RawVolume, limits: Limits, root=None) -> np.ndarray:
    lab = files.read_image_file(path, limits, root)
    if lab.array.shape != image_raw.array.shape:
        raise FailedInput(f"label map shape {lab.array.shape} does not match the image's {image_raw.array.shape}")
    if not np.allclose(lab.affine, image_raw.affine, atol=1e-3, rtol=1e-4):
        raise FailedInput("label map geometry (affine) does not match the image's")
    a = lab.array
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.rint(a)):
            raise FailedInput("label map has non-integer values")
        a = a.astype(np.int64)
    if a.min() < 0:
        raise FailedInput("label map has negative values")
    top = int(a.max())
    if top >= 2**32:
        raise FailedInput(f"label map has values up to {top}, beyond 32-bit label ids")
    return a.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)


def _read(item: Item, limits: Limits) -> RawVolume:
    if item.kind == "dicom":
        return dicom.read_series(item.paths, limits, item.roots or item.root)
    return files.read_image_file(item.paths[0], limits, item.root)


@dataclasses.dataclass
class Prepared:
    """An item decoded and canonicalised, ready to be written."""

    item: Item
    base: dict[str, Any]  # the manifest fields every record of this item shares
    label_name: str | None
    image: np.ndarray  # (x, y, z) RAS, storage dtype
    affine: np.ndarray
    label: np.ndarray | None
    label_err: str | None
    modality: str
    modality_from: str
    raw: RawVolume  # format, identity and meta (the array itself is released)
    warnings: list[str]


def process_item(item: Item, opts: Options) -> Result:
    """The whole item in one go (what a worker process runs)."""
    prep = prepare(item, opts)
    return prep if isinstance(prep, Result) else commit(prep, opts)


def item_names(item: Item, opts: Options) -> tuple[dict[str, Any], str | None]:
    """The manifest fields naming an item (hashed under --hash-paths), and its label's name."""
    name = Pseudonymizer(opts.secret).namer(opts.hash_paths)
    base: dict[str, Any] = {"source": name(item.source)}
    if len(item.names) > 1:
        base["files"] = sorted(name(n) for n in item.names)
    return base, (name(item.label_source) if item.label_source else None)


def prepare(item: Item, opts: Options) -> Prepared | Result:
    """Hash, decode, check and canonicalise; a Result when the item ends here (skipped/failed)."""
    base, label_name = item_names(item, opts)
    try:
        sha, size, mtime = file_digest(item.paths)
        base.update(source_sha256=sha, source_bytes=size, source_mtime_ns=mtime)
        return _canonicalise(item, _read(item, opts.limits), opts, base, label_name)
    except Exception as e:
        return _failure(item, base, label_name, e, "reading")


def commit(prep: Prepared, opts: Options) -> Result:
    """Identify, write volume, label and shard sample, and make the records."""
    try:
        return _commit(prep, opts)
    except Exception as e:
        full = storage_full(e)
        if full:  # the dataset's disk, not the input: say so, naming the dataset (a source path may identify a patient)
            e = FailedInput(f"could not write the dataset {opts.out}: {full}; free space and rerun with --resume")
        return _failure(prep.item, prep.base, prep.label_name, e, "writing")


# Errors of the disk being written, not of the item: after any of them a rerun with --resume finishes the work.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EFBIG: "file too large for this file system or process (file size limit)", errno.EIO: "input/output error"}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how zarrs (Rust) reports an OSError inside a RuntimeError


def storage_full(e: BaseException) -> str | None:
    """'no space left on device (ENOSPC)' and the like when ``e`` (or what it wraps) is the written disk failing; else None."""
    seen = 0
    while e is not None and seen < 8:
        code = e.errno if isinstance(e, OSError) else None
        if code is None and isinstance(e, RuntimeError):
            m = _OS_ERROR.search(str(e))
            code = int(m.group(1)) if m else None
        if code in _STORAGE_ERRNOS:
            return f"{_STORAGE_ERRNOS[code]} ({errno.errorcode[code]})"
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def crashed(item: Item, opts: Options) -> Result:
    """The records of an item whose reader process died (twice: once in the pool, once alone)."""
    base, label_name = item_names(item, opts)
    reason = "the reader process died on this input (a decoder crash, or not enough memory for it)"
    return _failure(item, base, label_name, FailedInput(reason), "reading")


def _failure(item: Item, base: dict[str, Any], label_name: str | None, e: Exception, phase: str) -> Result:
    """A skipped/failed record for an InputError; a failed one naming anything unforeseen (the run goes on)."""
    log = []
    if isinstance(e, InputError):
        status, reason = e.status, e.reason
    elif isinstance(e, MemoryError):  # the worker's --max-worker-memory cap, or the machine's
        status, reason = "failed", not_enough_memory(f"while {phase}; the volume does not fit in this worker").reason
    elif isinstance(e, OSError) and phase == "reading":  # permissions, I/O errors, files vanishing mid-run
        status, reason = "failed", f"cannot read the file: {e.strerror or type(e).__name__}"
    else:
        status, reason = "failed", f"internal error while {phase}: {type(e).__name__}: {e}"
        log.append(_scrub(item, traceback.format_exc()))
    recs = [ManifestRecord(status=status, reason=_scrub(item, reason), **base)]
    if label_name:
        recs.append(_label_record(item, label_name, "skipped", reason=f"its image was {status}"))
    return Result(recs, log=log)


def _label_record(item: Item, label_name: str, status: str, **fields: Any) -> ManifestRecord:
    """A label's record carries its file's size and mtime, so an edited label map is noticed on a re-run."""
    try:
        st = os.stat(item.label_path) if item.label_path else None
    except OSError:
        st = None
    if st is not None:
        fields.update(source_bytes=st.st_size, source_mtime_ns=st.st_mtime_ns)
    return ManifestRecord(source=label_name, kind="label", status=status, **fields)


def _canonicalise(item: Item, raw: RawVolume, opts: Options, base: dict[str, Any], label_name: str | None) -> Prepared:
    warnings: list[str] = list(raw.warnings) + _duplicate_warnings(item, raw, opts)
    raw.array = _finite(raw, warnings)

    if item.modality:
        modality, modality_from = item.modality, "override"
    elif raw.modality:
        modality, modality_from = raw.modality, "header"
    else:
        modality, why = infer_modality(raw.array)
        modality_from = "intensity"
        warnings.append(f"modality {modality} inferred from intensities ({why})")

    label_arr, label_err = None, None
    if item.label_path:
        try:
            label_arr = _label_array(item.label_path, raw, opts.limits, item.root)
        except InputError as e:
            label_err = e.reason

    image = _storage_dtype(raw.array, modality, warnings)
    raw.array = None  # type: ignore[assignment]  # free the reader's copy before reorienting (it may copy)
    image, affine = to_canonical(image, raw.affine)
    if label_arr is not None:
        label_arr, _ = to_canonical(label_arr, raw.affine)
    if opts.spacing is not None:
        # The new grid grows with the cube of the spacing ratio: check it before allocating it.
        spacing = "x".join(f"{s:g}" for s in opts.spacing)
        opts.limits.check_shape(resampled_shape(image.shape, affine, opts.spacing), f"resampling to {spacing} mm",
                                verb="makes")
        src_affine = affine
        image, affine = resample(image, src_affine, opts.spacing)
        image = _storage_dtype(image, modality, warnings)
        if label_arr is not None:
            label_arr, _ = resample(label_arr, src_affine, opts.spacing, label=True)
    return Prepared(item, base, label_name, image, affine, label_arr, label_err, modality, modality_from, raw, warnings)


def _duplicate_warnings(item: Item, raw: RawVolume, opts: Options) -> list[str]:
    """One warning per file the reader left out as an exact copy, naming it and the file kept (as recorded)."""
    name = Pseudonymizer(opts.secret).namer(opts.hash_paths)
    source_of = {str(p): name(n) for p, n in zip(item.paths, item.names)}
    return [
        f"duplicate file {source_of.get(dropped, '(unnamed)')} left out: same SOPInstanceUID and content "
        f"as {source_of.get(kept, '(unnamed)')}"
        for dropped, kept in raw.duplicates
    ]


def _commit(prep: Prepared, opts: Options) -> Result:
    item, base, image, label_arr = prep.item, prep.base, prep.image, prep.label
    pseud = Pseudonymizer(opts.secret)
    vid = volume_id(image, prep.affine)
    geo = geometry(prep.affine)
    patient = pseud("patient", prep.raw.identity.get("patient")) or _subject(item.source, opts.subject_pattern, pseud)
    study = pseud("study", prep.raw.identity.get("study"))
    stats = intensity_stats(image)
    attrs: dict[str, Any] = {
        "volume_id": vid,
        "modality": prep.modality,
        "orientation": "RAS",
        "units": "HU" if prep.modality == "CT" else "scanner",
        **geo,
        "source_sha256": base["source_sha256"],
        "format": prep.raw.format,
        "stats": stats,
        "foreground": foreground.encode(foreground.foreground_grid(image, foreground.body_threshold(prep.modality, stats))),
        "meta": prep.raw.meta,
        "has_label": label_arr is not None,
        "source": base["source"],
    }
    if patient:
        attrs["patient"] = patient
    if study:
        attrs["study"] = study
    classes = None
    if label_arr is not None:
        present = sorted(int(v) for v in np.unique(label_arr) if v != 0)
        classes = {str(v): (item.classes or {}).get(str(v), str(v)) for v in present}

    ds = DatasetDir(opts.out)
    owner, nbytes, sample, wrote = _store(ds, opts, vid, image, attrs, label_arr, classes, geo)
    if owner != base["source"]:
        recs = [duplicate_record(base, vid, owner)]
        if prep.label_name:
            recs.append(_label_record(item, prep.label_name, "skipped", reason=duplicate_label_reason(vid)))
        return Result(recs)

    warnings, label_err = list(prep.warnings), prep.label_err
    if not wrote and label_arr is not None:  # this item's volume was stored by an earlier run
        label_err, added = _attach_label(ds, opts, vid, label_arr, classes, geo)
        if added:
            warnings.append("label map added after the volume was sharded: it is in labels.zarr, not in the shard sample")
        if label_err:
            label_arr = None
    recs = [
        ManifestRecord(
            status="ok",
            volume_id=vid,
            modality=prep.modality,
            modality_from=prep.modality_from,
            shape=list(image.shape),
            spacing=geo["spacing"],
            dtype=str(image.dtype),
            format=prep.raw.format,
            has_label=label_arr is not None,
            label_source=prep.label_name if label_arr is not None else None,
            patient=patient,
            study=study,
            warnings=warnings or None,
            **base,
        )
    ]
    if prep.label_name and label_err:
        recs.append(_label_record(item, prep.label_name, "failed", reason=_scrub(item, label_err), volume_id=vid))
    elif prep.label_name:
        recs.append(_label_record(item, prep.label_name, "ok", volume_id=vid, shape=list(label_arr.shape)))
    return Result(recs, nbytes, sample=sample)


def duplicate_record(base: dict[str, Any], vid: str, owner: str) -> ManifestRecord:
    """An input whose content ``owner`` stored already as ``vid``; ``base``: its naming fields (:func:`item_names`, digest)."""
    return ManifestRecord(status="skipped", reason=f"duplicate of {vid} (same content as {owner})", duplicate_of=vid, **base)


def duplicate_label_reason(vid: str) -> str:
    return f"its image is a duplicate of {vid}"


def _attach_label(ds: DatasetDir, opts: Options, vid: str, label: np.ndarray, classes: dict[str, str] | None,
                  geo: dict[str, Any]) -> tuple[str | None, bool]:
    """A label map for a volume stored earlier: (error, added). Stored labels are never replaced."""
    labels = label_store(ds, opts.layout)
    if labels.exists(vid):
        if np.array_equal(labels.read(vid), label):
            return None, False
        return "differs from the label map already stored for this volume (labels are never replaced: ingest into a new dataset)", False
    labels.write(vid, label, {"volume_id": vid, "classes": classes, **geo})
    return None, True


def _store(ds: DatasetDir, opts: Options, vid: str, image: np.ndarray, attrs: dict[str, Any],
           label: np.ndarray | None, classes: dict[str, str] | None, geo: dict[str, Any]) -> tuple[str, int, Any, bool]:
    """Write volume, label and shard sample unless the content is already stored.

    Returns (owner, bytes written, the shard sample when ``direct_shards``, whether this call wrote).

    Identical content may arrive from two workers at once. Whoever creates the
    claim file first (O_EXCL) owns the volume id and writes everything; the
    other waits until the volume exists, then reports a duplicate of it, so a
    duplicate never points at a volume that is not there. A claim whose
    process died (a killed worker) is taken over. The owner's name is kept in
    the volume's attributes, so later runs and a resumed run know it too.
    """
    volumes, labels = volume_store(ds, opts.layout), label_store(ds, opts.layout)
    me = attrs["source"]
    claims = ds.tmp / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    claim = claims / vid
    while True:
        if volumes.exists(vid):
            return volumes.attrs(vid).get("source", "an earlier input"), 0, None, False
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            pid, owner = _read_claim(claim)
            if pid is not None and pid != os.getpid() and _alive(pid) and owner != me:
                time.sleep(0.01)  # the owner is writing: wait for its volume
                continue
            claim.unlink(missing_ok=True)  # its process died, or it is our own dead attempt: take over
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {me}")
    try:
        if volumes.exists(vid):  # published by the owner we waited on, just before it let go of the claim
            return volumes.attrs(vid).get("source", "an earlier input"), 0, None, False
        nbytes = 0
        # The label first: the volume's arrival is what marks the pair complete for a resumed run.
        if label is not None and labels.write(vid, label, {"volume_id": vid, "classes": classes, **geo}):
            nbytes += labels.nbytes_stored(vid)
        if not volumes.write(vid, image, attrs):
            return volumes.attrs(vid).get("source", "an earlier input"), nbytes, None, False
        nbytes += volumes.nbytes_stored(vid)
        meta = sample_meta(attrs, image, classes)
        if opts.direct_shards:
            return me, nbytes, (image, meta, label), True
        write_sample_fragment(ds, vid, image, meta, label, opts.shard_codec)
        return me, nbytes, None, True
    finally:
        claim.unlink(missing_ok=True)  # the volume exists now, or this attempt failed: either way, done


def _read_claim(claim: Path) -> tuple[int | None, str]:
    """(pid, owner) of a claim; (None, "") when absent or not yet written (the claimer writes it at once)."""
    for _ in range(100):
        try:
            text = claim.read_text()
        except FileNotFoundError:
            return None, ""
        if text:
            pid, _, owner = text.partition(" ")
            return int(pid), owner
        time.sleep(0.005)
    return None, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sample_meta(attrs: dict[str, Any], image: np.ndarray, classes: dict[str, str] | None) -> dict[str, Any]:
    """meta.json of a shard sample: the volume's attributes plus what a streaming reader needs."""
    meta = {k: v for k, v in attrs.items() if k not in ("meta", "source")}
    meta.update(shape=list(image.shape), dtype=str(image.dtype))
    if classes is not None:
        meta["classes"] = classes
    return meta


def _subject(source: str, pattern: str | None, pseud: Pseudonymizer) -> str | None:
    """Patient pseudonym from a folder name (--subject-pattern) when the format carries none."""
    if not pattern:
        return None
    m = re.search(pattern, source)
    if not m:
        return None
    return pseud("patient", m.group(1) if m.groups() else m.group(0))


def _scrub(item: Item, text: str) -> str:
    if item.kind != "dicom":
        return text
    try:
        values = dicom.identifying_values(item.paths[0])
    except Exception:
        return text
    return scrub(text, values)
