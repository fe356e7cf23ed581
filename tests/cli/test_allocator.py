"""The allocator switch (segaware_caffe.allocator): the command line keeps freed memory unless
SEGAWARE_KEEP_FREED_MEMORY=0, a Python program only when it asks; on glibc the switch takes
effect (a large block freed and allocated again comes back without faulting in fresh pages)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = """
import ctypes, json, resource, sys
import segaware_caffe
from segaware_caffe import allocator
if sys.argv[1] == "cli":
    from segaware_caffe.tools.cli import main
    try:
        main(["--help"])
    except SystemExit:
        pass
elif sys.argv[1] == "call":
    segaware_caffe.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_block()
print(json.dumps({"kept": allocator._state["kept"], "faults": faults_of_a_fresh_block()}),
      file=sys.__stderr__)
"""

GLIBC = sys.platform.startswith("linux") and hasattr(os, "confstr") and \
    bool(os.confstr("CS_GNU_LIBC_VERSION"))


def _probe(mode, **env):
    environment = {k: v for k, v in os.environ.items() if k != "SEGAWARE_KEEP_FREED_MEMORY"}
    environment.update(env, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=environment, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the switch acts on glibc's malloc only")
def test_the_command_line_keeps_freed_memory_and_python_programs_choose():
    kept = _probe("cli")
    assert kept["kept"]
    # 256 MB freed and taken again: served from the kept heap, without faulting in its pages
    assert kept["faults"] < 1000, kept
    assert not _probe("cli", SEGAWARE_KEEP_FREED_MEMORY="0")["kept"]
    plain = _probe("none")
    assert not plain["kept"] and plain["faults"] > 30000, plain   # 65536 pages of 4 KB
    assert _probe("call")["kept"]


def test_elsewhere_than_glibc_the_switch_says_it_did_nothing(monkeypatch):
    from segaware_caffe import allocator
    monkeypatch.setattr(allocator, "_state", {"kept": False})
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() is False
