"""DenseCRF: the permutohedral lattice and the mean-field inference against a slow scalar
transcription of the original (DeepLab's densecrf_layer / permutohedral / densecrf_util, the SSE
paths an x86 build compiles: a dict for the hash table, Python loops over points, numpy float32
scalars for every operation), the lattice filter against the exact Gaussian within the lattice's
known approximation, and the layer's behaviours and errors."""
import math

import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe import LayerSetupError
from segaware_caffe.caffe_proto import read_net
from segaware_caffe.errors import NoBackwardError
from segaware_caffe.kernels.dense_crf import Permutohedral, exp_and_normalize, fast_exp, pixel_features
from tests.layers.helpers import build

f32 = np.float32


# ------------------------------------------------------------------ scalar transcription
def ref_fast_exp(x):
    x = f32(x)
    less_zero = True
    if x < 0:
        less_zero = False
        x = -x
    if x > 20:
        return f32(0)
    mult = 0
    while float(x) > 0.69 * 2 * 2 * 2:
        mult += 3
        x = f32(x / f32(8))
    while float(x) > 0.69 * 2 * 2:
        mult += 2
        x = f32(x / f32(4))
    while float(x) > 0.69:
        mult += 1
        x = f32(x / f32(2))
    c = [f32(v) for v in (0.9999999995, 0.4999999206, 0.1666653019, 0.0416573475, 0.0083013598,
                          0.0013298820, 0.0001413161)]
    t = f32(c[5] - f32(x * c[6]))
    for k in (4, 3, 2, 1, 0):
        t = f32(c[k] - f32(x * t))
    x = f32(f32(1) - f32(x * t))
    for _ in range(mult):
        x = f32(x * x)
    return f32(f32(1) / x) if less_zero else x


def short(v):
    return (int(v) + 32768) % 65536 - 32768


class RefLattice:
    """Permutohedral::init / compute, one point at a time (the SSE init also inserts the vertices
    of zero features in the padding slots of its last block of four)."""

    def __init__(self, features):
        n, d = features.shape
        self.n, self.d = n, d
        inv_std_dev = f32(math.sqrt(2.0 / 3.0) * (d + 1))
        scale = [f32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std_dev)) for i in range(d)]
        canonical = [[i if j <= d - i else i - (d + 1) for j in range(d + 1)] for i in range(d + 1)]
        down, up = f32(f32(1) / f32(d + 1)), f32(d + 1)
        self.table = {}
        self.offset, self.weight = [], []
        for k in range(n + (-n) % 4):
            f = features[k] if k < n else np.zeros(d, np.float32)
            el = [f32(0)] * (d + 1)
            sm = f32(0)
            for j in range(d, 0, -1):
                cf = f32(f32(f[j - 1]) * scale[j - 1])
                el[j] = f32(sm - f32(f32(j) * cf))
                sm = f32(sm + cf)
            el[0] = sm
            rem0, total = [], 0
            for i in range(d + 1):
                v = f32(np.rint(f32(down * el[i])))
                rem0.append(f32(v * up))
                total += int(v)
            rank = [0] * (d + 1)
            for i in range(d):
                di = f32(el[i] - rem0[i])
                for j in range(i + 1, d + 1):
                    if di < f32(el[j] - rem0[j]):
                        rank[i] += 1
                    else:
                        rank[j] += 1
            for i in range(d + 1):
                rank[i] += total
                if rank[i] < 0:
                    rank[i] += d + 1
                    rem0[i] = f32(rem0[i] + f32(d + 1))
                elif rank[i] > d:
                    rank[i] -= d + 1
                    rem0[i] = f32(rem0[i] - f32(d + 1))
            bary = [f32(0)] * (d + 2)
            for i in range(d + 1):
                v = f32(f32(el[i] - rem0[i]) * down)
                bary[d - rank[i]] = f32(bary[d - rank[i]] + v)
                bary[d - rank[i] + 1] = f32(bary[d - rank[i] + 1] - v)
            bary[0] = f32(bary[0] + f32(f32(1) + bary[d + 1]))
            offs, ws = [], []
            for r in range(d + 1):
                key = tuple(short(int(rem0[i]) + canonical[r][rank[i]]) for i in range(d))
                offs.append(self.table.setdefault(key, len(self.table)))
                ws.append(bary[r])
            if k < n:
                self.offset.append(offs)
                self.weight.append(ws)
        keys = sorted(self.table, key=self.table.get)
        self.neighbours = []
        for j in range(d + 1):
            pairs = []
            for key in keys:
                n1 = [short(c - 1) for c in key]
                n2 = [short(c + 1) for c in key]
                if j < d:
                    n1[j], n2[j] = short(key[j] + d), short(key[j] - d)
                pairs.append((self.table.get(tuple(n1), -1), self.table.get(tuple(n2), -1)))
            self.neighbours.append(pairs)

    def compute(self, values):
        m, width = len(self.table), values.shape[1]
        vals = np.zeros((m + 2, width), np.float32)
        for i in range(self.n):
            for j in range(self.d + 1):
                o = self.offset[i][j] + 1
                vals[o] = vals[o] + f32(self.weight[i][j]) * values[i]
        new = np.zeros_like(vals)
        for j in range(self.d + 1):
            for i, (n1, n2) in enumerate(self.neighbours[j]):
                new[i + 1] = vals[i + 1] + f32(0.5) * (vals[n1 + 1] + vals[n2 + 1])
            vals, new = new, vals
        alpha = f32(f32(1) / f32(1 + 2.0 ** -self.d))
        out = np.zeros((self.n, width), np.float32)
        for i in range(self.n):
            for j in range(self.d + 1):
                out[i] = out[i] + f32(self.weight[i][j] * alpha) * vals[self.offset[i][j] + 1]
        return out


def ref_exp_and_normalize(values, scale):
    out = np.zeros_like(values)
    for i in range(values.shape[0]):
        b = [f32(f32(scale) * v) for v in values[i]]
        mx = max(b)
        e = [ref_fast_exp(f32(v - mx)) for v in b]
        tt = f32(0)
        for v in e:
            tt = f32(tt + v)
        out[i] = [f32(v / tt) for v in e]
    return out


def ref_dense_crf(scores, dims, image, max_iter, pos, bilateral, output_probability=True):
    """The DenseCRF layer's Forward_cpu, image by image, in float32."""
    n_, m_, ph, pw = scores.shape
    top = np.zeros(scores.shape, np.float32)
    for n in range(n_):
        rh, rw = int(dims[n].ravel()[0]), int(dims[n].ravel()[1])
        h_, w_ = (ph, pw) if (ph <= rh and pw <= rw) else (rh, rw)
        unary = np.zeros((h_ * w_, m_), np.float32)
        for c in range(m_):
            for h in range(h_):
                for w in range(w_):
                    unary[h * w_ + w, c] = -scores[n, c, h, w]
        potentials = []
        for w, std in pos:
            feat = np.array([[f32(f32(i) / f32(std)), f32(f32(j) / f32(std))]
                             for j in range(h_) for i in range(w_)], np.float32)
            potentials.append((feat, w))
        if image is not None:
            for w, std, rgb in bilateral:
                feat = np.array([[f32(f32(i) / f32(std)), f32(f32(j) / f32(std))] +
                                 [f32(f32(image[0, c, j, i]) / f32(rgb)) for c in range(3)]
                                 for j in range(h_) for i in range(w_)], np.float32)
                potentials.append((feat, w))
        pots = []
        for feat, w in potentials:
            lat = RefLattice(feat)
            norm = lat.compute(np.ones((h_ * w_, 1), np.float32))[:, 0]
            norm = np.array([f32(f32(1) / f32(v + f32(1e-20))) for v in norm], np.float32)
            pots.append((lat, f32(w), norm))
        cur = ref_exp_and_normalize(unary, -1.0)
        for _ in range(max_iter):
            nxt = -unary
            for lat, w, norm in pots:
                tmp = lat.compute(cur)
                for i in range(nxt.shape[0]):
                    nxt[i] = nxt[i] + f32(w * norm[i]) * tmp[i]
            cur = ref_exp_and_normalize(nxt, 1.0)
        q = cur if output_probability else np.log(np.maximum(cur, np.finfo(np.float32).tiny).astype(np.float64))
        top[n, :, :h_, :w_] = q.reshape(h_, w_, m_).transpose(2, 0, 1)
    return top


# ----------------------------------------------------------------------------- fast_exp
def test_fast_exp_matches_the_scalar_code_bit_for_bit():
    x = np.concatenate([np.linspace(-25, 25, 2001), [0.0, -0.69, 0.69, -2.76, 5.52, -20, 20, -20.0001],
                        np.random.default_rng(0).normal(0, 6, 500)]).astype(np.float32)
    got = fast_exp(torch.from_numpy(x)).numpy()
    ref = np.array([ref_fast_exp(v) for v in x], np.float32)
    np.testing.assert_array_equal(got, ref)
    inside = np.abs(x) <= 20
    np.testing.assert_allclose(got[inside], np.exp(x[inside].astype(np.float64)), rtol=2e-5)
    assert (got[~inside] == 0).all()            # the "dirty trick": 0 beyond |x| > 20


def test_exp_and_normalize_matches_scalar_code():
    v = np.random.default_rng(1).normal(0, 8, (40, 5)).astype(np.float32)
    for scale in (1.0, -1.0):
        got = exp_and_normalize(torch.from_numpy(v), scale).numpy()
        np.testing.assert_array_equal(got, ref_exp_and_normalize(v, scale))


# ------------------------------------------------------------------------------ lattice
@pytest.mark.parametrize("n, d, spread", [(13, 2, 3.0), (23, 5, 2.0), (8, 3, 40.0), (1, 2, 1.0)])
def test_lattice_matches_scalar_transcription(n, d, spread):
    r = np.random.default_rng(n * 10 + d)
    feat = (r.standard_normal((n, d)) * spread).astype(np.float32)
    feat[0] = 0 if n > 1 else feat[0]      # a zero feature shares the padding slots' simplex
    values = r.standard_normal((n, 4)).astype(np.float32)
    lat, ref = Permutohedral(torch.from_numpy(feat)), RefLattice(feat)
    assert lat.size == len(ref.table)
    np.testing.assert_array_equal(lat.filter(torch.from_numpy(values)).numpy(), ref.compute(values))


def test_lattice_key_lookup_without_packing(monkeypatch):
    # keys spanning more than 62 bits of mixed radix fall back to row-wise unique: same result
    r = np.random.default_rng(3)
    feat = (r.standard_normal((30, 5)) * 2).astype(np.float32)
    values = r.standard_normal((30, 2)).astype(np.float32)
    packed = Permutohedral(torch.from_numpy(feat)).filter(torch.from_numpy(values))
    import segaware_caffe.kernels.dense_crf as dc
    real = dc._KeyIndex.__init__

    def unpacked(self, keys, reach):
        real(self, keys, reach)
        if self.packed:
            self.packed = False
            self.rows, self.inverse = torch.unique(keys, dim=0, return_inverse=True)
            self.size = int(self.rows.shape[0])
    monkeypatch.setattr(dc._KeyIndex, "__init__", unpacked)
    assert torch.equal(Permutohedral(torch.from_numpy(feat)).filter(torch.from_numpy(values)), packed)


@pytest.mark.parametrize("d, std, mean_bound", [(2, 2.0, 0.02), (2, 5.0, 0.01), (5, 3.0, 0.04)])
def test_lattice_filter_approximates_the_gaussian(d, std, mean_bound):
    """Normalised lattice filtering vs the exact Gaussian exp(-|f_i - f_j|^2 / 2): the lattice's
    approximation (a piecewise-linear splat and a 1-ring blur per axis) stays within a few
    percent on average; the features' scale is what the kernel's std means."""
    h, w = 20, 23
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=g) * 60
    f = pixel_features(h, w, std) if d == 2 else pixel_features(h, w, std, image, 20.0)
    v = torch.cat([torch.sin(torch.arange(h * w, dtype=torch.float32) / 37.0)[:, None],
                   torch.rand(h * w, 1, generator=g)], 1)
    lattice = Permutohedral(f)
    got = (lattice.filter(v) / lattice.filter(torch.ones(h * w, 1))).double()
    fd = f.double()
    k = torch.exp(-0.5 * torch.cdist(fd, fd) ** 2)
    ref = (k @ v.double()) / k.sum(1, keepdim=True)
    assert (got - ref).abs().mean() < mean_bound
    # and it is the Gaussian, not something wider or narrower: halving / doubling the std is worse
    for factor in (0.5, 2.0):
        kk = torch.exp(-0.5 * torch.cdist(fd / factor, fd / factor) ** 2)
        other = (kk @ v.double()) / kk.sum(1, keepdim=True)
        assert (got - other).abs().mean() > (got - ref).abs().mean()


def test_lattice_does_not_leak_between_distant_clusters():
    r = np.random.default_rng(4)
    a = r.standard_normal((10, 3)).astype(np.float32)
    feat = np.concatenate([a, a + 50]).astype(np.float32)
    values = np.concatenate([np.ones((10, 1)), np.zeros((10, 1))]).astype(np.float32)
    out = Permutohedral(torch.from_numpy(feat)).filter(torch.from_numpy(values)).numpy()
    assert (out[:10] > 0).all() and (out[10:] == 0).all()


# -------------------------------------------------------------------------------- layer
CRF = ('name: "crf" type: "DenseCRF" bottom: "u" bottom: "d" %s top: "q" dense_crf_param { %s }')


@pytest.mark.parametrize("params, dims, with_image, prob", [
    ("max_iter: 2 pos_w: 2 pos_xy_std: 1.5 bi_w: 3 bi_xy_std: 4 bi_rgb_std: 7", [(5, 7), (4, 6)], True, True),
    ("max_iter: 3 pos_w: 1 pos_xy_std: 2 pos_w: 0.5 pos_xy_std: 0.7 bi_w: 5 bi_xy_std: 2 bi_rgb_std: 30 "
     "output_probability: false", [(9, 9), (3, 5)], True, False),
    ("max_iter: 1 pos_w: 4 pos_xy_std: 1", [(2, 3), (5, 7)], False, True),
    # images of one region size run as one batch through shared lattices
    ("max_iter: 2 pos_w: 2 pos_xy_std: 1.5 bi_w: 3 bi_xy_std: 4 bi_rgb_std: 7",
     [(5, 7), (9, 9), (4, 6), (4, 6), (5, 7), (2, 3)], True, True),
])
def test_dense_crf_matches_scalar_transcription(params, dims, with_image, prob):
    r = np.random.default_rng(5)
    n = len(dims)
    scores = (r.standard_normal((n, 3, 5, 7)) * 2).astype(np.float32)
    image = r.integers(0, 256, (n, 3, 5, 7)).astype(np.float32)
    d = np.array(dims, np.float32).reshape(n, 2, 1, 1)
    bottoms = [scores, d] + ([image] if with_image else [])
    layer = build(CRF % ('bottom: "img"' if with_image else "", params), [b.shape for b in bottoms])
    got = layer(*map(torch.from_numpy, bottoms)).numpy()
    p = read_net("layer { dense_crf_param { %s } }" % params).layer[0].dense_crf_param
    ref = ref_dense_crf(scores, d, image if with_image else None, p.max_iter,
                        list(zip(p.pos_w, p.pos_xy_std)), list(zip(p.bi_w, p.bi_xy_std, p.bi_rgb_std)), prob)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    for n, (rh, rw) in enumerate(dims):
        rows, cols = (5, 7) if rh >= 5 and rw >= 7 else (rh, rw)
        if prob:
            np.testing.assert_allclose(got[n, :, :rows, :cols].sum(0), 1, rtol=1e-5)
        assert (got[n, :, rows:] == 0).all() and (got[n, :, :, cols:] == 0).all()


def test_dense_crf_bilateral_features_come_from_image_zero():
    r = np.random.default_rng(6)
    scores = r.standard_normal((2, 2, 4, 5)).astype(np.float32)
    scores[1] = scores[0]
    image = r.integers(0, 256, (2, 3, 4, 5)).astype(np.float32)
    dims = np.array([4, 5, 4, 5], np.float32).reshape(2, 2, 1, 1)
    layer = build(CRF % ('bottom: "img"', "max_iter: 3 pos_w: 1 pos_xy_std: 1 bi_w: 5 bi_xy_std: 3 "
                         "bi_rgb_std: 10"), [scores.shape, dims.shape, image.shape])
    out = layer(*map(torch.from_numpy, (scores, dims, image)))
    assert torch.equal(out[0], out[1])       # image 1's own colours are never read


def test_dense_crf_errors_and_no_backward():
    shapes = [(1, 2, 3, 3), (1, 2, 1, 1), (1, 3, 3, 3)]
    with pytest.raises(LayerSetupError, match="pos_w and pos_xy_std must have the same number"):
        build(CRF % ('bottom: "img"', "pos_w: 1 bi_w: 1 bi_xy_std: 1 bi_rgb_std: 1"), shapes)
    with pytest.raises(LayerSetupError, match="bi_w, bi_xy_std and bi_rgb_std"):
        build(CRF % ('bottom: "img"', "bi_w: 1 bi_xy_std: 1"), shapes)
    with pytest.raises(LayerSetupError, match="no bilateral kernel"):
        build(CRF % ('bottom: "img"', "pos_w: 1 pos_xy_std: 1"), shapes)
    with pytest.raises(LayerSetupError, match=r"bottom 2 \(the image\) must be \(N, 3, H, W\)"):
        build(CRF % ('bottom: "img"', "bi_w: 1 bi_xy_std: 1 bi_rgb_std: 1"), [shapes[0], shapes[1], (1, 1, 3, 3)])
    with pytest.raises(LayerSetupError, match="pos_xy_std must be non-zero"):
        build(CRF % ("", "pos_w: 1 pos_xy_std: 0"), shapes[:2])
    layer = build(CRF % ("", "pos_w: 1 pos_xy_std: 1"), shapes[:2])
    with pytest.raises(ValueError, match=r"valid size \(4, 2\) must be within the blob's \(3, 3\)"):
        layer(torch.zeros(1, 2, 3, 3), torch.tensor([4.0, 2.0]).reshape(1, 2, 1, 1))
    net = sc.Net('input: "u" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 } '
                 'input: "d" input_shape { dim: 1 dim: 2 dim: 1 dim: 1 } '
                 'layer { name: "crf" type: "DenseCRF" bottom: "u" bottom: "d" top: "q" '
                 'dense_crf_param { pos_w: 1 pos_xy_std: 1 } }')
    q = net.forward(u=torch.randn(1, 2, 3, 3, requires_grad=True), d=torch.tensor([3.0, 3.0]).reshape(1, 2, 1, 1))["q"]
    with pytest.raises(NoBackwardError, match=r"crf \(DenseCRF\) has no backward"):
        q.sum().backward()
