"""De-identification: marker strings planted in every identifying DICOM field never reach the dataset."""

import gzip
import json
import tarfile

import numpy as np
import pytest
from sample_data import dicom_series, run_cli

from ingest.deid import Pseudonymizer, scrub
from medssl_scale.store.layout import DatasetDir
from medssl_scale.store.manifest import latest, read_manifest
from medssl_scale.synth.dicom import DEFAULT_IDENTIFIERS, write_series
from medssl_scale.synth.phantoms import ct_phantom

# One distinct marker per field, valid for the field's VR (PN, LO, SH 16 chars, DA 8 digits).
MARKERS = {
    "PatientName": "ZQXNAME^ALPHA",
    "PatientID": "ZQXPID77",
    "PatientBirthDate": "19310917",
    "PatientAddress": "ZQXADDR Lane 9",
    "OtherPatientIDs": "ZQXOTHERID",
    "AccessionNumber": "ZQXACC55",
    "InstitutionName": "ZQXINSTITUTE",
    "InstitutionAddress": "ZQXINSTADDR",
    "ReferringPhysicianName": "ZQXREFDOC^B",
    "PerformingPhysicianName": "ZQXPERFDOC^C",
    "OperatorsName": "ZQXOPERATOR^D",
    "StudyDescription": "ZQXSTUDYDESC",
    "SeriesDescription": "ZQXSERIESDESC",
    "ImageComments": "ZQXCOMMENT",
    "StudyID": "ZQXSTUDYID",
    "PrivateText": "ZQXPRIVATE",
}


def test_markers_cover_every_identifier_the_writer_plants():
    assert set(MARKERS) == set(DEFAULT_IDENTIFIERS)


def _needles():
    out = set()
    for v in MARKERS.values():
        out.add(v.encode())
        out.update(part.encode() for part in v.split("^") if len(part) >= 6)
    out.add(b"ZQXFOLDER")
    return out


def _all_bytes(root):
    """Every file under the dataset, and every tar member's content (decompressed)."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        yield str(path.relative_to(root)), data
        if path.suffix == ".tar":
            with tarfile.open(path) as tf:
                for m in tf.getmembers():
                    content = tf.extractfile(m).read()
                    if m.name.endswith(".gz"):
                        content = gzip.decompress(content)
                    yield f"{path.name}:{m.name}", m.name.encode() + content


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("coll") / "ZQXFOLDER_site"
    p = ct_phantom(shape=(24, 20, 10), seed=5)
    # two series of one patient (to check linkage), plus one broken series whose failure reason must stay clean
    write_series(root / "ZQXFOLDER_patient" / "s1", p.image, p.affine, identifiers=MARKERS, seed=1)
    write_series(root / "ZQXFOLDER_patient" / "s2", p.image[::-1].copy(), p.affine, identifiers=MARKERS, seed=2, modality="MR", rescale=None)
    broken = write_series(root / "ZQXFOLDER_patient" / "broken", p.image, p.affine, identifiers=MARKERS, seed=3, shuffle=False)
    broken[len(broken) // 2].write_bytes(broken[len(broken) // 2].read_bytes()[:300])  # a truncated slice
    dicom_series(root / "other", n=1, identifiers={"PatientID": "ZQXPID88", "PatientName": "ZQXNAME^BETA"})
    out = tmp_path_factory.mktemp("out") / "ds"
    res = run_cli("ingest", str(root), "--out", str(out), "--no-progress", "--hash-paths", "--shard-codec", "npy.gz")
    return root, out, res


def test_no_identifier_anywhere_in_the_dataset_or_the_console(ingested):
    _, out, res = ingested
    needles = _needles()
    found = []
    for name, data in _all_bytes(out):
        found += [(name, n.decode()) for n in needles if n in data]
    for stream in (res.stdout, res.stderr):
        found += [("console", n.decode()) for n in needles if n in stream.encode()]
    assert found == []


def test_every_file_is_still_accounted_for_and_the_broken_series_fails(ingested):
    root, out, _ = ingested
    recs = list(latest(read_manifest(DatasetDir(out).manifest)).values())
    n_files = sum(len(r.files or [r.source]) for r in recs)
    assert n_files == sum(1 for p in root.rglob("*") if p.is_file())
    statuses = sorted(r.status for r in recs)
    assert statuses.count("ok") == 3 and statuses.count("failed") >= 1
    assert all(r.source.startswith("pat-") is False and "ZQX" not in r.source for r in recs)


def test_one_patient_stays_linkable_and_distinct_patients_do_not(ingested):
    _, out, _ = ingested
    ok = [r for r in latest(read_manifest(DatasetDir(out).manifest)).values() if r.status == "ok"]
    patients = sorted(r.patient for r in ok)
    assert len(set(patients)) == 2 and all(p.startswith("pat-") for p in patients)
    # "pat-" + the first 20 hex digits of HMAC-SHA256(test secret, "patient\0ZQXPID77"), by OpenSSL, not by this code:
    # printf 'patient\0ZQXPID77' | openssl dgst -sha256 -hmac medssl-test-secret-0123456789abcdef -> 4832a3eac0136a44db2c...
    assert MARKERS["PatientID"] == "ZQXPID77"
    assert patients.count("pat-4832a3eac0136a44db2c") == 2  # both series of ZQXPID77 share the keyed pseudonym


def test_pseudonyms_depend_on_the_secret():
    a, b = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    assert a("patient", "X1") == a("patient", "X1") != b("patient", "X1")
    assert a("patient", "X1") != a("study", "X1")  # kinds are separated
    assert a("patient", "  ") is None
    assert a.fingerprint != b.fingerprint


def test_a_dataset_refuses_a_second_secret(ingested, tmp_path):
    root, out, _ = ingested
    secret = tmp_path / "other-secret"
    secret.write_text("another-site-secret-with-enough-bytes")
    res = run_cli("ingest", str(root), "--out", str(out), "--no-progress", "--secret-file", str(secret), check=False)
    assert res.returncode == 2 and "different site secret" in res.stderr


def test_scrub_removes_values_from_messages():
    assert scrub("failed for ZQXPID77 at ZQXINSTITUTE", ["ZQXPID77", "ZQXINSTITUTE", "ab"]) == "failed for [redacted] at [redacted]"


def test_shard_meta_carries_pseudonyms_only(ingested):
    _, out, _ = ingested
    ds = DatasetDir(out)
    for shard in sorted(ds.shards.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith("meta.json"):
                    meta = json.loads(tf.extractfile(m).read())
                    assert meta["patient"].startswith("pat-") and meta["study"].startswith("stu-")
                    assert "source" not in meta
                elif m.name.endswith(".npy.gz"):
                    arr = np.load(__import__("io").BytesIO(gzip.decompress(tf.extractfile(m).read())))
                    assert arr.ndim == 3


def test_hashed_paths_keep_only_known_image_suffixes():
    p = Pseudonymizer(b"k" * 32)
    assert p.path("hospA/Doe.Jane#series-abc").startswith("src-") and "Jane" not in p.path("hospA/Doe.Jane#series-abc")
    assert "123456" not in p.path("hospA/MRN.123456")
    assert p.path("hospA/Smith, J. 1961-04-02/CT.Thorax").count(".") == 0
    assert p.path("hospA/case.nii.gz").endswith(".nii.gz") and p.path("x/IM0001.dcm").endswith(".dcm")
