"""How a Solver builds and feeds its nets: named test nets, and the train net's blobs shared
into test layers of the same name."""
import torch


def test_named_test_nets_need_no_test_interval(tmp_path):
    # Caffe asks for test_interval > 0 only for test nets made from the generic `net`
    from segaware_caffe.solver import Solver
    from tests.solver.toy_layers import TOY_NET
    (tmp_path / "net.prototxt").write_text(TOY_NET)
    (tmp_path / "solver.prototxt").write_text(
        'train_net: "net.prototxt" test_net: "net.prototxt" test_iter: 1 lr_policy: "fixed"')
    solver = Solver(tmp_path / "solver.prototxt")
    assert len(solver.test_nets) == 1


def test_test_nets_take_the_last_same_named_train_layer_like_caffe(tmp_path):
    # Net::ShareTrainedLayersWith walks the train layers in order and gives each one's data to
    # the first test layer of that name: with duplicate train names the last one wins
    from segaware_caffe.solver import Solver
    train = """
    name: "t"
    input: "x" input_shape { dim: 1 dim: 2 }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a" inner_product_param { num_output: 2 weight_filler { type: "constant" value: 1 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 2 weight_filler { type: "constant" value: 3 } } }
    layer { name: "loss" type: "Power" bottom: "b" top: "loss" loss_weight: 1 }
    """
    test = """
    name: "t"
    input: "x" input_shape { dim: 1 dim: 2 }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a" inner_product_param { num_output: 2 } }
    """
    (tmp_path / "train.prototxt").write_text(train)
    (tmp_path / "test.prototxt").write_text(test)
    (tmp_path / "solver.prototxt").write_text(
        'train_net: "train.prototxt" test_net: "test.prototxt" test_iter: 1 lr_policy: "fixed"')
    solver = Solver(tmp_path / "solver.prototxt")
    solver._share_trained_layers(solver.test_nets[0])
    assert torch.equal(solver.test_nets[0].params["ip"][0], torch.full((2, 2), 3.0))
