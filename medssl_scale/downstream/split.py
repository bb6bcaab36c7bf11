"""A deterministic train / validation / test split of labelled volumes by pseudonymous patient.

Patients are ordered by a hash of their id, so the split depends on the set
of patients only (not on ingest order, not on the fine-tuning seed), and a
patient's volumes never straddle two parts. The labelled fraction of the
training patients is a prefix of their hash order too: 10% of the labels is
a subset of 20%, and the test set is the same for every fraction and seed.
Volumes without a patient id count as their own patient.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

from medssl_scale.data.catalog import Catalog


@dataclasses.dataclass(frozen=True)
class Split:
    train: tuple[str, ...]  # volume ids of the labelled training patients (after label_fraction)
    val: tuple[str, ...]
    test: tuple[str, ...]
    train_pool: int  # training patients before label_fraction
    train_patients: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _order(key: str, salt: str) -> str:
    return hashlib.blake2b(f"{salt}/{key}".encode(), digest_size=8).hexdigest()


def split_by_patient(catalog: Catalog, val: float = 0.2, test: float = 0.2, label_fraction: float = 1.0, salt: str = "medssl-split") -> Split:
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    if val < 0 or test <= 0 or val + test >= 1:
        raise ValueError(f"val ({val}) and test ({test}) fractions must leave patients for training")
    by: dict[str, list[str]] = {}
    for v in catalog.volumes:
        by.setdefault(v.patient or f"volume:{v.volume_id}", []).append(v.volume_id)
    patients = sorted(by, key=lambda p: _order(p, salt))
    n = len(patients)
    n_test = max(1, round(test * n))
    n_val = max(1, round(val * n)) if val > 0 else 0
    if n - n_test - n_val < 1:
        raise ValueError(f"{n} labelled patient(s) cannot make a train/validation/test split; "
                         "at least 3 are needed (ingest more labelled volumes)")
    test_p, val_p, train_p = patients[:n_test], patients[n_test:n_test + n_val], patients[n_test + n_val:]
    train_p = sorted(train_p, key=lambda p: _order(p, salt + "/labels"))
    labelled = train_p[:max(1, math.floor(label_fraction * len(train_p) + 1e-9))]

    def ids(ps: list[str]) -> tuple[str, ...]:
        return tuple(sorted(v for p in ps for v in by[p]))

    return Split(ids(labelled), ids(val_p), ids(test_p), len(train_p), len(labelled))
