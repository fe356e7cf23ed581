import os

import pytest

from tests.fuzz import engine

EXAMPLES_ENV = "SEGAWARE_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 100


def fuzz_examples(config):
    """Examples per target: --fuzz-examples N, else $SEGAWARE_FUZZ_EXAMPLES, else 100."""
    value = config.getoption("fuzz_examples", None) or os.environ.get(EXAMPLES_ENV)
    return int(value) if value else DEFAULT_EXAMPLES


@pytest.fixture(scope="session")
def fuzz_seeds(tmp_path_factory):
    return engine.build_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.fixture
def fuzz_scratch(tmp_path, monkeypatch):
    """A scratch folder, data layers without worker processes, and the 4 GB allocation cap."""
    monkeypatch.setenv("SEGAWARE_DATA_WORKERS", "0")
    monkeypatch.delenv("SEGAWARE_DEBUG", raising=False)
    folder = tmp_path / "scratch"
    folder.mkdir()
    previous = engine.limit_memory()
    yield folder
    engine.restore_memory(previous)
