"""`export --python` of nets of standard layers writes modules that need only torch: BatchNorm,
Scale, Bias, PReLU, LRN, Reshape, Crop, Permute, Interp, Im2col and the other elementwise layers
become plain torch code (helper definitions inside the module), which computes what sc.Net
computes -- and runs in a process where segaware_caffe cannot be imported."""
import subprocess
import sys
import textwrap

import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.converters.python_export import instantiate, python_source
from tests.tolerances import EXPORT_MAXREL, max_relative_error

BN_SCALE_PRELU = """
name: "bn_scale_prelu"
input: "data" input_shape { dim: 2 dim: 3 dim: 13 dim: 11 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "bn2" type: "BatchNorm" bottom: "pool1" top: "bn2" batch_norm_param { eps: 0.01 } }
layer { name: "scale2" type: "Scale" bottom: "bn2" top: "bn2" scale_param { num_axes: 0 } }
layer { name: "bias2" type: "Bias" bottom: "bn2" top: "bn2" }
layer { name: "ip" type: "InnerProduct" bottom: "bn2" top: "ip" inner_product_param { num_output: 6 } }
layer { name: "prelu2" type: "PReLU" bottom: "ip" top: "ip" prelu_param { channel_shared: true } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

STANDARD = """
name: "standard"
input: "data" input_shape { dim: 2 dim: 4 dim: 9 dim: 10 }
layer { name: "lrn0" type: "LRN" bottom: "data" top: "lrn0" lrn_param { local_size: 7 alpha: 0.5 } }
layer { name: "lrn" type: "LRN" bottom: "lrn0" top: "lrn" lrn_param { local_size: 3 alpha: 0.5 } }
layer { name: "lrn2" type: "LRN" bottom: "lrn" top: "lrn2"
        lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL } }
layer { name: "up" type: "Interp" bottom: "lrn2" top: "up" interp_param { zoom_factor: 2 } }
layer { name: "crop" type: "Crop" bottom: "up" bottom: "data" top: "crop" crop_param { offset: 2 } }
layer { name: "cols" type: "Im2col" bottom: "crop" top: "cols"
        convolution_param { kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "elu" type: "ELU" bottom: "cols" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "bnll" type: "BNLL" bottom: "elu" top: "bnll" }
layer { name: "swish" type: "Swish" bottom: "bnll" top: "swish" }
layer { name: "log" type: "Log" bottom: "bnll" top: "log" log_param { base: 2 shift: 1 } }
layer { name: "perm" type: "Permute" bottom: "swish" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "flat" type: "Reshape" bottom: "perm" top: "flat" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "sum" type: "Eltwise" bottom: "log" bottom: "swish" top: "sum" }
layer { name: "perm2" type: "Permute" bottom: "sum" top: "perm2" permute_param { order: 0 order: 1 order: 2 order: 3 } }
"""


def _randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in net.records:
            blobs = r.module.caffe_blobs()
            if r.type == "BatchNorm":
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=g))
                blobs[1].copy_(torch.rand(blobs[1].shape, generator=g) + 0.5)
                blobs[2].fill_(1.5)
            else:
                for b in blobs:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.3 + 0.1)


def _net(text):
    net = sc.Net(text)
    _randomize(net)
    return net


@pytest.mark.parametrize("text", [BN_SCALE_PRELU, STANDARD], ids=["bn_scale_prelu", "standard"])
def test_standard_layers_export_as_plain_torch(text):
    net = _net(text)
    export = python_source(net)
    assert "segaware_caffe" not in export.source, export.source
    assert {layer.how for layer in export.layers} == {"emitter"}, \
        [(layer.name, layer.how) for layer in export.layers if layer.how != "emitter"]
    model = instantiate(export, net)
    x = torch.randn(net.input_shapes["data"], generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():      # the exact graph, and gradients through both
        ref = net.forward(data=x.clone().requires_grad_(True))
    got = model(x.clone().requires_grad_(True))
    assert set(got) == set(ref)
    for name in ref:
        assert max_relative_error(got[name], ref[name]) <= EXPORT_MAXREL, name
    with torch.no_grad():                    # and the inference graph
        fast = net.forward(data=x)
    for name in ref:
        assert max_relative_error(got[name], fast[name]) <= 1e-5, name
    # the gradients of the parameters agree too
    ref_total = sum(v.float().sum() for v in ref.values())
    ref_total.backward()
    sum(v.float().sum() for v in got.values()).backward()
    mine = dict(model.named_parameters())
    for record in net.records:
        for attr in record.module.CAFFE_BLOBS:
            theirs = getattr(record.module, attr, None)
            if theirs is None or theirs.grad is None:
                continue
            grad = mine[f"{record.key}.{attr}"].grad
            assert max_relative_error(grad, theirs.grad) <= 1e-5, f"{record.name}.{attr}"


def test_exported_module_runs_without_segaware_caffe(tmp_path):
    net = _net(BN_SCALE_PRELU)
    export = python_source(net, default_weights="weights.pt")
    (tmp_path / "model.py").write_text(export.source)
    state = {k[len("layers."):]: v for k, v in net.state_dict().items() if k.startswith("layers.")}
    torch.save(state, tmp_path / "weights.pt")
    x = torch.randn(net.input_shapes["data"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net.forward(data=x)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["segaware_caffe"] = None          # importing segaware_caffe now fails
        try:
            import segaware_caffe
        except ImportError:
            pass
        else:
            raise SystemExit("segaware_caffe imported")
        import torch
        sys.path.insert(0, {str(tmp_path)!r})
        import model
        net = model.load()
        io = torch.load({str(tmp_path / 'io.pt')!r})
        with torch.no_grad():
            out = net(io["x"])
        for name, ref in io["expected"].items():
            err = float((out[name] - ref).abs().max() / ref.abs().max())
            print(name, err)
            assert err <= {EXPORT_MAXREL * 10}, (name, err)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_two_bottom_scale_and_bias_export():
    net = sc.Net("""
    name: "two"
    input: "x" input_shape { dim: 2 dim: 3 dim: 4 }
    input: "s" input_shape { dim: 2 dim: 3 }
    layer { name: "scale" type: "Scale" bottom: "x" bottom: "s" top: "y"
            scale_param { axis: 0 bias_term: true } }
    layer { name: "bias" type: "Bias" bottom: "y" bottom: "s" top: "z" bias_param { axis: 0 } }
    """)
    _randomize(net)
    export = python_source(net)
    assert "segaware_caffe" not in export.source
    model = instantiate(export, net)
    g = torch.Generator().manual_seed(3)
    x, s = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, generator=g)
    with torch.no_grad():
        ref = net.forward(x=x, s=s)
        got = model(x, s)
    assert max_relative_error(got["z"], ref["z"]) <= EXPORT_MAXREL
