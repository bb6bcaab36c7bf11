"""A deterministic train / validation / test split of labelled volumes by pseudonymous patient.

Each patient falls in a part by a hash of its id mapped to [0, 1): below
``test`` is test, below ``test + val`` validation, the rest training. So the
split depends on the patient alone (not on ingest order, the fine-tuning seed,
or which other patients exist): a dataset that grows keeps every earlier
patient where it was, and a patient's volumes never straddle two parts. Small
sets where chance leaves the test or validation part empty get the training
patients nearest the boundary moved in (then, and only then, adding patients
can move those).

With ``val_count`` and ``test_count`` the parts have exactly those sizes
instead: the patients lowest in the hash order are the test set, the next
ones validation (a recipe's fixed evaluation sets; a patient added later can
then push one into the next part).

The labelled fraction of the training patients is a prefix of another hash
order: 10% of the labels is a subset of 20%, and the test set is the same
for every fraction and seed. The count is rounded up, so a fraction never
leaves fewer patients than it names (10% of 24 is 3, as in the papers'
folds). Volumes without a patient id count as their own patient.
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


def _unit(key: str, salt: str) -> float:
    """A patient's place in [0, 1), from its id alone."""
    return int.from_bytes(hashlib.blake2b(f"{salt}/{key}".encode(), digest_size=8).digest(), "big") / 2.0**64


def split_by_patient(catalog: Catalog, val: float = 0.2, test: float = 0.2, label_fraction: float = 1.0, salt: str = "medssl-split",
                     val_count: int | None = None, test_count: int | None = None) -> Split:
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    if val < 0 or test <= 0 or val + test >= 1:
        raise ValueError(f"val ({val}) and test ({test}) fractions must leave patients for training")
    by: dict[str, list[str]] = {}
    for v in catalog.volumes:
        by.setdefault(v.patient or f"volume:{v.volume_id}", []).append(v.volume_id)
    counted = val_count is not None or test_count is not None
    need = (test_count or 1) + (val_count if val_count is not None else (1 if val > 0 else 0)) + 1 if counted else (3 if val > 0 else 2)
    if len(by) < need:
        raise ValueError(f"{len(by)} labelled patient(s) cannot make a train/validation/test split; "
                         f"at least {need} are needed (ingest more labelled volumes)")
    u = {p: _unit(p, salt) for p in by}
    if counted:  # exact sizes: the lowest in the hash order are the test set, the next ones validation
        order = sorted(by, key=u.get)
        nt = test_count if test_count is not None else max(1, round(test * len(order)))
        nv = val_count if val_count is not None else round(val * len(order))
        test_p, val_p, train_p = order[:nt], order[nt:nt + nv], order[nt + nv:]
        return _finish(by, train_p, val_p, test_p, label_fraction, salt)
    test_p = [p for p in by if u[p] < test]
    val_p = [p for p in by if test <= u[p] < test + val]
    train_p = sorted((p for p in by if u[p] >= test + val), key=u.get)
    # Tiny sets: chance may leave a part empty; fill it from the training patients nearest its boundary.
    if not test_p:
        test_p.append(train_p.pop(0) if train_p else val_p.pop(0))
    if val > 0 and not val_p:
        val_p.append(train_p.pop(0))
    if not train_p:
        train_p.append(max(val_p, key=u.get) if len(val_p) > 1 else max(test_p, key=u.get))
        (val_p if train_p[0] in val_p else test_p).remove(train_p[0])
    return _finish(by, train_p, val_p, test_p, label_fraction, salt)


def labelled_count(fraction: float, pool: int) -> int:
    """Patients a label fraction keeps: rounded up, so 10% of 24 is 3 and a fraction never gives fewer than it names."""
    return max(1, min(pool, math.ceil(fraction * pool - 1e-9)))


def _finish(by: dict[str, list[str]], train_p: list[str], val_p: list[str], test_p: list[str], label_fraction: float, salt: str) -> Split:
    train_p = sorted(train_p, key=lambda p: _unit(p, salt + "/labels"))
    labelled = train_p[:labelled_count(label_fraction, len(train_p))]

    def ids(ps: list[str]) -> tuple[str, ...]:
        return tuple(sorted(v for p in ps for v in by[p]))

    return Split(ids(labelled), ids(val_p), ids(test_p), len(train_p), len(labelled))
