"""Every reference .prototxt parses (templates filled) and round-trips text <-> binary exactly."""
import re

import pytest
from google.protobuf import text_format

from segaware_caffe.caffe_proto import caffe_pb2, read_net, read_solver
from segaware_caffe.caffe_proto.text import PLACEHOLDER

# One value per `${NAME}` the released templates use (the released run scripts' VOC settings).
TEMPLATE_VARIABLES = {
    "BATCH_SIZE": 10, "CROP_SIZE": 321, "HALF_SIZE": 161, "DATASET": "voc12", "NUM_LABELS": 21,
    "DATA_ROOT": "/data/VOC2012", "EXP": "segaware", "NET_ID": "res", "TRAIN_SET": "train_aug",
    "TEST_SET": "val", "FEATURE_DIR": "segaware/features", "MAIN_LR1": 1, "MAINSCALE_LR1": 1,
    "MAINSCALE_LR2": 2, "EMBS_LR1": 1, "EMBS_LR2": 2, "EMBS_LR3": 0, "CRF_LR1": 1, "CRF_LR2": 1,
    "FINAL_LR1": 10, "FINAL_LR2": 20, "MASK_SIZE": 3, "MASK_PAD": 1, "MASK_DILATION": 1,
    "MASK2_SIZE": 3, "MASK2_PAD": 2, "MASK2_DILATION": 2, "MASK3_SIZE": 3, "MASK3_PAD": 5,
    "MASK3_DILATION": 5, "LEARNING_RATE": 2.5e-4, "ITER_SIZE": 10, "ITERS": 20000, "SNAP": 5000,
    "STEP": 2000, "SOLVER_MODE": "GPU",
}


def _reference_files(reference):
    files = sorted(reference.rglob("*.prototxt"))
    assert len(files) >= 30
    return files


def _is_solver(path):
    return "solver" in path.name


def test_template_variable_set_is_complete(reference):
    used = set()
    for path in _reference_files(reference):
        used |= set(PLACEHOLDER.findall(path.read_text()))
    assert used == set(TEMPLATE_VARIABLES)


def test_every_reference_prototxt_parses_and_round_trips(reference):
    for path in _reference_files(reference):
        reader = read_solver if _is_solver(path) else read_net
        message = reader(path, TEMPLATE_VARIABLES)
        if not _is_solver(path):
            assert len(message.layer) > 0, path
            assert not len(message.layers), path
        text = text_format.MessageToString(message)
        again = type(message)()
        text_format.Parse(text, again)
        assert text_format.MessageToString(again) == text, path
        binary = message.SerializeToString()
        decoded = type(message).FromString(binary)
        assert decoded == message, path
        assert decoded.SerializeToString() == binary, path
        assert text_format.MessageToString(decoded) == text, path


def test_templates_and_their_released_instances_agree(reference):
    """config/vgg/train.prototxt with the instance's values equals train_voc_train_aug.prototxt."""
    config = reference / "segaware" / "config" / "vgg"
    instance = read_net(config / "train_voc_train_aug.prototxt")
    variables = dict(TEMPLATE_VARIABLES, NET_ID=instance.name, BATCH_SIZE=1, CROP_SIZE=321,
                     DATA_ROOT=instance.layer[0].image_data_param.root_folder,
                     EXP="segaware", TRAIN_SET="voc_train_aug")
    template = read_net(config / "train.prototxt", variables)
    assert len(template.layer) == len(instance.layer)
    assert template.layer[0].image_data_param == instance.layer[0].image_data_param
    assert [layer.name for layer in template.layer] == [layer.name for layer in instance.layer]
    assert [layer.type for layer in template.layer] == [layer.type for layer in instance.layer]


def test_golden_nets_parse_and_keep_legacy_inputs(golden):
    for path in sorted((golden).glob("*/*/net.prototxt")):
        net = read_net(path)
        assert len(net.layer) > 0, path
        if len(net.input):
            assert len(net.input) == len(net.input_shape), path  # kept by default
            upgraded = read_net(path, upgrade_inputs=True)
            assert upgraded.layer[0].type == "Input" and not len(upgraded.input)
            assert list(upgraded.layer[0].top) == list(net.input)
    for path in sorted((golden / "solver").glob("*/solver.prototxt")):
        solver = read_solver(path)
        assert solver.type in ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
        assert not solver.HasField("solver_type")


@pytest.mark.parametrize("name", ["mnist_lenet_solver.prototxt", "mnist_lenet_solver_adam.prototxt"])
def test_bvlc_solvers(reference, name):
    solver = read_solver(reference / "bvlc" / name)
    assert solver.net == "examples/mnist/lenet_train_test.prototxt"
    assert re.fullmatch(r"SGD|Adam", solver.type)
    assert solver.solver_mode == caffe_pb2.SolverParameter.GPU
