"""The golden TEST-phase cases through the inference graph (a forward under torch.no_grad()),
against the original's numbers with the golden tolerance.

Each case runs twice on a fresh net: asking for every stored blob (the rewrites then keep each
asked-for intermediate, e.g. a convolution's top before its BatchNorm), and asking only for the
net's outputs (where BatchNorm/Scale fold into the convolution before them, ReLU moves behind a
MAX pooling, and so on). Data-layer cases run once per net, as their readers advance.
"""
import json

import pytest
import torch

from tests.golden.test_golden import LAYER_CASES, _params, case_id, load_case
from tests.tolerances import assert_close, is_integer_valued

TEST_CASES = [p for p in LAYER_CASES if json.loads(p.read_text())["phase"] == "TEST"]


def _inputs(net, data):
    if any(r.type == "MemoryData" for r in net.records):
        net.set_input_arrays(data["src/data"].copy(), data["src/label"].copy())
    return {k[3:]: torch.from_numpy(data[k].copy()) for k in data.files if k.startswith("in/")}


@pytest.mark.parametrize("meta_path", _params(TEST_CASES), ids=case_id)
@pytest.mark.parametrize("which", ["every blob", "net outputs"])
def test_golden_case_inference(meta_path, which, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta, net, data = load_case(meta_path, workdir=tmp_path / "case")
    stored = [k[4:] for k in data.files if k.startswith("out/")]
    names = stored if which == "every blob" else [o for o in net.outputs if o in stored]
    if not names:
        pytest.skip(f"{case_id(meta_path)}: no net output has stored numbers")
    inputs = _inputs(net, data)
    with torch.no_grad():
        assert net.uses_inference_graph()
        out = net.forward(outputs=names, **inputs)
    errors = {}
    for name in names:
        ref = data["out/" + name]
        errors[name] = assert_close(out[name].numpy(), ref, f"forward {name} (inference graph)",
                                    exact=is_integer_valued(ref))
    print(f"{case_id(meta_path)} ({which}): max relative error " +
          ", ".join(f"{k}={v:.2e}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1])[:3]))


def test_golden_inference_cases_found():
    assert len(TEST_CASES) >= 50, "expected the golden TEST-phase cases"
