"""Every released config builds in the phase it declares; the deploy
nets run forward on random inputs with filler weights at their declared size and a smaller one."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segaware_caffe import caffe_proto
import segaware_caffe as sc
from segaware_caffe.resize import resize_deploy
from tests.conftest import REFERENCE, reference_files

pytestmark = pytest.mark.slow   # every test here builds a released whole net

CONFIG = REFERENCE / "segaware" / "config"
NETS = reference_files(sorted(p for p in CONFIG.glob("*/*.prototxt") if "solver" not in p.name))


def make_dataset(root, n=3, size=(40, 52)):
    """Images, label PNGs and the list files every released config can point at."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(exist_ok=True)
    ids = [f"img{i}" for i in range(n)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        label = rng.integers(0, 5, size, dtype=np.uint8)
        label[:3] = 255
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{i}.png")
    return ids


def config_variables(tmp_path):
    data_root = tmp_path / "VOC"
    ids = make_dataset(data_root)
    exp = tmp_path / "exp"
    (exp / "list").mkdir(parents=True)
    pairs = "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids)
    for split in ("train", "val"):
        (exp / "list" / f"{split}.txt").write_text(pairs)
        (exp / "list" / f"{split}_id.txt").write_text("".join(f"{i}\n" for i in ids))
    (tmp_path / "features").mkdir()
    lr = {k: 1 for k in ("CRF_LR1", "CRF_LR2", "EMBS_LR1", "EMBS_LR2", "EMBS_LR3", "FINAL_LR1",
                         "FINAL_LR2", "MAINSCALE_LR1", "MAINSCALE_LR2", "MAIN_LR1")}
    return dict(lr, BATCH_SIZE=1, CROP_SIZE=321, HALF_SIZE=257, DATASET="voc", DATA_ROOT=data_root,
                EXP=exp, FEATURE_DIR=tmp_path / "features", NET_ID="net", NUM_LABELS=21,
                TRAIN_SET="train", TEST_SET="val", MASK_SIZE=3, MASK_PAD=1, MASK_DILATION=1,
                MASK2_SIZE=3, MASK2_PAD=2, MASK2_DILATION=2, MASK3_SIZE=3, MASK3_PAD=5,
                MASK3_DILATION=5, ITERS=10, ITER_SIZE=1, LEARNING_RATE=0.001, SNAP=5, STEP=5,
                SOLVER_MODE="CPU")


def declared_phase(path):
    return "train" if path.name.startswith("train") else "test"


DATA_TYPES = ("ImageSegData", "TwoImageData", "ImageData")


def point_data_layers_at(net_param, root, ids):
    """The instantiated configs name the author's dataset folders and list files relative to the
    working directory; give them a generated dataset (root_folder and list files only)."""
    for lp in net_param.layer:
        if lp.type == "MatWrite" and lp.mat_write_param.source:
            source = Path(lp.mat_write_param.source)
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_text("".join(f"{i}\n" for i in ids))
        if lp.type not in DATA_TYPES:
            continue
        ip = lp.image_data_param
        if not Path(ip.root_folder).is_dir():
            ip.root_folder = str(root)
        source = Path(ip.source)
        if not source.exists():
            source.parent.mkdir(parents=True, exist_ok=True)
            if lp.type == "ImageData":    # `path integer_label` lines; no padding, so big images
                big = lp.transform_param.crop_size + 3
                Image.new("RGB", (big, big), (90, 120, 150)).save(root / "JPEGImages" / "big.jpg")
                lines = "/JPEGImages/big.jpg 0\n"
            else:
                lines = "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids)
            source.write_text(lines)


@pytest.mark.parametrize("path", NETS, ids=lambda p: f"{p.parent.name}/{p.name}" if p else "reference")
def test_released_config_builds(path, tmp_path, monkeypatch):
    variables = config_variables(tmp_path)
    monkeypatch.chdir(tmp_path)
    text = path.read_text()
    crop = re.search(r"crop_size: (\d+|\$\{CROP_SIZE\})", text)   # HALF_SIZE follows the crop
    if crop:
        size = variables["CROP_SIZE"] if crop.group(1).startswith("$") else int(crop.group(1))
        variables["HALF_SIZE"] = (size + 1) // 2
    net_param = caffe_proto.read_net(path, variables=variables if "${" in text else None)
    point_data_layers_at(net_param, tmp_path / "VOC", ["img0", "img1", "img2"])
    net = sc.Net(net_param, phase=declared_phase(path))
    assert net.records, "no layer built"
    print(f"{path.parent.name}/{path.name}: {len(net.records)} layers, "
          f"{sum(p.numel() for p in net.learnable_params)} parameters, "
          f"{len(net.fused_groups)} fused convolutions")


def init_for_forward(net):
    """Random weights with a 1/sqrt(fan-in) scale and unit BatchNorm statistics, so that a
    101-layer net stays finite (the released fillers are zeros, and zero BatchNorm statistics
    multiply by 1/sqrt(eps) = 316 per layer)."""
    for record in net.records:
        blobs = record.module.caffe_blobs()
        with torch.no_grad():
            if record.type == "BatchNorm":
                blobs[0].zero_(), blobs[1].fill_(1), blobs[2].fill_(1)
                continue
            for p in blobs:
                if record.type == "NormConvMeanfield" or p.lr_mult == 0 and p.dim() < 2:
                    continue
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.normal_(0, fan_in ** -0.5)


# (net, smaller size) — smaller sizes keep the align-corners relations whole (see resize_deploy)
DEPLOY = [("embs", 65), ("vgg", 65), ("res", 129)]


# Every deploy net at a smaller size, and embs/vgg at their declared size too. res at its declared
# 513x513 takes about 10 s a forward plus 20 s to build on 2 cores: bench/cpu_nets.py runs it.
RUNS = [(name, small, False) for name, small in DEPLOY] + [("embs", 0, True), ("vgg", 0, True)]


@pytest.mark.parametrize("name, small, declared", RUNS,
                         ids=[f"{n}-{'declared' if d else 'small'}" for n, _, d in RUNS])
def test_deploy_runs_forward(reference, name, small, declared):
    net_param = caffe_proto.read_net(reference / "segaware" / "config" / name / "deploy.prototxt")
    if not declared:
        net_param = resize_deploy(net_param, small)
    torch.manual_seed(0)
    net = sc.Net(net_param, phase="test")
    init_for_forward(net)
    inputs = {k: torch.randn(s) for k, s in net.input_shapes.items()}
    with torch.no_grad():
        out = net.forward(**inputs)
    assert out, "no outputs"
    for blob, value in out.items():
        assert tuple(value.shape) == net.blob_shapes[blob], blob
        assert torch.isfinite(value).all(), f"{name} deploy: non-finite values in {blob}"
