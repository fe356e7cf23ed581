"""Python layers (type "Python"): the user's module runs unchanged against the pycaffe shim,
forward and backward, with errors that name the layer and the user's file and line."""
import sys
import textwrap
import types
import uuid

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.errors import LayerSetupError, NoBackwardError, PythonLayerError

# A Faster R-CNN style pair: a proposal layer whose top size depends on the data, and an ROI max
# pooling layer with a backward; plus a learnable-blob layer. Written the way pycaffe layers are.
USER_LAYERS = '''
import caffe
import numpy as np


class ProposalLayer(caffe.Layer):
    """Boxes (batch index, x1, y1, x2, y2) of the cells whose score passes a threshold."""

    def setup(self, bottom, top):
        options = dict(item.split(":") for item in self.param_str.split())
        self.threshold = float(options["threshold"])
        self.size = int(options["size"])
        top[0].reshape(1, 5)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        scores = bottom[0].data
        n, y, x = np.nonzero(scores[:, 0] > self.threshold)
        rois = np.stack([n, x, y, x + self.size - 1, y + self.size - 1], 1).astype(np.float32)
        top[0].reshape(*rois.shape)
        top[0].data[...] = rois

    def backward(self, top, propagate_down, bottom):
        pass


class RoiPoolLayer(caffe.Layer):
    """Max over each of pooled x pooled bins of each ROI (integer boxes, as in Fast R-CNN)."""

    def setup(self, bottom, top):
        self.pooled = int(self.param_str_)
        self.calls = []

    def reshape(self, bottom, top):
        top[0].reshape(bottom[1].num, bottom[0].channels, self.pooled, self.pooled)

    def _bins(self, roi):
        b, x1, y1, x2, y2 = (int(v) for v in roi)
        h, w = y2 - y1 + 1, x2 - x1 + 1
        for i in range(self.pooled):
            for j in range(self.pooled):
                r0 = y1 + (i * h) // self.pooled
                r1 = y1 + -((-(i + 1) * h) // self.pooled)
                c0 = x1 + (j * w) // self.pooled
                c1 = x1 + -((-(j + 1) * w) // self.pooled)
                yield b, i, j, r0, r1, c0, c1

    def forward(self, bottom, top):
        self.calls.append(self.phase)
        features = bottom[0].data
        self.argmax = {}
        for r, roi in enumerate(bottom[1].data):
            for b, i, j, r0, r1, c0, c1 in self._bins(roi):
                window = features[b, :, r0:r1, c0:c1].reshape(features.shape[1], -1)
                best = window.argmax(1)
                top[0].data[r, :, i, j] = window[np.arange(len(best)), best]
                self.argmax[r, i, j] = (b, r0, c0, c1 - c0, best)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise ValueError("no gradient for the ROIs")
        if not propagate_down[0]:
            return
        bottom[0].diff[...] = 0
        channels = np.arange(bottom[0].channels)
        for (r, i, j), (b, r0, c0, width, best) in self.argmax.items():
            rows, cols = r0 + best // width, c0 + best % width
            np.add.at(bottom[0].diff, (b, channels, rows, cols), top[0].diff[r, :, i, j])


class ChannelScale(caffe.Layer):
    """y = x * w[c] with a learnable w (one blob), w starting at 2."""

    def setup(self, bottom, top):
        self.blobs.add_blob(bottom[0].channels)
        self.blobs[0].data[...] = 2.0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * self.blobs[0].data[None, :, None, None]

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[...] += (top[0].diff * bottom[0].data).sum((0, 2, 3))
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * self.blobs[0].data[None, :, None, None]


class PhaseLayer(caffe.Layer):
    """No bottoms: a data layer giving [phase, count of param_str words]."""

    def setup(self, bottom, top):
        assert len(bottom) == 0
        top[0].reshape(1, 2)

    def forward(self, bottom, top):
        top[0].data[...] = [self.phase, len(self.param_str.split())]
        assert top[0].count == 2 and top[0].num == 1 and top[0].channels == 2
        assert top[0].height == 1 and top[0].width == 1 and top[0].shape == (1, 2)


class Broken(caffe.Layer):
    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        scale = 1.0 / 0.0   # the user's bug
        top[0].data[...] = bottom[0].data * scale


class NoBackward(caffe.Layer):
    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data


class BadSetup(caffe.Layer):
    def setup(self, bottom, top):
        raise KeyError("threshold")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The user's module, written to a fresh directory under a fresh name; its name."""
    name = f"user_layers_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / f"{name}.py").write_text(USER_LAYERS)
    monkeypatch.syspath_prepend(str(folder))
    yield name
    sys.modules.pop(name, None)


def python_layer(name, module, cls, bottoms, tops, param_str="", extra=""):
    bottom = "".join(f' bottom: "{b}"' for b in bottoms)
    top = "".join(f' top: "{t}"' for t in tops)
    return (f'layer {{ name: "{name}" type: "Python"{bottom}{top} python_param {{ module: "{module}" '
            f'layer: "{cls}" param_str: "{param_str}" }} {extra} }}\n')


def roi_reference(features, rois, pooled):
    """ROI max pooling in torch (autograd gives the reference gradient)."""
    out = []
    for roi in rois.tolist():
        b, x1, y1, x2, y2 = (int(v) for v in roi)
        h, w = y2 - y1 + 1, x2 - x1 + 1
        cells = []
        for i in range(pooled):
            for j in range(pooled):
                r0, r1 = y1 + (i * h) // pooled, y1 + -((-(i + 1) * h) // pooled)
                c0, c1 = x1 + (j * w) // pooled, x1 + -((-(j + 1) * w) // pooled)
                cells.append(features[b, :, r0:r1, c0:c1].amax((1, 2)))
        out.append(torch.stack(cells, 1).reshape(-1, pooled, pooled))
    return torch.stack(out)


def test_proposal_and_roi_pooling_forward_and_backward(user_module):
    text = ('layer { name: "in" type: "Input" top: "features" top: "scores" input_param { '
            'shape { dim: 2 dim: 3 dim: 9 dim: 11 } shape { dim: 2 dim: 1 dim: 6 dim: 8 } } }\n'
            + python_layer("proposal", user_module, "ProposalLayer", ["scores"], ["rois"],
                           "threshold:0.8 size:4")
            + python_layer("roi_pool", user_module, "RoiPoolLayer", ["features", "rois"], ["pool"], "2",
                           "propagate_down: true propagate_down: false"))
    net = sc.Net(text)
    assert net.blob_shapes["rois"] == (1, 5) and net.blob_shapes["pool"] == (1, 3, 2, 2)
    rng = np.random.RandomState(0)
    features = torch.tensor(rng.randn(2, 3, 9, 11), dtype=torch.float32, requires_grad=True)
    scores = torch.tensor(rng.rand(2, 1, 6, 8), dtype=torch.float32)
    out = net.forward(outputs=["rois", "pool"], features=features, scores=scores)
    rois = out["rois"]
    n, y, x = np.nonzero(scores[:, 0].numpy() > 0.8)
    assert rois.shape == (len(n), 5) and len(n) > 3               # the size came from the data
    assert np.array_equal(rois.numpy(), np.stack([n, x, y, x + 3, y + 3], 1))
    reference_input = features.detach().clone().requires_grad_(True)
    reference = roi_reference(reference_input, rois, 2)
    assert torch.allclose(out["pool"], reference)
    grad = torch.tensor(rng.randn(*reference.shape), dtype=torch.float32)
    out["pool"].backward(grad)
    reference.backward(grad)
    assert torch.allclose(features.grad, reference_input.grad, atol=1e-6)
    assert net.layers["roi_pool"].user_layer.calls == [1]      # caffe.TEST


def test_learnable_blobs_train_save_and_load(user_module, tmp_path):
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }\n'
            + python_layer("scale", user_module, "ChannelScale", ["x"], ["y"]))
    net = sc.Net(text, phase="train")
    (weight,) = net.params["scale"]
    assert weight.shape == (3,) and torch.equal(weight.detach(), torch.full((3,), 2.0))
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    y = net.forward(x=x)["y"]
    assert torch.allclose(y, x * 2)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.allclose(weight.grad, (dy * x).sum((0, 2, 3)).detach(), atol=1e-6)
    assert torch.allclose(x.grad, dy * 2)
    with torch.no_grad():                      # a solver step: the user's blob sees it
        weight.copy_(torch.tensor([1.0, -1.0, 0.5]))
    y = net.forward(x=x)["y"]
    assert torch.allclose(y, x * torch.tensor([1.0, -1.0, 0.5]).reshape(1, 3, 1, 1))
    net.save_weights(tmp_path / "w.caffemodel")
    again = sc.Net(text, weights=tmp_path / "w.caffemodel")
    assert torch.equal(again.params["scale"][0].detach(), torch.tensor([1.0, -1.0, 0.5]))


def test_phase_param_str_and_data_layers(user_module):
    for phase, value in (("train", 0.0), ("test", 1.0)):
        net = sc.Net(python_layer("data", user_module, "PhaseLayer", [], ["d"], "a b c"), phase=phase)
        assert net.forward()["d"].tolist() == [[value, 3.0]]


def test_module_from_the_prototxt_directory_and_the_working_directory(tmp_path, monkeypatch):
    name = f"local_layers_{uuid.uuid4().hex[:8]}"
    here = tmp_path / "model"
    here.mkdir()
    (here / f"{name}.py").write_text(USER_LAYERS)
    prototxt = here / "net.prototxt"
    prototxt.write_text(python_layer("data", name, "PhaseLayer", [], ["d"]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    try:
        assert sc.Net(prototxt).forward()["d"].tolist() == [[1.0, 0.0]]
        assert str(here) not in sys.path                  # the directory was only borrowed
        sys.modules.pop(name)
        monkeypatch.chdir(here)
        assert sc.Net(python_layer("data", name, "PhaseLayer", [], ["d"])).forward()["d"].shape == (1, 2)
    finally:
        sys.modules.pop(name, None)


def test_the_shim_is_caffe_only_while_the_user_code_runs(user_module, monkeypatch):
    real = types.ModuleType("caffe")            # stands for an installed pycaffe
    monkeypatch.setitem(sys.modules, "caffe", real)
    net = sc.Net(python_layer("data", user_module, "PhaseLayer", [], ["d"]))
    assert sys.modules["caffe"] is real
    assert sys.modules[user_module].caffe.__name__ == "segaware_caffe.pycaffe_shim"
    net.forward()
    assert sys.modules["caffe"] is real
    monkeypatch.delitem(sys.modules, "caffe")
    sc.Net(python_layer("data", user_module, "PhaseLayer", [], ["d"]))
    assert "caffe" not in sys.modules and "caffe.proto" not in sys.modules


def test_errors_name_the_layer_and_the_users_code(user_module, tmp_path):
    data = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
    with pytest.raises(LayerSetupError, match=r"py \(Python\): python_param.module 'no_such_module' "
                       r"not found on sys.path, in the prototxt's directory"):
        sc.Net(data + python_layer("py", "no_such_module", "X", ["x"], ["y"]))
    with pytest.raises(LayerSetupError, match=rf"py \(Python\): module '{user_module}' \(.*"
                       rf"{user_module}.py\) has no class 'Missing'; its caffe.Layer classes: "
                       rf"BadSetup, Broken, ChannelScale"):
        sc.Net(data + python_layer("py", user_module, "Missing", ["x"], ["y"]))
    with pytest.raises(LayerSetupError, match=rf"py \(Python\): {user_module}.BadSetup.setup raised "
                       rf"KeyError: 'threshold' at .*{user_module}.py:\d+ \(in setup\)"):
        sc.Net(data + python_layer("py", user_module, "BadSetup", ["x"], ["y"]))
    net = sc.Net(data + python_layer("py", user_module, "Broken", ["x"], ["y"]))
    with pytest.raises(PythonLayerError, match=rf"py \(Python\): {user_module}.Broken.forward raised "
                       rf"ZeroDivisionError: float division by zero at .*{user_module}.py:\d+ "
                       rf"\(in forward\)") as info:
        net.forward(x=torch.ones(1, 2))
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    net = sc.Net(data + python_layer("py", user_module, "NoBackward", ["x"], ["y"]))
    x = torch.ones(1, 2, requires_grad=True)
    with pytest.raises(NoBackwardError, match=rf"py \(Python\): {user_module}.NoBackward has no "
                       rf"backward\(\), but a gradient was asked through it"):
        net.forward(x=x)["y"].sum().backward()
    # a module that itself imports something missing says what
    name = f"needs_dep_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import caffe\nimport not_installed_dependency\n")
    with pytest.raises(LayerSetupError, match=rf"module '{name}' could not import "
                       rf"'not_installed_dependency' \(at .*{name}.py:2"):
        sc.Net(data + python_layer("py", name, "X", ["x"], ["y"]), )  # noqa
    missing = 'layer { name: "py" type: "Python" top: "y" python_param { layer: "X" } }'
    with pytest.raises(LayerSetupError, match=r"python_param.module is required"):
        sc.Net(missing)


@pytest.fixture(autouse=True)
def _tmp_on_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
