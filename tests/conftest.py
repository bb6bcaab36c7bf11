import os

import pytest

# Tests never read or create the user's real site secret; set at import so that
# fixtures of any scope see it.
TEST_SECRET = "medssl-test-secret-0123456789abcdef"
os.environ["MEDSSL_SITE_SECRET"] = TEST_SECRET
os.environ.pop("MEDSSL_SITE_SECRET_FILE", None)
# 2-core CI runs two test processes: keep each one's BLAS/codec pools from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _site_secret(monkeypatch):
    monkeypatch.setenv("MEDSSL_SITE_SECRET", TEST_SECRET)
