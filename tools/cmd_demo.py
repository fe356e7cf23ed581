"""segaware-caffe demo: local attention masks and segmentation-aware filtering on a bundled photo.

Everything runs offline on the CPU in well under a minute:
 (a) attention masks m = exp(-lambda * Im2dist_L1(emb)) of a few pixels, emb = RGB(+xy), drawn
     next to the photo (the paper's Fig. 3);
 (b) segmentation-aware bilateral filtering y = sum_k m_k x_k / sum_k m_k (paper Eq. 4), built as
     a prototxt of Im2col / Im2dist / Exp / Tile / Eltwise / ChannelReduce / Power layers and run by
     segaware_caffe.Net, next to a box blur of the same window (the same net with lambda = 0), like
     Fig. 4;
 (c) a caffemodel with filler weights (a reduced embedding trunk, or a released deploy net given
     with --config) converted to safetensors and back, checked bit for bit.
The photo is synthetic (`synthetic_photo`, also the generator of the bundled PNGs): shaded,
textured objects with sharp boundaries, plus noise; its segment map is bundled for measurements.
"""
import os
import tempfile
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw

from segaware_caffe.tools.common import UsageError, add_force_argument, prepare_output_dir

MAX_SIZE = 512   # the demo nets hold kernel^2 channels per pixel: about 1 GB in all at this width
PHOTO = "demo_photo.png"
SEGMENTS = "demo_segments.png"
# (row, column) as fractions of the image: points near object boundaries, as in Fig. 3
MASK_POINTS = ((0.66, 0.565), (0.55, 0.465), (0.47, 0.86), (0.40, 0.28))
MARKER_COLOURS = ((255, 64, 64), (64, 220, 64), (80, 140, 255), (255, 220, 0))


# ---------------------------------------------------------------------------- the photo
def synthetic_photo(height=192, width=256, seed=0, noise=0.04):
    """(image HxWx3 float in [0, 1], segment labels HxW uint8): sky and ground, a sun, a house
    with a roof, a shaded ball and a tree, each with its own shading and texture."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    v, u = v / height, u / width
    image = np.zeros((height, width, 3))
    labels = np.zeros((height, width), np.uint8)

    def paint(mask, colour, label):
        image[mask] = colour[mask] if np.ndim(colour) == 3 else colour
        labels[mask] = label

    horizon = 0.58 + 0.03 * np.sin(6 * u)
    sky = np.stack([0.35 + 0.3 * v, 0.55 + 0.3 * v, 0.95 - 0.1 * v], -1)
    paint(v < horizon, sky, 0)
    grass = 0.08 * np.sin(90 * u + 7 * np.sin(40 * v)) * np.sin(60 * v)
    ground = np.stack([0.30 + grass, 0.55 - 0.25 * (v - 0.6) + grass, 0.20 + 0.5 * grass], -1)
    paint(v >= horizon, ground, 1)
    sun = (u - 0.16) ** 2 + ((v - 0.18) * height / width) ** 2 < 0.085 ** 2
    glow = np.clip(1 - np.hypot(u - 0.16, v - 0.18) * 6, 0, 1)[..., None]
    paint(sun, np.array([1.0, 0.75, 0.2]) * (0.8 + 0.2 * glow), 2)
    wall = (u > 0.22) & (u < 0.48) & (v > 0.42) & (v < 0.80)
    bricks = 0.06 * (np.sin(2 * np.pi * v * height / 6) > 0.6)
    paint(wall, np.stack([0.75 - bricks - 0.2 * u, 0.35 - bricks, 0.25 - bricks], -1), 3)
    roof = (v <= 0.42) & (v > 0.22) & (np.abs(u - 0.35) < (v - 0.22) * 0.75)
    paint(roof, np.stack([0.35 + 0.3 * (v - 0.22), 0.18 + 0 * u, 0.12 + 0 * u], -1), 4)
    r = np.hypot(u - 0.66, (v - 0.70) * height / width)
    ball = r < 0.11
    light = np.clip(1 - np.hypot(u - 0.62, (v - 0.64) * height / width) / 0.14, 0, 1)[..., None]
    paint(ball, np.array([0.15, 0.25, 0.85]) * (0.45 + 0.55 * light) + 0.25 * light ** 8, 5)
    canopy = ((u - 0.86) / 0.10) ** 2 + ((v - 0.30) / 0.20) ** 2 < 1
    leaves = 0.10 * np.sin(70 * u) * np.sin(50 * v)
    paint(canopy, np.stack([0.12 + leaves, 0.45 + leaves - 0.3 * (v - 0.1), 0.12 + 0 * u], -1), 6)
    trunk = (np.abs(u - 0.86) < 0.02) & (v >= 0.49) & (v < 0.66) & ~canopy
    paint(trunk, np.array([0.40, 0.26, 0.12]), 7)
    image += rng.normal(0, noise, image.shape)
    return np.clip(image, 0, 1), labels


def write_bundled_photo(directory):
    """Regenerate the bundled PNGs (what ships in segaware_caffe/assets)."""
    image, labels = synthetic_photo()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(os.path.join(directory, PHOTO), optimize=True)
    segments = Image.fromarray(labels, mode="P")
    segments.putpalette([c for i in range(256) for c in ((i * 67) % 256, (i * 139) % 256, (i * 29) % 256)])
    segments.save(os.path.join(directory, SEGMENTS), optimize=True)


def load_photo(size=None):
    """The bundled photo as (1, 3, H, W) float32 in [0, 1] and its segment labels (H, W), resized
    to `size` pixels wide (keeping the aspect) when given."""
    import torch
    from segaware_caffe.data.images import convert_image, open_image

    assets = resources.files("segaware_caffe") / "assets"
    with resources.as_file(assets / PHOTO) as photo_path, resources.as_file(assets / SEGMENTS) as seg_path:
        with open_image(photo_path) as photo, open_image(seg_path) as segments:
            photo = convert_image(photo, "RGB", photo_path)
            if size is not None and size != photo.width:
                height = max(8, round(photo.height * size / photo.width))
                photo = photo.resize((size, height), Image.BILINEAR)
                segments = segments.resize((size, height), Image.NEAREST)
            image = np.asarray(photo, np.float32) / 255
            labels = np.asarray(segments, np.int64)
    return torch.from_numpy(image.transpose(2, 0, 1).copy())[None], labels


# ---------------------------------------------------------------------------- the nets
def embedding_prototxt(height, width, rgb_scale, xy_scale):
    """emb = concat(rgb_scale * image, xy_scale * (x, y)): the RGB(+xy) embedding."""
    return f"""
input: "image"
input_shape {{ dim: 1 dim: 3 dim: {height} dim: {width} }}
layer {{ name: "rgb_feat" type: "Power" bottom: "image" top: "rgb_feat" power_param {{ scale: {rgb_scale} }} }}
layer {{ name: "xy" type: "DummyData" top: "xy"
  dummy_data_param {{ shape {{ dim: 1 dim: 2 dim: {height} dim: {width} }} data_filler {{ type: "xy" }} }} }}
layer {{ name: "xy_feat" type: "Power" bottom: "xy" top: "xy_feat" power_param {{ scale: {xy_scale} }} }}
layer {{ name: "emb" type: "Concat" bottom: "rgb_feat" bottom: "xy_feat" top: "emb" }}
"""


def mask_prototxt(height, width, *, kernel, dilation, lam, rgb_scale=1.0, xy_scale=0.005):
    """m = exp(-lam * Im2dist_L1(emb)) over a kernel x kernel window (out-of-image taps removed)."""
    pad = dilation * (kernel // 2)
    return 'name: "attention_masks"\n' + embedding_prototxt(height, width, rgb_scale, xy_scale) + f"""
layer {{ name: "emb_dist" type: "Im2dist" bottom: "emb" top: "emb_dist"
  convolution_param {{ kernel_size: {kernel} pad: {pad} dilation: {dilation} }}
  im2dist_param {{ norm: L1 remove_bounds: true }} }}
layer {{ name: "mask" type: "Exp" bottom: "emb_dist" top: "mask" exp_param {{ scale: {-lam} }} }}
"""


def filter_prototxt(height, width, *, kernel=9, lam=6.0, rgb_scale=1.0, xy_scale=0.005, eps=1e-4):
    """Segmentation-aware filtering (Eq. 4) as Caffe layers, like config/res's post-processing:
    Im2col(image) * Tile(mask) -> ChannelReduce SUM per colour / (ChannelReduce SUM of mask + eps).
    A tiny lam (1e-20) gives the box blur of the same window over the in-image taps."""
    return mask_prototxt(height, width, kernel=kernel, dilation=1, lam=lam, rgb_scale=rgb_scale,
                         xy_scale=xy_scale).replace('name: "attention_masks"', 'name: "segaware_filter"') + f"""
layer {{ name: "mask_rgb" type: "Tile" bottom: "mask" top: "mask_rgb" tile_param {{ axis: 1 tiles: 3 }} }}
layer {{ name: "image_cols" type: "Im2col" bottom: "image" top: "image_cols"
  convolution_param {{ kernel_size: {kernel} pad: {kernel // 2} }} }}
layer {{ name: "weighted_cols" type: "Eltwise" bottom: "image_cols" bottom: "mask_rgb" top: "weighted_cols"
  eltwise_param {{ operation: PROD }} }}
layer {{ name: "weighted_sum" type: "ChannelReduce" bottom: "weighted_cols" top: "weighted_sum"
  channel_reduce_param {{ num_channels: 3 operation: SUM }} }}
layer {{ name: "mask_sum" type: "ChannelReduce" bottom: "mask" top: "mask_sum"
  channel_reduce_param {{ num_channels: 1 operation: SUM }} }}
layer {{ name: "mask_sum_eps" type: "Power" bottom: "mask_sum" top: "mask_sum_eps" power_param {{ shift: {eps} }} }}
layer {{ name: "inv_mask_sum" type: "Power" bottom: "mask_sum_eps" top: "inv_mask_sum" power_param {{ power: -1 }} }}
layer {{ name: "inv_mask_sum_rgb" type: "Tile" bottom: "inv_mask_sum" top: "inv_mask_sum_rgb"
  tile_param {{ axis: 1 tiles: 3 }} }}
layer {{ name: "filtered" type: "Eltwise" bottom: "weighted_sum" bottom: "inv_mask_sum_rgb" top: "filtered"
  eltwise_param {{ operation: PROD }} }}
"""


# ---------------------------------------------------------------------------- drawing
def heat_colours(values):
    """[0, 1] -> RGB uint8 along black - purple - orange - yellow - white (an 'inferno'-like ramp)."""
    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], float)
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.minimum(position.astype(int), len(stops) - 2)
    t = (position - low)[..., None]
    return np.round(stops[low] * (1 - t) + stops[low + 1] * t).astype(np.uint8)


def to_uint8(image):
    """(1, 3, H, W) tensor in [0, 1] -> H x W x 3 uint8."""
    return np.round(image[0].detach().clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def draw_masks(photo, masks, points, kernel, scale=3, panel=None):
    """Photo (with coloured markers) beside one heat map per point (the Fig. 3 layout)."""
    height, width = photo.shape[:2]
    left = Image.fromarray(photo).resize((width * scale, height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(left)
    for (row, col), colour in zip(points, MARKER_COLOURS):
        y, x = row * scale + scale // 2, col * scale + scale // 2
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=colour, width=2)
    panel = panel or (height * scale) // 2 - 6
    columns = (len(masks) + 1) // 2
    canvas = Image.new("RGB", (left.width + columns * (panel + 8) + 4, left.height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    for i, (mask, colour) in enumerate(zip(masks, MARKER_COLOURS)):
        tile = Image.fromarray(heat_colours(mask.reshape(kernel, kernel))).resize((panel, panel), Image.NEAREST)
        x0 = left.width + 6 + (i // 2) * (panel + 8)
        y0 = 2 + (i % 2) * (panel + 8)
        ImageDraw.Draw(canvas).rectangle([x0 - 2, y0 - 2, x0 + panel + 1, y0 + panel + 1], fill=colour)
        canvas.paste(tile, (x0, y0))
    return canvas


def side_by_side(images, gap=4):
    height = max(i.shape[0] for i in images)
    canvas = Image.new("RGB", (sum(i.shape[1] for i in images) + gap * (len(images) - 1), height), (255, 255, 255))
    x = 0
    for image in images:
        canvas.paste(Image.fromarray(image), (x, 0))
        x += image.shape[1] + gap
    return canvas


# ---------------------------------------------------------------------------- the demo
@dataclass
class DemoResult:
    files: dict               # what -> path
    roundtrip_blobs: int      # blobs compared bit for bit in (c)
    seconds: float


def embedding_trunk_prototxt(size=65):
    """A reduced embedding trunk in the style of the released nets (VGG-like convs, MAX pool k3 s2
    p1, Interp back to full size, concat with the RGB, 1x1 conv to a 64-d embedding)."""
    layers = [f'name: "embedding_trunk"\ninput: "data"\ninput_shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }}']
    bottom = "data"
    for name, channels in (("conv1_1", 64), ("conv1_2", 64), ("pool1", None), ("conv2_1", 128),
                           ("conv2_2", 128), ("pool2", None), ("conv3_1", 256)):
        if channels is None:
            layers.append(f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
                          f'pooling_param {{ pool: MAX kernel_size: 3 stride: 2 pad: 1 }} }}')
        else:
            layers.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                          f'param {{ lr_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }} '
                          f'convolution_param {{ num_output: {channels} kernel_size: 3 pad: 1 '
                          f'weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" value: 0.1 }} }} }}')
            layers.append(f'layer {{ name: "relu{name[4:]}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
        bottom = name
    layers.append(f'layer {{ name: "conv3_resized" type: "Interp" bottom: "conv3_1" top: "conv3_resized" '
                  f'interp_param {{ height: {size} width: {size} }} }}')
    layers.append('layer { name: "fused" type: "Concat" bottom: "data" bottom: "conv1_2" '
                  'bottom: "conv3_resized" top: "fused" }')
    layers.append('layer { name: "emb" type: "Convolution" bottom: "fused" top: "emb" '
                  'convolution_param { num_output: 64 kernel_size: 1 weight_filler { type: "xavier" } } }')
    return "\n".join(layers) + "\n"


def weights_round_trip(workdir, config=None):
    """(c): filler weights of `config` (a deploy prototxt, e.g. the released config/embs or vgg
    deploy; default: a reduced embedding trunk) -> caffemodel -> safetensors -> caffemodel.
    Returns the number of blobs that came back bit-identical (raises if any differs)."""
    import torch
    from segaware_caffe import caffe_proto
    from segaware_caffe.converters import caffemodel as cm
    from segaware_caffe import Net
    prototxt = config or embedding_trunk_prototxt()
    torch.manual_seed(0)
    net = Net(prototxt, fuse=False)
    first = os.path.join(workdir, "filler.caffemodel")
    net.save_weights(first)
    tensors, metadata, _ = cm.caffemodel_to_tensors(net, first, prototxt=prototxt)
    cm.save_tensors(os.path.join(workdir, "model.safetensors"), tensors, metadata)
    tensors, metadata = cm.load_tensors(os.path.join(workdir, "model.safetensors"))
    back, _ = cm.tensors_to_caffemodel(net, tensors, metadata)
    source = caffe_proto.read_weights(first)
    returned = {layer.name: layer for layer in back.layer}
    compared = 0
    for layer in source.layer:
        for i, blob in enumerate(layer.blobs):
            if blob.SerializeToString() != returned[layer.name].blobs[i].SerializeToString():
                raise RuntimeError(f"round trip changed layer {layer.name} blob {i}")
            compared += 1
    return compared


def _save(image, path, overwrite):
    from segaware_caffe.files import CLI_HINT, open_new
    with open_new(path, overwrite=overwrite, hint=CLI_HINT) as f:
        image.save(f, format="PNG")


def run_demo(out_dir, size=192, kernel=9, lam=6.0, mask_kernel=15, mask_dilation=2, config=None,
             overwrite=False):
    """Writes the pictures into `out_dir`, which must be new or empty unless `overwrite`."""
    import torch
    from segaware_caffe import Net
    start = time.time()
    prepare_output_dir(out_dir, overwrite)
    image, _ = load_photo(size)
    height, width = image.shape[2:]
    files = {}

    # (a) attention masks at a few pixels
    mask_net = Net(mask_prototxt(height, width, kernel=mask_kernel, dilation=mask_dilation, lam=lam))
    with torch.no_grad():
        masks = mask_net.forward(outputs=["mask"], image=image)["mask"][0]
    points = [(min(height - 1, int(r * height)), min(width - 1, int(c * width))) for r, c in MASK_POINTS]
    photo = to_uint8(image)
    files["masks"] = os.path.join(out_dir, "attention_masks.png")
    _save(draw_masks(photo, [masks[:, r, c].numpy() for r, c in points], points, mask_kernel),
          files["masks"], overwrite)

    # (b) segmentation-aware filtering vs a box blur of the same window
    results = {}
    # lambda -> 0 is the box blur: every in-image tap weighs 1, while out-of-image taps (removed,
    # distance BIG) still get exp(-lambda * BIG) = 0
    for name, strength in (("segaware", lam), ("box", 1e-20)):
        net = Net(filter_prototxt(height, width, kernel=kernel, lam=strength))
        with torch.no_grad():
            results[name] = to_uint8(net.forward(outputs=["filtered"], image=image)["filtered"])
    for name, picture in (("photo", photo), ("box_blur", results["box"]),
                          ("segaware_filtered", results["segaware"])):
        files[name] = os.path.join(out_dir, f"{name}.png")
        _save(Image.fromarray(picture), files[name], overwrite)
    files["comparison"] = os.path.join(out_dir, "comparison.png")
    _save(side_by_side([photo, results["box"], results["segaware"]]), files["comparison"], overwrite)

    # (c) caffemodel -> safetensors -> caffemodel for a released config
    with tempfile.TemporaryDirectory() as workdir:
        blobs = weights_round_trip(workdir, config)
    return DemoResult(files, blobs, time.time() - start)


def add_arguments(parser):
    parser.add_argument("--out", default="segaware_demo", help="output folder (default ./segaware_demo)")
    parser.add_argument("--size", type=int, default=192, help="photo width in pixels (default 192)")
    parser.add_argument("--lam", type=float, default=6.0, help="mask sharpness lambda (default 6)")
    parser.add_argument("--config", metavar="DEPLOY.prototxt",
                        help="net for the weights round trip, e.g. the released config/embs/deploy.prototxt "
                             "(default: a reduced embedding trunk written by the demo)")
    add_force_argument(parser, "the files of a non-empty --out folder")


def run(args):
    if not 16 <= args.size <= MAX_SIZE:
        raise UsageError(f"--size must be 16..{MAX_SIZE} pixels, got {args.size}")
    result = run_demo(args.out, size=args.size, lam=args.lam, config=args.config,
                      overwrite=args.force)
    print("(a) local attention masks exp(-lambda * Im2dist_L1(RGB+xy)) at 4 pixels:")
    print(f"    {result.files['masks']}")
    print("(b) segmentation-aware filtering (Eq. 4, a prototxt run by segaware_caffe.Net) vs box blur:")
    for name in ("photo", "box_blur", "segaware_filtered", "comparison"):
        print(f"    {result.files[name]}")
    print(f"(c) {os.path.basename(args.config) if args.config else 'embedding trunk'} filler weights: "
          f"caffemodel -> safetensors -> caffemodel, {result.roundtrip_blobs} blobs bit-identical")
    print(f"done in {result.seconds:.1f} s; images in {os.path.abspath(args.out)}")
    return 0
