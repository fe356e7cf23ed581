"""Fully connected CRF mean-field inference (Kraehenbuehl & Koltun 2011) with Gaussian Potts
kernels filtered on the permutohedral lattice (Adams et al. 2010), exactly as DeepLab's DenseCRF
layer computes it on x86 CPUs (its SSE code paths), in float32.

Lattice (one per kernel and image), for n points with d features each:
* elevation onto the hyperplane: y_j = sm_j - j * f_{j-1} s_{j-1}, with the scale
  s_i = sqrt(2/3) (d+1) / sqrt((i+1)(i+2)) and sm_j the running sum of f_i s_i from the top;
* the enclosing simplex: the nearest remainder-0 point by rounding y / (d+1) half to even, the
  rank of each coordinate's residual, one wrap-around correction, barycentric weights, and the
  d+1 vertex keys (the first d coordinates, as int16 like the original's hash keys);
* the original builds points four at a time and also inserts the vertices of zero feature
  vectors for the padding slots of the last block of four: they take part in the blur as
  (initially empty) lattice vertices, so they are inserted here too.
Filtering: splat (each point adds w * value to its d+1 vertices, in point order), blur along
each of the d+1 lattice axes (v + 0.5 (v_prev + v_next), missing neighbours are 0), slice with
weights w * alpha, alpha = 1 / (1 + 2^-d). The filter includes the point itself.

Inference: Q = softmax(scores) with the original's fast_exp approximation (exactly 0 below
exp(-20)), then max_iter steps of Q <- softmax(scores + sum_k w_k norm_k * filter_k(Q)), with the
per-point normalisation norm_k = 1 / (filter_k(1) + 1e-20).

Every float32 operation is done in the original's order (the splat's sums in point order), so the
results agree with it to float32 rounding; loops run over the d+1 lattice directions, the
classes of the softmax sum and the iterations, never over points.
"""
import numpy as np
import torch

FLT_MIN = float(np.finfo(np.float32).tiny)
_BLOCK = 4      # the original's SSE lattice construction handles points four at a time

# very_fast_exp's polynomial coefficients as float32 (the source writes them with 10 digits)
_POLY = [np.float32(c) for c in (0.9999999995, 0.4999999206, 0.1666653019, 0.0416573475,
                                 0.0083013598, 0.0013298820, 0.0001413161)]


def _f32(value):
    return torch.tensor(np.float32(value), dtype=torch.float32)


def _below(threshold):
    """The largest float32 <= threshold: for a float32 a, a > threshold (compared in double, as
    the original's float-vs-double comparison does) iff a > this."""
    t = np.float32(threshold)
    return float(t if float(t) <= threshold else np.nextafter(t, np.float32(-np.inf)))


_T8, _T4, _T2 = _below(0.69 * 2 * 2 * 2), _below(0.69 * 2 * 2), _below(0.69)


def fast_exp(x):
    """The original's fast_exp on a float32 tensor: |x| > 20 gives 0 (also for positive x); else
    |x| is divided down to <= 0.69 (by 8 while > 5.52, by 4 while > 2.76, by 2 while > 0.69), a
    degree-7 polynomial approximates exp(-|x|), it is squared back up once per halving, and
    inverted for x >= 0. With |x| <= 20 those loops run at most 1, 1 and 2 times."""
    dev = x.device
    negative = x < 0
    a = x.abs()
    zero = a > 20
    a = a.masked_fill(zero, 0.0)
    mult = torch.zeros_like(a, dtype=torch.int8)
    for threshold, step, factor, times in ((_T8, 3, 0.125, 1), (_T4, 2, 0.25, 1), (_T2, 1, 0.5, 2)):
        for _ in range(times):
            hit = a > threshold
            mult.add_(hit.to(torch.int8), alpha=step)     # at most 3 + 2 + 2 = 7
            a = torch.where(hit, a * factor, a)   # exact: a power-of-two scaling
    poly = [c.to(dev) for c in map(_f32, _POLY)]
    t = poly[5] - a * poly[6]
    for c in reversed(poly[:5]):
        t = c - a * t
    r = 1 - a * t
    for i in range(int(mult.max()) if mult.numel() else 0):
        r = torch.where(mult > i, r * r, r)
    r = torch.where(negative, r, 1 / r)
    return r.masked_fill(zero, 0.0)


def exp_and_normalize(values, scale):
    """Per row of values (n, m): fast_exp(scale * v - max(scale * v)) divided by its sum, the sum
    accumulated class by class as the original does."""
    scaled = values * float(scale)
    e = fast_exp(scaled - scaled.max(1, keepdim=True).values)
    total = torch.zeros_like(e[:, 0])
    for j in range(e.shape[1]):
        total = total + e[:, j]
    return e / total.unsqueeze(1)


def _wrap16(values):
    """int64 -> the int16 the original's short keys hold (two's complement wrap)."""
    if values.numel() and -32768 <= int(values.min()) and int(values.max()) <= 32767:
        return values
    return (values + 32768) % 65536 - 32768


class _KeyIndex:
    """The distinct int16 key rows (the lattice vertices) and exact lookup of their neighbours
    (each coordinate moved by a constant). Fast path: keys packed into int64 codes of a
    mixed-radix box wide enough for every neighbour, so a neighbour's code is the vertex's plus a
    constant; otherwise (a huge box, or keys at the int16 limits, where the original's shorts
    wrap) row-wise unique and lookup."""

    def __init__(self, keys, reach):
        lo = keys.min(0).values - reach
        hi = keys.max(0).values + reach
        span = (hi - lo + 1).tolist()
        total, strides = 1, []
        for size in reversed(span):
            strides.append(total)
            total *= size
        self.packed = total < 2 ** 62 and int(lo.min()) >= -32768 and int(hi.max()) <= 32767
        if self.packed:
            self.lo, self.span = lo, torch.tensor(span, dtype=torch.int64, device=keys.device)
            self.strides = list(reversed(strides))
            codes = ((keys - lo) * torch.tensor(self.strides, dtype=torch.int64, device=keys.device)).sum(1)
            self.codes, self.inverse = torch.unique(codes, sorted=True, return_inverse=True)
            self.size = int(self.codes.numel())
        else:
            self.rows, self.inverse = torch.unique(keys, dim=0, return_inverse=True)
            self.size = int(self.rows.shape[0])

    def neighbour(self, moves):
        """Index of each vertex's neighbour whose key is the vertex's + moves (one int per
        coordinate, int16 arithmetic), -1 where that key is no vertex."""
        if self.packed:
            query = self.codes + sum(m * s for m, s in zip(moves, self.strides))
            pos = torch.searchsorted(self.codes, query).clamp(max=self.size - 1)
            return torch.where(self.codes[pos] == query, pos, torch.full_like(pos, -1))
        dev = self.rows.device
        queries = _wrap16(self.rows + torch.tensor(moves, dtype=torch.int64, device=dev))
        both, inverse = torch.unique(torch.cat([self.rows, queries]), dim=0, return_inverse=True)
        table = torch.full((both.shape[0],), -1, dtype=torch.int64, device=dev)
        table[inverse[:self.size]] = torch.arange(self.size, device=dev)
        return table[inverse[self.size:]]


class Permutohedral:
    """The permutohedral lattice of n points with d float32 features; `filter` blurs values
    (n, v) with the Gaussian of unit standard deviation in feature space, approximately."""

    def __init__(self, features):
        n, d = features.shape
        self.n, self.d = n, d
        dev = features.device
        f = features.to(torch.float32)
        pad = (-n) % _BLOCK
        if pad:
            f = torch.cat([f, f.new_zeros(pad, d)])
        inv_std_dev = float(np.float32(np.sqrt(2.0 / 3.0) * (d + 1)))
        scale = [_f32(1.0 / np.sqrt((i + 2) * (i + 1)) * inv_std_dev).to(dev) for i in range(d)]
        # elevate onto the plane sum(y) = 0
        elevated = [None] * (d + 1)
        sm = torch.zeros_like(f[:, 0])
        for j in range(d, 0, -1):
            cf = f[:, j - 1] * scale[j - 1]
            elevated[j] = sm - _f32(j).to(dev) * cf
            sm = sm + cf
        elevated[0] = sm
        elevated = torch.stack(elevated, 1)                              # (n', d+1)
        # nearest remainder-0 lattice point (round half to even, as the SSE conversion does)
        down = _f32(np.float32(1.0) / np.float32(d + 1)).to(dev)
        up = _f32(d + 1).to(dev)
        rounded = torch.round(down * elevated)
        rem0 = rounded * up
        total = rounded.sum(1).to(torch.int64)
        # rank of each residual; ties rank the later coordinate higher
        resid = elevated - rem0
        less = resid.unsqueeze(2) < resid.unsqueeze(1)                   # [i, j]: r_i < r_j
        upper = torch.ones(d + 1, d + 1, dtype=torch.bool, device=dev).triu(1)
        rank = ((less & upper).sum(2) + (~less.transpose(1, 2) & upper.T).sum(2)).to(torch.int64)
        # bring the point back onto the plane
        rank = rank + total.unsqueeze(1)
        fix = (rank < 0).to(torch.int64) * (d + 1) - (rank >= d + 1).to(torch.int64) * (d + 1)
        rank = rank + fix
        rem0 = rem0 + fix.to(torch.float32)
        # barycentric weights, accumulated coordinate by coordinate as the original does
        v = (elevated - rem0) * down
        bary = torch.zeros(f.shape[0], d + 2, dtype=torch.float32, device=dev)
        for i in range(d + 1):
            slot = (d - rank[:, i]).unsqueeze(1)
            bary.scatter_add_(1, slot, v[:, i:i + 1])
            bary.scatter_add_(1, slot + 1, -v[:, i:i + 1])
        bary[:, 0] = bary[:, 0] + (1 + bary[:, d + 1])
        # the d+1 vertex keys: rem0 + canonical simplex vertex, first d coordinates, as int16
        remainder = torch.arange(d + 1, device=dev).reshape(1, d + 1, 1)
        r = rank[:, :d].unsqueeze(1)                                     # (n', 1, d)
        canonical = torch.where(r <= d - remainder, remainder, remainder - (d + 1))
        keys = _wrap16(rem0[:, :d].to(torch.int64).unsqueeze(1) + canonical)   # (n', d+1, d)
        index = _KeyIndex(keys.reshape(-1, d), d)
        self.size = index.size
        # lattice vertex of each (point, remainder), shifted by one: row 0 is "no vertex"
        self.offset = (index.inverse.reshape(-1, d + 1)[:n] + 1)
        self.weight = bary[:n, :d + 1].contiguous()
        # blur neighbours along each lattice axis j: all coordinates -1 / +1, except coordinate
        # j (j < d), which moves by +d / -d
        neighbours = []
        for j in range(d + 1):
            down_moves, up_moves = [-1] * d, [1] * d
            if j < d:
                down_moves[j], up_moves[j] = d, -d
            neighbours.append((index.neighbour(down_moves) + 1, index.neighbour(up_moves) + 1))
        self.neighbours = neighbours
        self.alpha = float(np.float32(1.0) / np.float32(1.0 + 2.0 ** -d))

    def filter(self, values):
        """Splat values (n, v) onto the lattice, blur, slice back: (n, v) float32."""
        values = values.to(torch.float32)
        d, width = self.d, values.shape[1]
        lattice = values.new_zeros(self.size + 1, width)
        contrib = (self.weight.unsqueeze(2) * values.unsqueeze(1)).reshape(-1, width)
        lattice.index_add_(0, self.offset.reshape(-1), contrib)
        spare = values.new_zeros(self.size + 1, width)    # row 0 stays 0 in both buffers
        pair = values.new_empty(self.size, width)
        other = values.new_empty(self.size, width)
        for n1, n2 in self.neighbours:
            torch.index_select(lattice, 0, n1, out=pair)
            torch.index_select(lattice, 0, n2, out=other)
            pair.add_(other).mul_(0.5)                     # 0.5 * (v_n1 + v_n2)
            torch.add(lattice[1:], pair, out=spare[1:])
            lattice, spare = spare, lattice
        weight = self.weight * _f32(self.alpha).to(values.device)
        out = values.new_zeros(self.n, width)
        gathered = values.new_empty(self.n, width)
        for j in range(d + 1):
            torch.index_select(lattice, 0, self.offset[:, j], out=gathered)
            out.add_(gathered.mul_(weight[:, j:j + 1]))
        return out


class PottsKernel:
    """One Gaussian kernel of the CRF: weight w, lattice of the features, per-point normaliser."""

    def __init__(self, features, weight):
        self.lattice = Permutohedral(features)
        self.weight = _f32(weight).to(features.device)
        ones = features.new_ones(features.shape[0], 1, dtype=torch.float32)
        self.norm = 1 / (self.lattice.filter(ones)[:, 0] + _f32(1e-20).to(features.device))

    def add_message(self, out, q):
        """out + (w * norm) * filter(q), for q (n, m) or a batch (g, n, m) of value sets that
        share the lattice (filtered as the g * m columns of one (n, g * m) matrix)."""
        if q.dim() == 2:
            return out + (self.weight * self.norm).unsqueeze(1) * self.lattice.filter(q)
        g, n, m = q.shape
        filtered = self.lattice.filter(q.permute(1, 0, 2).reshape(n, g * m))
        filtered = filtered.reshape(n, g, m).permute(1, 0, 2)
        return out + (self.weight * self.norm).reshape(1, n, 1) * filtered


def pixel_features(height, width, xy_std, image=None, rgb_std=None, device="cpu"):
    """(H*W, 2) positions x/s, y/s (row-major pixels), or with image (3, H, W) the (H*W, 5)
    bilateral features x/s, y/s, c0/r, c1/r, c2/r, in float32."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    std = _f32(xy_std).to(device)
    cols = [xs.reshape(-1) / std, ys.reshape(-1) / std]
    if image is not None:
        rgb = _f32(rgb_std).to(device)
        cols += [image[c].reshape(-1).to(torch.float32) / rgb for c in range(3)]
    return torch.stack(cols, 1)


def dense_crf_inference(scores, kernels, max_iter):
    """Mean-field on the scores (n, m) float32 (the unary energy is -scores) with the given
    PottsKernels; returns Q (n, m). scores (g, n, m): g images whose kernels are the same
    (one lattice per kernel serves them all), Q (g, n, m)."""
    shape = scores.shape
    unary = -scores

    def normalized(values, scale):          # per pixel of each image, over the m labels
        return exp_and_normalize(values.reshape(-1, shape[-1]), scale).reshape(shape)

    q = normalized(unary, -1.0)
    for _ in range(max_iter):
        nxt = -unary
        for kernel in kernels:
            nxt = kernel.add_message(nxt, q)
        q = normalized(nxt, 1.0)
    return q
