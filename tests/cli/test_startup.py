"""The command line answers --help and option errors without loading torch (or the layer
registry): only the verb asked for is imported, and no verb module imports torch before `run`."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = """
import json, sys
from segaware_caffe.tools.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
heavy = sorted(m for m in ("torch", "scipy", "segaware_caffe.net", "segaware_caffe.layers",
                           "matplotlib") if m in sys.modules)
print(json.dumps({"status": status, "heavy": heavy}), file=sys.__stderr__)
"""

CASES = [
    ["--help"],
    [],
    ["nosuchverb"],
    ["train", "--help"],
    ["train", "--bogus"],
    ["train", "--solver", "s.prototxt", "--iterations", "many"],
    ["test", "--iterations", "2"],               # --model missing
    ["run", "--help"],
    ["run"],
    ["time", "--nope"],
    ["export", "--opset", "x", "a.prototxt"],
    ["convert", "a.prototxt"],
    ["inspect", "--phase", "bad", "a.prototxt"],
    ["eval", "--pred", "p"],
    ["demo", "--size", "big"],
    ["mat2png", "--help"],
    ["resize", "--help"],
    ["plot", "--help"],
    ["plot"],
]


def _probe(argv):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    return json.loads(last), done


@pytest.mark.parametrize("argv", CASES, ids=lambda a: " ".join(a) or "(none)")
def test_help_and_option_errors_load_no_torch(argv):
    result, done = _probe(argv)
    assert result["status"] in (0, 2), done.stderr
    assert result["heavy"] == [], f"{argv}: loaded {result['heavy']}"


def test_help_lists_every_verb():
    result, done = _probe(["--help"])
    for verb in ("train", "test", "time", "run", "inspect", "convert", "export", "demo", "eval",
                 "mat2png", "resize", "plot"):
        assert f"    {verb} " in done.stdout, verb
