"""The distribution installs kernels/, converters/, tools/ and caffe_proto/ as subpackages of
segaware_caffe, so generic top-level names (`kernels`, `tools`) never resolve to our code."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GENERIC = ("kernels", "tools", "converters", "caffe_proto")

PROBE = """
import importlib.util, json, sys
found = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    found[name] = spec.origin if spec is not None else None
import segaware_caffe.kernels, segaware_caffe.tools.cli, segaware_caffe.converters, segaware_caffe.caffe_proto
found["segaware_caffe.kernels"] = segaware_caffe.kernels.__file__
print(json.dumps(found))
"""


def probe(cwd, env=None):
    import json
    out = subprocess.run([sys.executable, "-c", PROBE, *GENERIC], cwd=cwd, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_generic_names_are_not_ours_outside_the_checkout(tmp_path):
    """As installed for development (pip install -e .), seen from any other directory (a
    PYTHONPATH naming the checkout itself would of course find its folders)."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = probe(tmp_path, env)
    for name in GENERIC:
        origin = found[name]
        assert origin is None or not origin.startswith(str(REPO)), \
            f"`import {name}` resolves to our {origin}"


@pytest.mark.slow
def test_a_built_wheel_holds_only_segaware_caffe(tmp_path):
    """pip install . (a real wheel, no editable finder): one top-level package."""
    import shutil
    source = tmp_path / "source"    # a copy: setuptools writes build/ beside setup.py
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("segaware_caffe",) + GENERIC:
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    top_level = sorted(p.name for p in target.iterdir()
                       if not p.name.endswith((".dist-info", ".egg-info")) and p.name != "bin")
    assert top_level == ["segaware_caffe"], top_level
    for name in GENERIC:
        assert (target / "segaware_caffe" / name / "__init__.py").is_file(), name
    assert (target / "segaware_caffe" / "caffe_proto" / "caffe.proto").is_file()
    # the sources the kernels compile at run time (CUDA through CuPy, CPU loops through cc)
    kernels = target / "segaware_caffe" / "kernels"
    for folder in ("cuda", "cpu"):
        shipped = sorted(p.name for p in (kernels / folder).iterdir())
        wanted = sorted(p.name for p in (REPO / "kernels" / folder).iterdir()
                        if p.suffix in (".cu", ".cuh", ".c", ".h"))
        assert shipped == wanted, (folder, shipped, wanted)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    found = probe(tmp_path, env=env)
    # the installed sources are complete: a CPU loop compiles from them (where a compiler exists)
    if shutil.which("cc") or shutil.which("gcc"):
        build = ("import torch, segaware_caffe.kernels._native as n\n"
                 "assert n.function('masked_conv.c', 'masked_columns', torch.float32) is not None, n.status()")
        subprocess.run([sys.executable, "-c", build], cwd=tmp_path, check=True,
                       env=dict(env, SEGAWARE_CACHE=str(tmp_path / "cache")))
    assert all(found[name] is None for name in GENERIC), found
    assert found["segaware_caffe.kernels"].startswith(str(target))
