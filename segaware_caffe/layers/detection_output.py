"""DetectionOutput (SSD fork): decode box predictions against the priors, keep per class the
boxes that survive non-maximum suppression, and the best keep_top_k of them per image.

Follows SSD's GPU path where its CPU path differs: decoding in float32, the box overlap of its
pointer form (boxes that only touch, or boxes with a negative side, as that code computes them),
and background_label_id -1 (no background class) with shared locations, which the CPU path
aborts on. Equal scores keep their prior order (the original's sort leaves ties unspecified).
"""
import torch

from ..layer import CaffeLayer, register_layer

CODE_TYPES = {1: "CORNER", 2: "CENTER_SIZE", 3: "CORNER_SIZE"}


def decode_boxes(loc, priors, variances, code_type, variance_encoded_in_target):
    """Boxes (..., 4) as (xmin, ymin, xmax, ymax) from location predictions loc (..., 4) and
    priors / variances (P, 4) broadcast over loc's leading axes, in SSD's float order."""
    px0, py0, px1, py1 = priors.unbind(-1)
    v = torch.ones_like(variances) if variance_encoded_in_target else variances
    l0, l1, l2, l3 = loc.unbind(-1)
    v0, v1, v2, v3 = v.unbind(-1)
    if code_type == "CORNER":
        return torch.stack([px0 + l0 * v0, py0 + l1 * v1, px1 + l2 * v2, py1 + l3 * v3], -1)
    width, height = px1 - px0, py1 - py0
    if code_type == "CORNER_SIZE":
        return torch.stack([px0 + l0 * v0 * width, py0 + l1 * v1 * height,
                            px1 + l2 * v2 * width, py1 + l3 * v3 * height], -1)
    center_x, center_y = (px0 + px1) / 2, (py0 + py1) / 2
    if variance_encoded_in_target:
        cx, cy = l0 * width + center_x, l1 * height + center_y
        w, h = torch.exp(l2) * width, torch.exp(l3) * height
    else:
        cx, cy = v0 * l0 * width + center_x, v1 * l1 * height + center_y
        w, h = torch.exp(v2 * l2) * width, torch.exp(v3 * l3) * height
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_sizes(boxes):
    """Area of (..., 4) boxes; 0 where xmax < xmin or ymax < ymin."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    invalid = (x1 < x0) | (y1 < y0)
    return torch.where(invalid, torch.zeros_like(x0), (x1 - x0) * (y1 - y0))


def overlaps(box, size, boxes, sizes):
    """Jaccard overlap of one box with each of boxes (n, 4): 0 when they are apart, else
    intersection / (size + sizes - intersection) with the intersection's sides as they come."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    apart = (x0 > box[2]) | (x1 < box[0]) | (y0 > box[3]) | (y1 < box[1])
    inter = (torch.minimum(x1, box[2]) - torch.maximum(x0, box[0])) * \
        (torch.minimum(y1, box[3]) - torch.maximum(y0, box[1]))
    value = inter / (size + sizes - inter)
    return torch.where(apart, torch.zeros_like(value), value)


def nms(boxes, scores, score_threshold, nms_threshold, eta, top_k):
    """SSD's ApplyNMSFast: indices (into boxes) of the kept boxes, best first. Candidates score
    above score_threshold, the top_k best (top_k -1: all); each is kept when its overlap with
    every box kept so far is <= the threshold, which eta < 1 lowers after each keep while it is
    above 0.5. The loop runs once per kept box."""
    candidates = torch.nonzero(scores > score_threshold).flatten()
    order = torch.sort(scores[candidates], descending=True, stable=True).indices
    candidates = candidates[order]
    if top_k > -1:
        candidates = candidates[:top_k]
    count = len(candidates)
    if count == 0:
        return candidates
    cand_boxes = boxes[candidates]
    cand_sizes = box_sizes(cand_boxes)
    worst = torch.full((count,), float("-inf"), dtype=boxes.dtype, device=boxes.device)
    positions = torch.arange(count, device=boxes.device)
    threshold = torch.tensor(nms_threshold, dtype=torch.float32).item()
    eta32 = torch.tensor(eta, dtype=torch.float32)
    kept = []
    position = -1
    while True:
        # NaN overlaps (two empty boxes) never compare <=: such a box is dropped, as in SSD
        eligible = (positions > position) & (worst <= threshold)
        found = torch.nonzero(eligible)
        if not len(found):
            break
        position = int(found[0])
        kept.append(position)
        worst = torch.maximum(worst, overlaps(cand_boxes[position], cand_sizes[position],
                                              cand_boxes, cand_sizes))
        if eta < 1 and threshold > 0.5:
            threshold = (torch.tensor(threshold, dtype=torch.float32) * eta32).item()
    return candidates[torch.tensor(kept, dtype=torch.long, device=boxes.device)]


@register_layer("DetectionOutput")
class DetectionOutput(CaffeLayer):
    """Bottoms: loc (N, P*L*4) box offsets (L = 1 with share_location, else num_classes), conf
    (N, P*num_classes) scores (softmax already applied), priors (1, 2, P*4) from PriorBox. Top
    (1, 1, K, 7): rows [image, label, score, xmin, ymin, xmax, ymax] by image, label, then
    score; when no image has a detection, one row [i, -1, -1, -1, -1, -1, -1] per image."""
    BOTTOMS = (3, 4)
    HAS_BACKWARD = False

    def __init__(self, *, num_classes, share_location=True, background_label_id=0,
                 code_type="CORNER", variance_encoded_in_target=False, keep_top_k=-1,
                 confidence_threshold=None, nms_threshold=0.3, eta=1.0, top_k=-1):
        super().__init__()
        self.num_classes, self.share_location = num_classes, share_location
        self.background_label_id, self.code_type = background_label_id, code_type
        self.variance_encoded_in_target = variance_encoded_in_target
        self.keep_top_k, self.nms_threshold, self.eta, self.top_k = keep_top_k, nms_threshold, eta, top_k
        # SSD: every score counts when no threshold is given (-FLT_MAX)
        self.confidence_threshold = (-3.4028234663852886e38 if confidence_threshold is None
                                     else confidence_threshold)

    @classmethod
    def from_proto(cls, layer_param, ctx):
        p = layer_param.detection_output_param
        if not p.HasField("num_classes"):
            raise ctx.error("detection_output_param.num_classes is required")
        if p.num_classes < 1:
            raise ctx.error("detection_output_param.num_classes must be >= 1")
        nms = p.nms_param
        if nms.nms_threshold < 0:
            raise ctx.error(f"nms_param.nms_threshold must be >= 0, got {nms.nms_threshold:g}")
        if not 0 < nms.eta <= 1:
            raise ctx.error(f"nms_param.eta must be in (0, 1], got {nms.eta:g}")
        if p.keep_top_k < -1:
            raise ctx.error(f"detection_output_param.keep_top_k must be >= -1, got {p.keep_top_k}")
        if nms.HasField("top_k") and nms.top_k < -1:
            raise ctx.error(f"nms_param.top_k must be >= -1, got {nms.top_k}")
        if p.save_output_param.output_directory:
            ctx.warn("save_output_param: detection files are not written here (the detections "
                     "are the layer's top); the parameter is ignored")
        if p.visualize:
            ctx.warn("visualize: no window is drawn here; the parameter is ignored")
        num_classes, share = int(p.num_classes), bool(p.share_location)
        loc_shape, conf_shape, prior_shape = (tuple(s) for s in ctx.bottom_shapes[:3])
        if len(prior_shape) != 3 or prior_shape[:2] != (1, 2) or prior_shape[2] % 4:
            raise ctx.error(f"bottom 2 (priors) must have shape (1, 2, P*4) as PriorBox makes "
                            f"it, got {prior_shape}")
        priors = prior_shape[2] // 4
        loc_classes = 1 if share else num_classes
        if loc_shape[0] != conf_shape[0]:
            raise ctx.error(f"loc ({ctx.bottom_names[0]!r}) and conf ({ctx.bottom_names[1]!r}) "
                            f"bottoms have {loc_shape[0]} and {conf_shape[0]} images")
        for index, shape, per_prior, what in ((0, loc_shape, loc_classes * 4, "location values"),
                                              (1, conf_shape, num_classes, "confidences")):
            channels = shape[1] if len(shape) > 1 else 1
            if channels != priors * per_prior or _count(shape) != shape[0] * channels:
                raise ctx.error(f"bottom {index} ({ctx.bottom_names[index]!r}) has shape {shape}; "
                                f"{priors} priors need (N, {priors * per_prior}) {what} "
                                f"({per_prior} per prior)")
        return cls(num_classes=num_classes, share_location=share,
                   background_label_id=int(p.background_label_id),
                   code_type=CODE_TYPES[p.code_type],
                   variance_encoded_in_target=bool(p.variance_encoded_in_target),
                   keep_top_k=int(p.keep_top_k),
                   confidence_threshold=(float(p.confidence_threshold)
                                         if p.HasField("confidence_threshold") else None),
                   nms_threshold=float(nms.nms_threshold), eta=float(nms.eta),
                   top_k=int(nms.top_k) if nms.HasField("top_k") else -1)

    def output_shapes(self, bottom_shapes):
        return [(1, 1, 1, 7)]     # the real row count depends on the data

    @torch.no_grad()        # SSD has no backward for it: keep no graph
    def forward(self, loc, conf, prior, *_):
        num = loc.shape[0]
        priors = prior.shape[2] // 4
        loc_classes = 1 if self.share_location else self.num_classes
        loc = loc.reshape(num, priors, loc_classes, 4)
        conf = conf.reshape(num, priors, self.num_classes)
        prior_boxes = prior[0, 0].reshape(priors, 1, 4)
        variances = prior[0, 1].reshape(priors, 1, 4)
        decoded = decode_boxes(loc, prior_boxes, variances, self.code_type,
                               self.variance_encoded_in_target)
        rows = []
        for image in range(num):
            kept = {}                                 # label -> kept prior indices
            for label in range(self.num_classes):
                if label == self.background_label_id:
                    continue
                boxes = decoded[image, :, 0 if self.share_location else label].detach()
                kept[label] = nms(boxes, conf[image, :, label].detach(), self.confidence_threshold,
                                  self.nms_threshold, self.eta, self.top_k)
            total = sum(len(k) for k in kept.values())
            if self.keep_top_k > -1 and total > self.keep_top_k:
                labels = torch.cat([torch.full((len(k),), c, dtype=torch.long)
                                    for c, k in kept.items()])
                indices = torch.cat(list(kept.values()))
                scores = conf[image, indices, labels].detach()
                best = torch.sort(scores, descending=True, stable=True).indices[:self.keep_top_k]
                kept = {c: indices[best[labels[best] == c]] for c in kept}
            for label, indices in sorted(kept.items()):
                if not len(indices):
                    continue
                boxes = decoded[image, indices, 0 if self.share_location else label]
                column = torch.full((len(indices), 1), 1.0, dtype=loc.dtype, device=loc.device)
                rows.append(torch.cat([column * image, column * label,
                                       conf[image, indices, label].unsqueeze(1), boxes], 1))
        if not rows:
            empty = torch.full((num, 7), -1.0, dtype=loc.dtype, device=loc.device)
            empty[:, 0] = torch.arange(num, dtype=loc.dtype, device=loc.device)
            return empty.reshape(1, 1, num, 7)
        table = torch.cat(rows)
        return table.reshape(1, 1, -1, 7)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, share_location={self.share_location}, "
                f"background_label_id={self.background_label_id}, code_type={self.code_type}, "
                f"nms_threshold={self.nms_threshold:g}, top_k={self.top_k}, "
                f"keep_top_k={self.keep_top_k}")


def _count(shape):
    total = 1
    for d in shape:
        total *= d
    return total
