"""cv_resize_linear_u8 reproduces OpenCV's 8-bit INTER_LINEAR resize bit for bit (checked against
cv2 where it is installed), and keeps the properties of a bilinear resize without it."""
import numpy as np
import pytest

from segaware_caffe.data.images import cv_resize_linear_u8, resize_bilinear

CASES = [((10, 12), (5, 5)), ((7, 9), (8, 6)), ((1, 5), (6, 6)), ((6, 1), (5, 1)),
         ((40, 30), (20, 15)), ((33, 17), (227, 227)), ((300, 401), (31, 517)), ((9, 9), (9, 9))]


@pytest.mark.parametrize("source, size", CASES)
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_matches_opencv(source, size, channels):
    cv2 = pytest.importorskip("cv2", reason="the bit-exact comparison needs opencv-python")
    image = np.random.default_rng(source[0] * 7 + channels).integers(
        0, 256, source + (channels,), dtype=np.uint8)
    ref = cv2.resize(image if channels > 1 else image[:, :, 0], size[::-1],
                     interpolation=cv2.INTER_LINEAR)
    got = cv_resize_linear_u8(image if channels > 1 else image[:, :, 0], *size)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def test_random_shapes_match_opencv():
    cv2 = pytest.importorskip("cv2", reason="the bit-exact comparison needs opencv-python")
    rng = np.random.default_rng(0)
    for _ in range(200):
        (rows, cols), (height, width) = rng.integers(1, 30, 2), rng.integers(1, 45, 2)
        image = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8)
        np.testing.assert_array_equal(cv_resize_linear_u8(image, height, width),
                                      cv2.resize(image, (int(width), int(height))))


def test_properties_without_opencv():
    rng = np.random.default_rng(1)
    flat = np.full((7, 11, 3), 77, np.uint8)
    assert (cv_resize_linear_u8(flat, 13, 4) == 77).all()
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    same = cv_resize_linear_u8(image, 12, 10)
    np.testing.assert_array_equal(same, image)
    assert same is not image
    # an exact halving is OpenCV's 2x2 average, rounded half up
    halved = cv_resize_linear_u8(image, 6, 5).astype(int)
    blocks = image.astype(int).reshape(6, 2, 5, 2, 3).sum(axis=(1, 3))
    np.testing.assert_array_equal(halved, (blocks + 2) // 4)
    # otherwise within a level of a float bilinear resize
    for size in ((9, 7), (25, 31)):
        diff = cv_resize_linear_u8(image, *size).astype(int) - resize_bilinear(image, *size).astype(int)
        assert np.abs(diff).max() <= 1


def test_input_checks():
    with pytest.raises(TypeError, match="needs uint8"):
        cv_resize_linear_u8(np.zeros((3, 3), np.float32), 2, 2)
    with pytest.raises(ValueError, match="cannot resize to 0x2"):
        cv_resize_linear_u8(np.zeros((3, 3), np.uint8), 0, 2)
