"""`segaware-caffe export --onnx`: BVLC nets run in onnxruntime with sc.Net's numbers; nets with
segmentation-aware kernels are refused with the list of those layers."""
import numpy as np
import pytest
import torch

import segaware_caffe as sc
from tests.conftest import REFERENCE, reference_files
from segaware_caffe.tools.cli import main

BVLC = reference_files(sorted((REFERENCE / "bvlc").glob("*deploy*.prototxt"))
                       + [REFERENCE / "bvlc" / "mnist_lenet.prototxt"])


def onnxruntime_or_skip():
    try:
        import onnxruntime
    except ImportError as e:
        pytest.skip(f"onnxruntime is not importable ({e}); pip install onnx onnxruntime")
    return onnxruntime


def batch_one(net):
    return {name: (1, *shape[1:]) for name, shape in net.input_shapes.items()}


@pytest.mark.slow
@pytest.mark.parametrize("prototxt", BVLC, ids=lambda p: p.stem if p else "reference")
def test_bvlc_nets_run_in_onnxruntime(prototxt, tmp_path):
    ort = onnxruntime_or_skip()
    declared = sc.Net(prototxt)
    shapes = batch_one(declared)
    args = [a for name, shape in shapes.items()
            for a in ("--input-shape", f"{name}={','.join(map(str, shape))}")]
    # non-trivial weights (the deploy nets have no fillers, so they build with zeros)
    torch.manual_seed(0)
    for p in declared.learnable_params:
        with torch.no_grad():
            p.normal_(0, 0.02)
    tensors = tmp_path / "w.safetensors"
    declared.save_weights(tmp_path / "w.caffemodel")
    assert main(["convert", str(prototxt), str(tmp_path / "w.caffemodel"), "-o", str(tensors)]) == 0
    onnx_path = tmp_path / "net.onnx"
    assert main(["export", str(prototxt), str(tensors), "--onnx", str(onnx_path), *args]) == 0
    session = ort.InferenceSession(str(onnx_path))
    inputs = {name: torch.randn(shape) * 50 for name, shape in shapes.items()}
    outputs = [o.name for o in session.get_outputs()]
    got = session.run(outputs, {k: v.numpy() for k, v in inputs.items()})
    ref = declared.forward(outputs=outputs, **inputs)
    for name, value in zip(outputs, got):
        expected = ref[name].detach().numpy()
        error = np.abs(value - expected).max() / np.abs(expected).max()
        print(f"{prototxt.stem} {name}: onnxruntime vs Net max relative error {error:.2e}")
        assert expected.std() > 0, "degenerate output, the comparison would prove nothing"
        assert error <= 1e-4


def test_segaware_net_is_refused_with_its_layers(reference, tmp_path, capsys):
    out = tmp_path / "vgg.onnx"
    assert main(["export", str(reference / "segaware/config/vgg/deploy.prototxt"), "--onnx",
                 str(out)]) == 1
    err = capsys.readouterr().err
    assert "cannot export net 'segaware-all-largeFOV' to ONNX: 6 layer(s) run segmentation-aware kernels" in err
    for layer in ("emb_dist1 (Im2dist)", "emb_dist2 (Im2dist)", "emb_dist6 (Im2dist)"):
        assert layer in err
    assert not out.exists()
