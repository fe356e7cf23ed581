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


def test_export_onnx_refuses_an_existing_file_and_unsupported_layers(tmp_path):
    from segaware_caffe.converters.python_export import export_onnx, python_source
    from segaware_caffe.errors import OutputExistsError, UnsupportedError
    net = sc.Net('input: "x" input_shape { dim: 1 dim: 3 } layer { name: "ip" type: "InnerProduct" '
                 'bottom: "x" top: "y" inner_product_param { num_output: 2 } }')
    path = tmp_path / "net.onnx"
    path.write_bytes(b"mine")
    with pytest.raises(OutputExistsError, match=r"net\.onnx: file exists; pass --force "
                                                r"\(overwrite=True\) to replace it"):
        export_onnx(net, python_source(net), path)
    assert path.read_bytes() == b"mine"
    export_onnx(net, python_source(net), path, overwrite=True)
    assert path.read_bytes() != b"mine"
    segaware = sc.Net('input: "x" input_shape { dim: 1 dim: 1 dim: 4 dim: 4 } layer { name: "d" '
                      'type: "Im2dist" bottom: "x" top: "y" convolution_param { kernel_size: 3 '
                      'pad: 1 } }')
    with pytest.raises(UnsupportedError, match=r"1 layer\(s\) run segmentation-aware kernels that "
                                               r"ONNX has no operator for: d \(Im2dist\)"):
        export_onnx(segaware, python_source(segaware), tmp_path / "other.onnx")
    assert not (tmp_path / "other.onnx").exists()
