import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tests call the command line's main() in the test process; its allocator switch (freed memory
# kept, segaware_caffe.allocator) would then hold every test's peak memory for the session.
# tests/cli/test_allocator.py checks the switch in processes of its own.
os.environ.setdefault("SEGAWARE_KEEP_FREED_MEMORY", "0")

# The compiled CPU loops (kernels/_native.py) build into a folder of this test process, removed
# at its end, so that a run leaves nothing in the user's cache (subprocesses inherit it).
if "SEGAWARE_CACHE" not in os.environ:
    os.environ["SEGAWARE_CACHE"] = tempfile.mkdtemp(prefix="segaware-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SEGAWARE_CACHE"], True)


# Numbers the original segaware Caffe produced (inputs, weights, outputs, gradients, solver
# steps), kept in the repository: see tests/fixtures/README.md.
GOLDEN = REPO / "tests" / "fixtures" / "golden"


def shared_root():
    """The reference material beside the checkout (../shared, or $SEGAWARE_SHARED): the released
    configs and the fork's and BVLC's schemas. Only the tests that read those need it."""
    return Path(os.environ.get("SEGAWARE_SHARED", REPO.parent / "shared"))


SHARED = shared_root()
REFERENCE = SHARED / "reference"
HAVE_REFERENCE = REFERENCE.is_dir()
NO_REFERENCE = (f"needs the released configs and schemas at {SHARED / 'reference'} "
                f"(../shared beside the checkout, or set SEGAWARE_SHARED)")


def reference_files(paths):
    """Parameters for a test over files of the reference material: the files, or (where it is
    absent) one skipped entry that says so, rather than pytest's bare "got empty parameter set"."""
    if HAVE_REFERENCE:
        return list(paths)
    return [pytest.param(None, marks=pytest.mark.skip(reason=NO_REFERENCE))]


@pytest.fixture(scope="session")
def golden():
    return GOLDEN


@pytest.fixture(scope="session")
def reference():
    if not HAVE_REFERENCE:
        pytest.skip(NO_REFERENCE)
    return SHARED / "reference"


def _cuda_ok():
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=None, metavar="N",
                     help="examples per target of the fuzz suite in tests/fuzz (default "
                          "$SEGAWARE_FUZZ_EXAMPLES or 100); bench/fuzz_campaign.py runs thousands")


def pytest_collection_modifyitems(config, items):
    if _cuda_ok():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and CuPy")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def cpu_and_cuda():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


# -- the golden count, printed at the end of every run ------------------------------------------
_GOLDEN_TESTS = ("tests/golden/test_golden.py::test_golden_case[",
                 "tests/solver/test_solver_golden.py::test_golden_solver_trajectory[")
_golden_outcomes = {}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.nodeid.startswith(_GOLDEN_TESTS):
        _golden_outcomes[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter):
    if not _golden_outcomes:
        return
    passed = sum(outcome == "passed" for outcome in _golden_outcomes.values())
    on_disk = len(list(GOLDEN.glob("*/*/meta.json")))
    terminalreporter.write_line(f"golden cases of the original Caffe: {passed} of "
                                f"{len(_golden_outcomes)} run passed ({on_disk} in {GOLDEN})")


def _fixture_listing():
    return {p for case in GOLDEN.glob("*/*") for p in os.listdir(case)}


@pytest.fixture(autouse=True)
def fixtures_stay_unchanged():
    """The golden folders are the original's output: a test that writes into one (a snapshot, a
    writer layer's file) fails, naming what it left there."""
    before = _fixture_listing()
    yield
    added = _fixture_listing() - before
    if added:
        for case in GOLDEN.glob("*/*"):
            for name in added & set(os.listdir(case)):
                (case / name).unlink()
        pytest.fail(f"the test wrote into tests/fixtures/golden: {sorted(added)}")
