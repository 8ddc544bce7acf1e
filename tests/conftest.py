"""Shared test fixtures: real BreastMNIST features (small subset, cached per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"


SMALL_SUBSET = 160  # images per split used by the real-data tests

_MODULES_WITH_FAILURES: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _MODULES_WITH_FAILURES.add(item.module.__name__)
    return report


@pytest.fixture(scope="module", autouse=True)
def _free_module_scratch(request, tmp_path_factory, feature_cache_dir):
    """Remove the folders a module's fixtures made once its tests are done, unless one failed.

    pytest removes function-scoped ``tmp_path`` folders as it goes (retention policy
    "failed"), but module fixtures' ``mktemp`` folders (bundles of evaluation keys, service
    data dirs: hundreds of MB each) would otherwise stay until the session ends. The
    session's feature cache is made before the snapshot, so it is never among them.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.module.__name__ in _MODULES_WITH_FAILURES:
        return
    for path in set(base.iterdir()) - before:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory) -> Path:
    """One feature cache per test session, so real features are extracted once."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def breast_features_small(feature_cache_dir):
    """EfficientNet-Lite0 features of the first 160 images per BreastMNIST split (real data)."""
    if not (SHARED_DATA / "breastmnist.npz").exists():
        pytest.skip("BreastMNIST not available in ../shared/data/medmnist")
    from medblindtuner.data import load_medmnist
    from medblindtuner.features import extract_features

    dataset = load_medmnist("breastmnist", data_dir=SHARED_DATA, download=False)
    return extract_features(dataset.subset(SMALL_SUBSET), backbone="efficientnet_lite0",
                            cache_dir=feature_cache_dir, progress=False)


# ---- databases: SQLite always, PostgreSQL where a server is given (CI's .ci/run starts one) ----
POSTGRES_URL_VAR = "MEDBLINDTUNER_TEST_POSTGRES_URL"


def postgres_url() -> str:
    """The PostgreSQL URL of the test server with an empty schema, or skip the test."""
    import os

    url = os.environ.get(POSTGRES_URL_VAR)
    if not url:
        pytest.skip(f"PostgreSQL case: set {POSTGRES_URL_VAR}=postgresql+psycopg://... "
                    "(.ci/run installs and starts a server and sets it)")
    pytest.importorskip("psycopg", reason="PostgreSQL case: the psycopg driver is missing")
    from sqlalchemy import create_engine

    from medblindtuner.service.store import Base

    engine = create_engine(url)
    Base.metadata.drop_all(engine)  # every test starts from an empty job store
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str | None:
    """None (the service's default SQLite file in its data dir) or a PostgreSQL URL."""
    return None if request.param == "sqlite" else postgres_url()
