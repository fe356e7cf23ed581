"""The one tolerance table of the test suite, and the comparisons that apply it.

Golden numbers (float32, from the original Caffe): |got - ref| <= REL |ref| + ABSFRAC max|ref|
elementwise, where max|ref| is the largest magnitude of that reference array; entries equal to
FLT_MAX/100 (removed Im2dist taps) must match exactly and are left out of max|ref|;
integer-valued outputs (labels, indices, parity maps) are exact. A floor of 1e-7 absorbs float32
noise in gradients whose true value is exactly 0 by cancellation.
"""
import numpy as np

BIG = np.float32(3.4028235e36)     # FLT_MAX / 100: what Im2dist writes for a removed tap

REL = 1e-4                          # relative part, per element
ABSFRAC = 1e-5                      # absolute part, as a fraction of max|ref|
FLOOR = 1e-7                        # absolute floor (cancellation noise)
# solver trajectories: the adaptive rules divide by sqrt(history), which amplifies float32 noise
ADAPTIVE_SOLVER_FACTOR = 10
# whole nets: gradients by max error relative to the largest gradient (with an absolute floor of
# NET_GRAD_FLOOR x the case's largest gradient), intermediate diffs by L2
NET_GRAD_MAXREL = 1e-3
NET_GRAD_FLOOR = 1e-5
NET_DIFF_L2 = 1e-2
# one implementation against another, both ours (no golden numbers): the fused segmentation-aware
# convolution against its unfused layers (float32 sums in another order), an exported module
# against the Net it came from (the same operations), a solver against its float64 reference
FUSED_OUT_MAXREL = 1e-5
FUSED_GRAD_MAXREL = 1e-4
EXPORT_MAXREL = 1e-6
# an ONNX graph run by onnxruntime against the Net (other kernels, other summation orders), by
# max error relative to max|ref| per output; removed Im2dist taps (BIG) must match exactly
ONNX_MAXREL = 1e-4
SOLVER_HISTORY_ABSFRAC = 1e-6


def as_array(x):
    """float64 numpy array of an array, number or tensor (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(got, ref, what, exact=False, rel=REL, absfrac=ABSFRAC, floor=0.0):
    """The golden tolerance (module docstring), elementwise; returns max|got - ref| / max|ref|."""
    got = np.atleast_1d(as_array(got))
    ref = np.atleast_1d(as_array(ref))
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    big = ref == np.float64(BIG)
    if big.any():
        wrong = np.argwhere(big & (got != ref))
        assert not len(wrong), f"{what}: removed taps (FLT_MAX/100) differ, first at {tuple(wrong[0])}"
    if exact:
        bad = np.argwhere(got != ref)
        assert not len(bad), (f"{what}: integer output differs at {tuple(bad[0])}: "
                              f"got {got[tuple(bad[0])]}, expected {ref[tuple(bad[0])]}")
        return 0.0
    keep = ~big
    if not keep.any():
        return 0.0
    scale = np.abs(ref[keep]).max() if keep.any() else 0.0
    err = np.abs(got - ref)
    err[big] = 0
    tol = rel * np.abs(ref) + absfrac * scale + floor + FLOOR
    bad = err > tol
    worst = np.unravel_index(np.argmax(err - tol), err.shape) if err.size else ()
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.size} entries off; max abs error "
                           f"{err.max():.3g} at {tuple(int(i) for i in worst)} (got {got[worst]:.7g}, "
                           f"expected {ref[worst]:.7g}), max|ref| {scale:.3g}")
    return float(err.max() / scale) if scale else float(err.max())


def assert_close_l2(got, ref, what, limit=NET_DIFF_L2):
    got, ref = as_array(got), as_array(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    norm = np.linalg.norm(ref)
    err = np.linalg.norm(got - ref) / norm if norm else np.linalg.norm(got)
    assert err <= limit, f"{what}: relative L2 error {err:.3g} > {limit}"
    return float(err)


def max_relative_error(got, ref, floor=0.0):
    """max|got - ref| / max(max|ref|, floor) over the entries where ref is not NaN (NaNs must sit
    in the same places); for implementation-against-implementation checks."""
    got, ref = as_array(got), as_array(ref)
    assert got.shape == ref.shape, f"shape {got.shape}, expected {ref.shape}"
    assert (np.isnan(got) == np.isnan(ref)).all(), "NaNs in different places"
    finite = ~np.isnan(ref)
    if not finite.any():
        return 0.0
    scale = max(float(np.abs(ref[finite]).max()), floor)
    diff = float(np.abs(got[finite] - ref[finite]).max())
    return diff / scale if scale else diff


def onnx_relative_error(got, ref):
    """max|got - ref| / max|ref| over the entries that are not BIG (removed Im2dist taps), which
    must sit in the same places; NaNs must too."""
    got, ref = as_array(got), as_array(ref)
    assert got.shape == ref.shape, f"shape {got.shape}, expected {ref.shape}"
    big = ref == np.float64(BIG)
    assert (big == (got == np.float64(BIG))).all(), "removed taps (FLT_MAX/100) differ"
    return max_relative_error(np.where(big, 0.0, got), np.where(big, 0.0, ref))


def is_integer_valued(ref):
    return ref.size > 1 and np.all(np.isfinite(ref)) and np.all(ref == np.round(ref))
