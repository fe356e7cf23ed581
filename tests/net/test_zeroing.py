"""Net::Forward's element-0 zeroing of net outputs, where no layer overwrites it."""
import torch

import segaware_caffe as sc

# inputs, Reshapes and a constant DummyData top that are net outputs, and one input read twice
ZEROED_NET = """
    name: "t"
    input: "x" input_shape { dim: 1 dim: 2 dim: 2 }
    input: "label" input_shape { dim: 1 dim: 4 }
    input: "y" input_shape { dim: 1 dim: 4 }
    input: "z" input_shape { dim: 1 dim: 4 }
    layer { name: "r" type: "Reshape" bottom: "x" top: "xr" reshape_param { shape { dim: 4 } } }
    layer { name: "q" type: "Power" bottom: "y" top: "q" power_param { scale: 3 } }
    layer { name: "dd" type: "DummyData" top: "c"
            dummy_data_param { shape { dim: 3 } data_filler { type: "constant" value: 1 } } }
    layer { name: "shift" type: "Power" bottom: "c" top: "c" power_param { shift: 5 } }
    layer { name: "rz" type: "Reshape" bottom: "z" top: "zr" reshape_param { shape { dim: 4 } } }
    layer { name: "pz" type: "Power" bottom: "z" top: "pz" power_param { scale: 2 } }
    """


def test_net_forward_zeroes_element_0_of_outputs_no_layer_writes():
    # the fork's Net::Forward sets element 0 of every net output to 0 before the layers run: a
    # fed input that is an output (vgg deploy's `label`), a Reshape of an input (Reshape shares
    # its bottom's memory from set-up on, so every reader of the input sees the 0), a constant
    # DummyData top (an in-place layer then computes f(0) there) keep it; written outputs do not
    net = sc.Net(ZEROED_NET)
    assert net.outputs == ["c", "label", "pz", "q", "xr", "zr"]
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)
    label = torch.tensor([[7.0, 8.0, 9.0, 10.0]])
    y = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = net.forward(outputs=["c", "label", "q", "xr", "x", "zr", "pz"], x=x, label=label, y=y, z=z)
    assert out["label"].tolist() == [[0.0, 8.0, 9.0, 10.0]]
    assert out["xr"].tolist() == [0.0, 2.0, 3.0, 4.0]
    assert out["x"].flatten().tolist() == [0.0, 2.0, 3.0, 4.0]
    assert out["q"].tolist() == [[3.0, 6.0, 9.0, 12.0]]             # y is no output: untouched
    assert out["c"].tolist() == [5.0, 6.0, 6.0]
    # z has two readers, so Caffe reads it through a Split; the Reshape shares the Split top's
    # memory from set-up, but the Split top takes z's memory only in its Forward, after the
    # zeroing: on the first pass no reader of z sees the 0
    assert out["zr"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert out["pz"].tolist() == [[2.0, 4.0, 6.0, 8.0]]
    assert label.tolist() == [[7.0, 8.0, 9.0, 10.0]]                # the caller's tensor is not
    out["xr"].sum().backward()                                       # the gradient passes as in Caffe
    assert x.grad.flatten().tolist() == [1.0, 1.0, 1.0, 1.0]
