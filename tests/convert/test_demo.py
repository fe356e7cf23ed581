"""`segaware-caffe demo` at a small size: it writes its pictures, the segmentation-aware filter
smooths the photo yet keeps the object boundaries that a box blur of the same window washes out."""
import time

import numpy as np
import pytest
from PIL import Image

from segaware_caffe.tools.cli import main
from segaware_caffe.tools.cmd_demo import load_photo, synthetic_photo

SIZE = 96


def edge_maps(labels):
    """Pixel pairs (horizontal and vertical neighbours) on a segment boundary / inside a segment."""
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:, :] != labels[:-1, :]
    return horizontal, vertical


def contrasts(image, labels):
    """Mean |difference| of neighbouring pixels across boundaries and inside segments."""
    image = image.astype(np.float64)
    dx = np.abs(image[:, 1:] - image[:, :-1]).sum(-1)
    dy = np.abs(image[1:, :] - image[:-1, :]).sum(-1)
    h, v = edge_maps(labels)
    across = np.concatenate([dx[h], dy[v]]).mean()
    inside = np.concatenate([dx[~h], dy[~v]]).mean()
    return across, inside


@pytest.mark.slow
def test_demo_pictures(tmp_path, capsys):
    start = time.time()
    assert main(["demo", "--size", str(SIZE), "--out", str(tmp_path)]) == 0
    seconds = time.time() - start
    out = capsys.readouterr().out
    assert "blobs bit-identical" in out and str(tmp_path) in out
    pictures = {name: np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"))
                for name in ("photo", "box_blur", "segaware_filtered", "comparison", "attention_masks")}
    _, labels = load_photo(SIZE)
    photo, box, filtered = pictures["photo"], pictures["box_blur"], pictures["segaware_filtered"]
    assert photo.shape == box.shape == filtered.shape == (*labels.shape, 3)
    assert np.abs(filtered.astype(int) - photo).mean() > 1.0, "the filter left the photo unchanged"
    across = {name: contrasts(image, labels) for name, image in
              (("photo", photo), ("box", box), ("segaware", filtered))}
    kept_segaware = across["segaware"][0] / across["photo"][0]
    kept_box = across["box"][0] / across["photo"][0]
    smoothed = across["segaware"][1] / across["photo"][1]
    print(f"demo at {SIZE} px in {seconds:.1f} s: boundary contrast kept {kept_segaware:.2f} "
          f"(segmentation-aware) vs {kept_box:.2f} (box blur); contrast inside segments "
          f"{smoothed:.2f} of the photo's")
    assert kept_segaware > 0.8 and kept_segaware > kept_box + 0.25
    assert smoothed < 0.8, "the segmentation-aware filter did not smooth inside segments"
    assert pictures["attention_masks"].std() > 20


def test_bundled_photo_is_the_generator_output():
    image, labels = synthetic_photo()
    photo, bundled_labels = load_photo()
    assert np.array_equal(bundled_labels, labels)
    assert np.abs(photo[0].permute(1, 2, 0).numpy() - image).max() <= 0.5 / 255 + 1e-6
    assert len(np.unique(labels)) == 8


def test_demo_round_trip_of_a_released_config(reference, tmp_path):
    from segaware_caffe.tools.cmd_demo import weights_round_trip
    assert weights_round_trip(tmp_path, reference / "segaware/config/embs/deploy.prototxt") == 13  # 6 convolutions (W, b) + the position Scale
