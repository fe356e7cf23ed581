"""Layers the original cannot backpropagate through (no Backward at all, or one that aborts for
a label, index or selector bottom): the net refuses a gradient asked there with a
NoBackwardError naming the layer, and asks none where Caffe computes none (propagate_down:
false, a bottom no learnable layer feeds). Every such layer type is checked through sc.Net."""
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe.errors import NoBackwardError
from segaware_caffe.layer import layer_class, registered_types


def _labels(shape, high, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, high, size=shape).astype(np.float32))


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _priors(count):
    """A PriorBox top (1, 2, 4 * count): boxes inside the unit square, then variances."""
    corner = _rand(count, 2, seed=3) * 0.5
    boxes = torch.cat([corner, corner + 0.4], 1).reshape(-1)
    return torch.stack([boxes, torch.full_like(boxes, 0.1)]).reshape(1, 2, -1)


@dataclass
class Case:
    type: str
    params: str                 # the rest of the layer's text
    bottoms: list               # [tensor], in bottom order
    refused: int                # the bottom a learnable layer feeds
    tops: int = 1
    phase: str = "test"
    ids: str = ""
    extra_inputs: dict = field(default_factory=dict)


def _dims(n, h, w):
    return torch.tensor([float(h), float(w)]).repeat(n).reshape(n, 2, 1, 1)


CASES = [
    # no backward at all
    Case("Accuracy", "", [_randn(4, 3), torch.tensor([0.0, 2, 1, 1])], 0),
    Case("ArgMax", "argmax_param { axis: 1 }", [_randn(2, 3)], 0),
    Case("Threshold", "threshold_param { threshold: 0.1 }", [_randn(2, 3)], 0),
    Case("SegAccuracy", "", [_randn(2, 3, 2, 3), _labels((2, 1, 2, 3), 3)], 0),
    Case("Im2parity", "convolution_param { kernel_size: 3 pad: 1 }", [_labels((2, 1, 4, 5), 3)], 0),
    Case("UniqueLabel", "unique_label_param { max_labels: 4 }", [_labels((2, 1, 3, 3), 3)], 0),
    Case("AdaptiveBiasChannel", "adaptive_bias_channel_param { num_iter: 2 }",
         [_randn(2, 4, 3, 3), torch.tensor([0.0, 2, -1, 1, -1, -1]).reshape(2, 3, 1, 1)], 0),
    Case("DenseCRF", "dense_crf_param { pos_w: 1 pos_xy_std: 1 max_iter: 2 }",
         [_randn(1, 2, 3, 4), _dims(1, 3, 4)], 0),
    Case("DomainTransformForwardOnly", "",
         [_randn(2, 2, 3, 4), _rand(2, 1, 3, 4), _dims(2, 3, 4)], 0),
    Case("NospConvMeanfield", "param { lr_mult: 0 } param { lr_mult: 0 } norm_conv_meanfield_param "
         "{ num_iterations: 2 kernel_size: 3 pad: 1 dilation: 1 scale: 1 }",
         [_randn(1, 2, 3, 3), _randn(1, 2, 3, 3), _randn(1, 2, 3, 3)], 2),
    Case("PriorBox", "prior_box_param { min_size: 4 }", [_randn(1, 2, 3, 3), _randn(1, 3, 9, 9)], 0),
    Case("DetectionOutput", "detection_output_param { num_classes: 2 }",
         [_randn(1, 16), _rand(1, 8), _priors(4)], 0),
    Case("Augmentation", "aug_param { num_transformations: 1 min_translation: 0.2 max_translation: 0.2 }",
         [_rand(1, 3, 6, 6), _rand(1, 3, 6, 6), _randn(1, 2, 6, 6)], 0, tops=4),
    Case("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }",
         [_rand(1, 2, 4, 4)], 0, ids="Pooling-STOCHASTIC-TEST"),
    # bottoms the original refuses
    Case("SoftmaxWithLoss", "", [_randn(4, 3), torch.tensor([0.0, 2, 1, 1])], 1),
    Case("HingeLoss", "", [_randn(4, 3), torch.tensor([0.0, 2, 1, 1])], 1),
    Case("MultinomialLogisticLoss", "", [_rand(4, 3) + 0.1, torch.tensor([0.0, 2, 1, 1])], 1),
    Case("SigmoidCrossEntropyLoss", "", [_randn(4, 3), _rand(4, 3)], 1),
    Case("InfogainLoss", "", [_rand(4, 3) + 0.1, torch.tensor([0.0, 2, 1, 1]), torch.eye(3).reshape(1, 1, 3, 3)],
         1, ids="InfogainLoss-label"),
    Case("InfogainLoss", "", [_rand(4, 3) + 0.1, torch.tensor([0.0, 2, 1, 1]), torch.eye(3).reshape(1, 1, 3, 3)],
         2, ids="InfogainLoss-H"),
    Case("ContrastiveLoss", "", [_randn(4, 3, 1, 1), _randn(4, 3, 1, 1),
                                 torch.tensor([1.0, 0, 0, 1]).reshape(4, 1, 1, 1)], 2),
    Case("SmoothL1Loss", "", [_randn(2, 3), _randn(2, 3), _rand(2, 3)], 2),
    Case("DistLoss", "convolution_param { kernel_size: 3 } dist_loss_param { alpha: 0.5 beta: 2 }",
         [_rand(1, 9, 4, 4), _labels((1, 9, 4, 4), 2)], 1),
    Case("Embed", "embed_param { num_output: 2 input_dim: 3 }", [torch.tensor([0.0, 1, 2, 2])], 0),
    Case("BatchReindex", "", [_randn(4, 2), torch.tensor([1.0, 0.0, 3.0])], 1),
    Case("Filter", "", [_randn(3, 2), torch.tensor([1.0, 0.0, 1.0])], 1),
    Case("BiasChannel", "", [_randn(1, 3, 2, 2), torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1)], 1),
    Case("DomainTransform", "", [_randn(2, 2, 3, 4), _rand(2, 1, 3, 4), _dims(2, 3, 4)], 2),
    Case("LSTMUnit", "", [_randn(1, 2, 3), _randn(1, 2, 12), torch.tensor([[1.0, 0.0]])], 2, tops=2),
    Case("RNN", "recurrent_param { num_output: 2 weight_filler { type: \"gaussian\" } }",
         [_randn(3, 2, 4), torch.tensor([[0.0, 0.0], [1, 1], [1, 0]])], 1),
    Case("LSTM", "recurrent_param { num_output: 2 weight_filler { type: \"gaussian\" } }",
         [_randn(3, 2, 4), torch.tensor([[0.0, 0.0], [1, 1], [1, 0]])], 1),
]
# registered types that refuse gradients but have no tops: no gradient can be asked through them
NO_TOPS = {"HDF5Output"}


def case_net(case, *, learnable=True, propagate_down=None, force_backward=False):
    """Inputs b0.. for the bottoms; a learnable scalar (Scale, lr_mult 1) in front of the refused
    bottom when `learnable`; the layer `t`; loss weight 1 on its first top."""
    lines = [f"force_backward: {str(force_backward).lower()}"]
    for i, b in enumerate(case.bottoms):
        dims = " ".join(f"dim: {d}" for d in b.shape)
        lines.append(f'input: "b{i}" input_shape {{ {dims} }}')
    bottoms = [f"b{i}" for i in range(len(case.bottoms))]
    if learnable:
        lines.append(f'layer {{ name: "w" type: "Scale" bottom: "b{case.refused}" top: "w" '
                     f'scale_param {{ axis: 0 num_axes: 0 }} }}')
        bottoms[case.refused] = "w"
    tops = " ".join(f'top: "t{i}"' for i in range(case.tops))
    weights = " ".join(f"loss_weight: {1 if i == 0 else 0}" for i in range(case.tops))
    propagate = "" if propagate_down is None else " ".join(
        f"propagate_down: {str(p).lower()}" for p in propagate_down)
    bottom_text = " ".join(f'bottom: "{b}"' for b in bottoms)
    lines.append(f'layer {{ name: "t" type: "{case.type}" {bottom_text} {tops} {weights} '
                 f'{propagate} {case.params} }}')
    return sc.Net("\n".join(lines), phase=case.phase)


def case_feeds(case):
    return {f"b{i}": b.clone() for i, b in enumerate(case.bottoms)}


def refusal_pattern(case):
    net = case_net(case)
    if net.layers["t"].has_backward():
        return (rf"t \({case.type}\) cannot backpropagate into bottom {case.refused} \('w'\) in "
                r"the original Caffe, but a gradient was asked of 'w'; set propagate_down: false")
    return rf"t \({case.type}\) has no backward in the original Caffe"


@pytest.mark.parametrize("case", CASES, ids=[c.ids or c.type for c in CASES])
def test_a_learnable_layer_feeding_the_bottom_makes_backward_raise(case):
    net = case_net(case)
    out = net.forward(**case_feeds(case))
    with pytest.raises(NoBackwardError, match=refusal_pattern(case)):
        net.loss(out).backward()
    with torch.no_grad():          # a forward without gradients asks for none
        net.forward(**case_feeds(case))


@pytest.mark.parametrize("case", CASES, ids=[c.ids or c.type for c in CASES])
def test_propagate_down_false_on_the_bottom_asks_no_gradient(case):
    layer = case_net(case).layers["t"]
    flags = [i != case.refused and not layer.refuses_gradient(i, len(case.bottoms))
             for i in range(len(case.bottoms))]
    net = case_net(case, propagate_down=flags)
    feeds = case_feeds(case)
    for i, x in feeds.items():     # the other bottoms learn: their gradients still flow
        if flags[int(i[1:])]:
            x.requires_grad_()
    loss = net.loss(net.forward(**feeds))
    if loss.requires_grad:
        loss.backward()
    assert net.params["w"][0].grad is None
    assert all(x.grad is not None for i, x in feeds.items() if flags[int(i[1:])])


@pytest.mark.parametrize("case", CASES, ids=[c.ids or c.type for c in CASES])
def test_a_bottom_no_learnable_layer_feeds_raises_nothing(case):
    """The refused bottom straight from a net input (a label from a data layer): Caffe computes
    no diff for it, so nothing is refused; the bottoms the layer does backpropagate into learn."""
    net = case_net(case, learnable=False)
    feeds = case_feeds(case)
    learning = [i for i in range(len(case.bottoms))
                if net.layers["t"].has_backward() and not net.layers["t"].refuses_gradient(
                    i, len(case.bottoms)) and feeds[f"b{i}"].is_floating_point()]
    for i in learning:
        feeds[f"b{i}"].requires_grad_()
    loss = net.loss(net.forward(**feeds))
    if loss.requires_grad:
        loss.backward()
    assert all(feeds[f"b{i}"].grad is not None for i in learning)


@pytest.mark.parametrize("type_name", [t for t in registered_types()
                                       if layer_class(t).__module__.startswith("segaware_caffe.")
                                       and (not layer_class(t).HAS_BACKWARD
                                            or layer_class(t).NO_GRAD_BOTTOMS)])
def test_every_layer_type_that_refuses_gradients_is_checked_here(type_name):
    if type_name in NO_TOPS:
        assert layer_class(type_name).TOPS == (0, 0)
        return
    covered = {(c.type, c.refused) for c in CASES}
    cls = layer_class(type_name)
    assert any(t == type_name for t, _ in covered), f"add a Case for {type_name}"
    for i in cls.NO_GRAD_BOTTOMS:
        case = next(c for c in CASES if c.type == type_name)
        index = i % len(case.bottoms)
        assert (type_name, index) in covered, f"add a Case for bottom {index} of {type_name}"


def test_a_data_layer_label_is_not_refused_also_under_force_backward():
    """A label from DummyData: no diff in Caffe, and force_backward does not force one into a
    loss's label (AllowForceBackward)."""
    net = sc.Net('force_backward: true input: "s" input_shape { dim: 4 dim: 3 } '
                 'layer { name: "d" type: "DummyData" top: "l" dummy_data_param { shape { dim: 4 } '
                 'data_filler { type: "constant" value: 2 } } } '
                 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" }')
    s = _randn(4, 3).requires_grad_()
    net.loss(net.forward(s=s)).backward()
    assert s.grad is not None


def test_force_backward_into_an_index_bottom_is_refused():
    """force_backward asks Embed's Backward for its index bottom's diff, where the original
    aborts; a loss's label is spared (AllowForceBackward)."""
    net = sc.Net('force_backward: true '
                 'layer { name: "d" type: "DummyData" top: "i" dummy_data_param { shape { dim: 4 } '
                 'data_filler { type: "constant" value: 1 } } } '
                 'layer { name: "e" type: "Embed" bottom: "i" top: "y" '
                 'embed_param { num_output: 2 input_dim: 3 } }')
    with pytest.raises(NoBackwardError, match=r"e \(Embed\) cannot backpropagate into bottom 0"):
        net.forward()["y"].sum().backward()


def test_learnable_blobs_of_a_layer_without_backward_are_refused():
    case = next(c for c in CASES if c.type == "NospConvMeanfield")
    trains = Case(case.type, case.params.replace("param { lr_mult: 0 } param { lr_mult: 0 } ", ""),
                  case.bottoms, case.refused)
    net = case_net(trains, learnable=False)
    with pytest.raises(NoBackwardError, match=r"t \(NospConvMeanfield\) has no backward in the "
                                              r"original Caffe, but a gradient was asked of its "
                                              r"learnable blobs; set their lr_mult to 0"):
        net.loss(net.forward(**case_feeds(case))).backward()
    frozen = case_net(case, learnable=False)       # lr_mult 0: nothing asked
    assert not frozen.loss(frozen.forward(**case_feeds(case))).requires_grad


def test_a_configuration_without_backward_names_it():
    case = next(c for c in CASES if c.type == "Pooling")
    with pytest.raises(NoBackwardError, match=r"t \(Pooling\) has no backward in the original "
                                              r"Caffe as configured \(method=STOCHASTIC.*phase=TEST\)"):
        net = case_net(case)
        net.loss(net.forward(**case_feeds(case))).backward()
    train = case_net(Case(**{**case.__dict__, "phase": "train"}))
    assert train.layers["t"].has_backward()
    train.loss(train.forward(**case_feeds(case))).backward()
    assert train.params["w"][0].grad is not None
