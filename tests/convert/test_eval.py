"""`segaware-caffe eval` against an IoU table computed by hand on five tiny label maps."""
import math

import numpy as np
import pytest
from PIL import Image

from segaware_caffe.data import DataError
from segaware_caffe.tools.cli import main
from segaware_caffe.tools.cmd_eval import evaluate, read_ids

# (ground truth, prediction); 255 = ignore. Counted by hand (rows gt, columns prediction):
#        pred 0  1  2
#   gt 0     7  1  1      IoU0 = 7 / (9 + 10 - 7) = 7/12
#   gt 1     2  5  0      IoU1 = 5 / (7 + 7 - 5)  = 5/9
#   gt 2     1  1  5      IoU2 = 5 / (7 + 6 - 5)  = 5/8
# class 3 appears nowhere -> nan, not averaged; image c is all ignore (its predictions never count).
IMAGES = {
    "a": ([[0, 0, 1], [1, 1, 255]], [[0, 1, 1], [1, 0, 2]]),
    "b": ([[2, 2, 2], [0, 0, 0]], [[2, 2, 0], [0, 0, 0]]),
    "c": ([[255] * 3] * 2, [[1] * 3] * 2),
    "d": ([[1, 2, 0], [2, 1, 0]], [[1, 2, 0], [2, 1, 0]]),
    "e": ([[0, 1, 2], [0, 1, 2]], [[2, 1, 2], [0, 0, 1]]),
}
EXPECTED_IOU = [7 / 12, 5 / 9, 5 / 8, math.nan]
EXPECTED_CONFUSION = [[7, 1, 1, 0], [2, 5, 0, 0], [1, 1, 5, 0], [0, 0, 0, 0]]


def save_palette_png(path, labels):
    image = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    image.putpalette([v for i in range(256) for v in (i * 37 % 256, i * 91 % 256, i * 53 % 256)])
    image.save(path)


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    for image_id, (gt, pred) in IMAGES.items():
        save_palette_png(tmp_path / "gt" / f"{image_id}.png", gt)
        save_palette_png(tmp_path / "pred" / f"{image_id}.png", pred)
    (tmp_path / "ids.txt").write_text("\n".join(IMAGES) + "\n")
    (tmp_path / "pairs.txt").write_text("".join(f"/JPEGImages/{i}.jpg /Seg/{i}.png\n" for i in IMAGES))
    return tmp_path


def test_iou_table_matches_hand_count(dataset):
    result = evaluate(dataset / "pred", dataset / "gt", read_ids(dataset / "ids.txt"), num_classes=4)
    assert result.confusion.tolist() == EXPECTED_CONFUSION
    np.testing.assert_allclose(result.iou, EXPECTED_IOU, rtol=0, atol=1e-12, equal_nan=True)
    assert result.mean_iou == pytest.approx((7 / 12 + 5 / 9 + 5 / 8) / 3, abs=1e-12)
    assert result.pixel_accuracy == pytest.approx(17 / 23)


def test_cli_prints_the_table(dataset, capsys):
    assert main(["eval", "--pred", str(dataset / "pred"), "--gt", str(dataset / "gt"),
                 "--list", str(dataset / "pairs.txt"), "--num-classes", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:5]}
    # gt pixels (row sums), predicted pixels (column sums), IoU
    assert rows == {"0": ["9", "10", "58.33"], "1": ["7", "7", "55.56"], "2": ["7", "6", "62.50"],
                    "3": ["0", "0", "nan"]}
    assert lines[6].split()[-1] == "58.80" and lines[6].startswith("mean IoU")
    # aligned columns: every row ends where the header does, numbers are right-aligned under it
    assert len({len(line) for line in lines[:5] + lines[6:7]}) == 1
    for column in ("gt pixels", "predicted"):
        end = lines[0].index(column) + len(column)
        assert all(line[end - 1] != " " and (end == len(line) or line[end] == " ")
                   for line in lines[1:5]), column


def test_ignore_label_is_configurable(dataset):
    # with no ignore label, gt 255 is outside 0..3 and is reported
    with pytest.raises(DataError, match=r"a.png: ground truth has label 255 outside 0..3"):
        evaluate(dataset / "pred", dataset / "gt", ["a"], num_classes=4, ignore_label=None)


def test_errors_name_the_image(dataset, capsys):
    save_palette_png(dataset / "pred" / "b.png", [[0, 0], [0, 0]])
    assert main(["eval", "--pred", str(dataset / "pred"), "--gt", str(dataset / "gt"),
                 "--list", str(dataset / "ids.txt"), "--num-classes", "4"]) == 1
    assert "b.png: prediction is 2x2, ground truth 3x2" in capsys.readouterr().err
    (dataset / "pred" / "e.png").unlink()
    with pytest.raises(DataError, match=r"no prediction for 1 of 5 ids \(first: e.png, or the score map e_blob_0.mat\)"):
        evaluate(dataset / "pred", dataset / "gt", list(IMAGES), num_classes=4)
