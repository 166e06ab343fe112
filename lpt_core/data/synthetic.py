"""The embedded demo domain: a procedurally drawn long-tailed image dataset with a rendering shift (design.md).

Each image shows 1-3 objects on a textured background. Attributes, and who fixes them:
- group g (of `num_groups`): the object's shape family (10 shapes) and the background texture (5 families x 2
  frequency bands); these are what classes of a group share, what LPT's group prompts can latch on to;
- class (`classes_per_group` per group, distinct within a group): hue (6), count (1-3), orientation (0/45/90 deg,
  up to a random mirror, so horizontal flips keep the label) and fill (solid / outline);
- instance: position, size, rotation jitter, mirror, colour jitter, background colours and phase, noise.
Class c belongs to group c % num_groups, so every group spans head and tail classes.

Splits. *target*: the long-tailed train split, n_c = floor(n_max * (1 / tau) ** (c / (C - 1))), plus a balanced
test (and optional val) split. *source*: a balanced split for pretraining the micro ViT (experiments/pretrain_demo.py)
whose label is (background texture, hue), 60 classes, with shape, count, orientation and fill drawn at random:
the backbone learns colour and texture, the cues a micro ViT picks up in a few epochs (in this budget it learns
no shape at all), but not the target's label set. The source is drawn cleanly; the target with thicker strokes,
blur, noise, shifted and paler hues and brighter backgrounds (`shift` in [0, 1] scales this), so frozen source
features transfer, imperfectly: a linear probe of the pretrained micro ViT gets ~44% on the target (chance 2%),
~68% with shift=0.

Options (`data.options`, defaults in DemoOptions): num_classes 50, num_groups 10, tau 100, n_max 200,
test_per_class 200 (10,000 test images: a 95 % interval of overall accuracy within +/-1 point), val_per_class 0,
source_per_class 300, source_test_per_class 20, shift 1.0, image_size 32, seed 0.
Splits are deterministic in their options and cached as uint8 tensors under `cache_dir/demo/<hash>.pt`
(target-* and source-*: each file's hash names only the options that change it).
"""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from lpt_core.config import ConfigError, DataConfig
from lpt_core.data.base import DatasetBundle, Normalization, register_dataset
from lpt_core.data.cifar_lt import ArrayImageDataset, long_tail_counts
from lpt_core.files import atomic_write_bytes, content_key
from lpt_core.data.manifest import check_options
from lpt_core.data.transforms import build_transforms

GENERATOR_VERSION = 2  # bump when the drawing changes: it is part of every cache key
NUM_SHAPES, NUM_TEXTURES, NUM_HUES, COUNTS, ORIENTATIONS = 10, 10, 6, (1, 2, 3), (0.0, 45.0, 90.0)
NUM_CLASS_ATTRIBUTES = NUM_HUES * len(COUNTS) * len(ORIENTATIONS) * 2  # 108 (hue, count, orientation, fill)
NUM_SOURCE_CLASSES = NUM_TEXTURES * NUM_HUES  # source label = texture * NUM_HUES + hue
OBJECT_RADIUS = ((6.5, 8.5), (5.0, 6.5), (4.0, 5.0))  # pixels of a 32-pixel image, for 1, 2, 3 objects


@dataclass(frozen=True)
class DemoOptions:
    """`data.options` of the demo dataset, with the defaults of the embedded demo experiment."""

    num_classes: int = 50
    num_groups: int = 10
    tau: float = 100.0
    n_max: int = 200
    test_per_class: int = 200  # 50 x 200 test images: the binomial 95 % half-width is at most 0.98 points
    val_per_class: int = 0
    source_per_class: int = 300
    source_test_per_class: int = 20
    shift: float = 1.0  # 0: the target is drawn like the source; 1: the full rendering shift
    image_size: int = 32
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: DataConfig) -> DemoOptions:
        types = {f.name: (float if f.type == "float" else int) for f in fields(cls)}
        options = cls(**check_options(cfg, types))
        options.validate()
        return options

    def validate(self) -> None:
        def check(ok: bool, key: str, expectation: str) -> None:
            if not ok:
                raise ConfigError(f"data.options.{key}={getattr(self, key)!r} (dataset 'demo'): {expectation}")

        check(self.num_classes >= 2, "num_classes", "must be >= 2")
        check(1 <= self.num_groups <= min(self.num_classes, NUM_SHAPES * NUM_TEXTURES), "num_groups",
              f"must be in [1, min(num_classes, {NUM_SHAPES * NUM_TEXTURES})]")
        check(self.classes_per_group <= NUM_CLASS_ATTRIBUTES, "num_classes",
              f"allows at most {NUM_CLASS_ATTRIBUTES} classes per group (num_groups={self.num_groups})")
        check(self.tau >= 1, "tau", "the imbalance ratio n_max / n_min must be >= 1")
        check(self.n_max >= self.tau, "n_max", f"must be >= tau={self.tau} so the rarest class keeps an image")
        for key in ("test_per_class", "source_per_class", "source_test_per_class"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.val_per_class >= 0, "val_per_class", "must be >= 0")
        check(0.0 <= self.shift <= 1.0, "shift", "must be in [0, 1]")
        check(16 <= self.image_size <= 256, "image_size", "must be in [16, 256]")

    @property
    def classes_per_group(self) -> int:
        return -(-self.num_classes // self.num_groups)

    def digest(self, *keys: str) -> str:
        """Cache key of the options named (all when none): only what changes a split may name its file."""
        values = dataclasses.asdict(self)
        chosen = {k: values[k] for k in (keys or values)}
        return content_key({"version": GENERATOR_VERSION, **chosen})


@dataclass(frozen=True)
class Rendering:
    """How an image is drawn, apart from what it shows; sizes in pixels of a 32-pixel image."""

    stroke: float  # outline width
    blur: float  # Gaussian sigma
    noise: float  # pixel noise std (0-1 scale)
    hue_offset: float  # degrees added to every class hue
    hue_jitter: float  # +- degrees per image
    saturation: tuple[float, float]
    bg_value: tuple[float, float]  # background brightness range
    bg_saturation: float
    bg_contrast: float  # amplitude of the texture
    rotation_jitter: float  # +- degrees per object

    def towards(self, other: Rendering, t: float) -> Rendering:
        def mix(a, b):
            return tuple(mix(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else a + t * (b - a)

        return Rendering(*(mix(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))


SOURCE_RENDERING = Rendering(stroke=1.0, blur=0.0, noise=0.02, hue_offset=0.0, hue_jitter=6.0, saturation=(0.75, 1.0),
                             bg_value=(0.1, 0.4), bg_saturation=0.25, bg_contrast=0.3, rotation_jitter=8.0)
TARGET_RENDERING = Rendering(stroke=1.7, blur=0.7, noise=0.05, hue_offset=14.0, hue_jitter=12.0,
                             saturation=(0.4, 0.8), bg_value=(0.2, 0.5), bg_saturation=0.45, bg_contrast=0.3,
                             rotation_jitter=14.0)


# ---- shapes: signed distance (< 0 inside) in object units, drawn upright; x right, y up ----
def _box(x, y, cx, cy, hx, hy):
    qx, qy = np.abs(x - cx) - hx, np.abs(y - cy) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _segment(x, y, a, b, width):
    (ax, ay), (bx, by) = a, b
    t = np.clip(((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2), 0, 1)
    return np.hypot(x - ax - t * (bx - ax), y - ay - t * (by - ay)) - width


def _polygon(x, y, vertices):
    """Convex polygon, vertices counter-clockwise: the largest distance to an edge line (exact inside)."""
    d = None
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
        nx, ny = by - ay, ax - bx
        edge = ((x - ax) * nx + (y - ay) * ny) / np.hypot(nx, ny)
        d = edge if d is None else np.maximum(d, edge)
    return d


SHAPES = (
    lambda x, y: (np.hypot(x / 0.5, y) - 1) * 0.5,  # ellipse
    lambda x, y: _box(x, y, 0, 0, 0.3, 1.0),  # bar
    lambda x, y: _polygon(x, y, [(0, 1), (-0.8, -0.75), (0.8, -0.75)]),  # triangle
    lambda x, y: np.minimum(_box(x, y, -0.35, 0.1, 0.22, 0.9), _box(x, y, 0.15, -0.6, 0.7, 0.2)),  # L
    lambda x, y: np.maximum(np.hypot(x, y + 0.35) - 0.95, -(y + 0.35)),  # half disk
    lambda x, y: np.minimum(_segment(x, y, (-0.75, -0.55), (0, 0.65), 0.2),
                            _segment(x, y, (0.75, -0.55), (0, 0.65), 0.2)),  # chevron
    lambda x, y: (np.abs(x) / 0.55 + np.abs(y) - 1) * 0.55 / np.hypot(1, 0.55),  # rhombus
    lambda x, y: np.minimum(_box(x, y, 0, 0.72, 0.85, 0.2), _box(x, y, 0, -0.15, 0.2, 0.85)),  # T
    lambda x, y: np.maximum(np.abs(np.hypot(x, y) - 0.72) - 0.22, -_box(x, y, 0.85, 0, 0.6, 0.28)),  # C ring
    lambda x, y: np.minimum(_box(x, y, 0, -0.4, 0.18, 0.55),
                            _polygon(x, y, [(0, 1.0), (-0.62, 0.2), (0.62, 0.2)])),  # arrow
)


def _texture(family: int, u, v, r, phase, period):
    """Background pattern in [0, 1]; u, v: rotated pixel coordinates, r: distance to a random centre."""
    k = 2 * np.pi / period
    if family == 0:  # stripes
        return 0.5 + 0.5 * np.sin(k * u + phase)
    if family == 1:  # checkerboard
        return 0.5 + 0.5 * np.tanh(3 * np.sin(k * u + phase) * np.sin(k * v + phase))
    if family == 2:  # dots
        return np.clip(2.5 * (np.cos(k * u + phase) * np.cos(k * v + phase) - 0.3), 0, 1)
    if family == 3:  # rings
        return 0.5 + 0.5 * np.sin(k * r + phase)
    return 0.5 + 0.5 * np.sin(k * u + 2.0 * np.sin(0.5 * k * v) + phase)  # waves


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    """Vectorised colorsys.hsv_to_rgb: arrays [N] in [0, 1] -> [N, 3]."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])
    return table[i, np.arange(len(h))]


def _layout(rng: np.random.Generator, count: int, size: int) -> tuple[np.ndarray, float]:
    """Centres [3, 2] of `count` non-overlapping objects kept off the border, and their radius in pixels."""
    radius = rng.uniform(*OBJECT_RADIUS[count - 1]) * size / 32
    spread = 0.1 if count == 1 else 0.28  # of the image side, around its centre
    low, high = (0.5 - spread) * size, (0.5 + spread) * size
    centres = np.full((3, 2), -1e3)
    for _ in range(100):
        centres[:count] = rng.uniform(low, high, (count, 2))
        gaps = [np.hypot(*(centres[i] - centres[j])) for i in range(count) for j in range(i)]
        if min(gaps, default=np.inf) > 2.1 * radius:
            break
        radius *= 0.98
    return centres, radius


def _objects_alpha(shape, count, orientation, filled, rendering: Rendering, gx, gy, rng) -> np.ndarray:
    """Coverage [N, S, S, 1] in [0, 1] of each image's objects, antialiased over one pixel."""
    n, size = len(shape), gx.shape[0]
    px = size / 32
    layouts = [_layout(rng, int(c), size) for c in count]
    centres = np.stack([c for c, _ in layouts])  # [N, 3, 2]
    radius = np.array([r for _, r in layouts])[:, None, None, None]  # [N, 1, 1, 1]
    angle = np.deg2rad(np.asarray(ORIENTATIONS)[orientation][:, None]
                       + rng.uniform(-1, 1, (n, 3)) * rendering.rotation_jitter)[..., None, None]  # [N, 3, 1, 1]
    mirror = rng.choice([-1.0, 1.0], n)[:, None, None, None]
    dx = gx - centres[:, :, 0, None, None]  # [N, 3, S, S]
    dy = centres[:, :, 1, None, None] - gy
    x = mirror * (np.cos(angle) * dx + np.sin(angle) * dy) / radius  # object units, upright
    y = (np.cos(angle) * dy - np.sin(angle) * dx) / radius
    dist = np.empty_like(x)
    for s in np.unique(shape):
        dist[shape == s] = SHAPES[s](x[shape == s], y[shape == s]) * radius[shape == s]  # pixels
    half_stroke = np.where(filled, np.inf, rendering.stroke * px / 2)[:, None, None, None]
    edge = np.maximum(dist, np.abs(dist) - half_stroke)  # outlines keep a band of the stroke's width
    return np.clip(0.5 - edge / px, 0, 1).max(axis=1)[..., None]  # unused slots lie far outside the image


def _background(texture, rendering: Rendering, gx, gy, rng) -> np.ndarray:
    """Textured background [N, S, S, 3]: two close colours mixed by the group's pattern."""
    n, size = len(texture), gx.shape[0]
    theta = rng.uniform(0, np.pi, (n, 1, 1))
    u, v = np.cos(theta) * gx + np.sin(theta) * gy, np.cos(theta) * gy - np.sin(theta) * gx
    ring_centre = rng.uniform(0.25, 0.75, (2, n, 1, 1)) * size
    r = np.hypot(gx - ring_centre[0], gy - ring_centre[1])
    period = np.where(texture // 5 == 0, 9.0, 4.5)[:, None, None] * size / 32 * rng.uniform(0.85, 1.15, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    pattern = np.empty((n, size, size))
    for family in range(5):
        m = texture % 5 == family
        pattern[m] = _texture(family, u[m], v[m], r[m], phase[m], period[m])
    low = _hsv_to_rgb(rng.uniform(0, 1, n), np.full(n, rendering.bg_saturation), rng.uniform(*rendering.bg_value, n))
    high = np.clip(low + rendering.bg_contrast, 0, 1)
    return low[:, None, None] + pattern[..., None] * (high - low)[:, None, None]


def render(shape, texture, hue, count, orientation, filled, rendering: Rendering, size: int,
           rng: np.random.Generator) -> np.ndarray:
    """Draws N images from per-image attribute arrays [N] (indices; filled bool) -> uint8 [N, size, size, 3]."""
    xs = np.arange(size) + 0.5
    gy, gx = np.meshgrid(xs, xs, indexing="ij")  # [S, S] pixel centres
    alpha = _objects_alpha(shape, count, orientation, filled, rendering, gx, gy, rng)
    background = _background(texture, rendering, gx, gy, rng)
    n = len(shape)
    fg_hue = (hue * 360 / NUM_HUES + rendering.hue_offset + rng.uniform(-1, 1, n) * rendering.hue_jitter) / 360
    foreground = _hsv_to_rgb(fg_hue % 1.0, rng.uniform(*rendering.saturation, n), rng.uniform(0.8, 1.0, n))
    image = background * (1 - alpha) + foreground[:, None, None] * alpha
    image = _blur(image, rendering.blur * size / 32) + rng.normal(0, rendering.noise, image.shape)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the two spatial axes of [N, S, S, 3], edges replicated."""
    if sigma <= 0:
        return image
    radius = int(np.ceil(2.5 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (1, 2):
        padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in range(4)], mode="edge")
        length = image.shape[axis]
        image = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(kernel))
    return image


# ---- splits ----
TARGET_KEYS = ("num_classes", "num_groups", "tau", "n_max", "test_per_class", "val_per_class", "shift", "image_size",
               "seed")
SOURCE_KEYS = ("source_per_class", "source_test_per_class", "image_size", "seed")
SPLIT_STREAMS = {"classes": 0, "train": 1, "test": 2, "val": 3, "source_train": 4, "source_test": 5}
CHUNK = 512  # images drawn at once: bounds the [N, 3 objects, S, S] float buffers


def group_identity(group: int) -> tuple[int, int]:
    """(shape, texture) of a group: distinct pairs for the first 100 groups (10 shapes x 10 textures)."""
    return group % NUM_SHAPES, (3 * (group % NUM_SHAPES) + group // NUM_SHAPES) % NUM_TEXTURES


def class_attributes(options: DemoOptions) -> np.ndarray:
    """[C, 6] int: shape, texture, hue, count index, orientation index, filled; distinct within each group."""
    rng = np.random.default_rng([options.seed, SPLIT_STREAMS["classes"]])
    combos = [rng.choice(NUM_CLASS_ATTRIBUTES, options.classes_per_group, replace=False)
              for _ in range(options.num_groups)]
    rows = []
    for c in range(options.num_classes):
        group, member = c % options.num_groups, c // options.num_groups
        hue, count, orientation, filled = np.unravel_index(combos[group][member],
                                                           (NUM_HUES, len(COUNTS), len(ORIENTATIONS), 2))
        rows.append((*group_identity(group), hue, count, orientation, filled))
    return np.array(rows, dtype=np.int64)


def _draw(attributes: np.ndarray, rendering: Rendering, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Images of the attribute rows [N, 6] (as class_attributes), drawn in chunks -> uint8 [N, S, S, 3]."""
    chunks = []
    for start in range(0, len(attributes), CHUNK):
        shape, texture, hue, count, orientation, filled = attributes[start:start + CHUNK].T
        chunks.append(render(shape, texture, hue, np.asarray(COUNTS)[count], orientation, filled.astype(bool),
                             rendering, size, rng))
    return torch.from_numpy(np.concatenate(chunks) if chunks else np.zeros((0, size, size, 3), np.uint8))


def _target_splits(options: DemoOptions) -> dict[str, torch.Tensor]:
    attributes = class_attributes(options)
    rendering = SOURCE_RENDERING.towards(TARGET_RENDERING, options.shift)
    per_class = {"train": long_tail_counts(options.tau, options.n_max, options.num_classes),
                 "test": [options.test_per_class] * options.num_classes,
                 "val": [options.val_per_class] * options.num_classes}
    splits = {}
    for name, counts in per_class.items():
        labels = np.repeat(np.arange(options.num_classes), counts)
        rng = np.random.default_rng([options.seed, SPLIT_STREAMS[name]])
        splits[f"{name}_images"] = _draw(attributes[labels], rendering, options.image_size, rng)
        splits[f"{name}_labels"] = torch.from_numpy(labels)
    return splits


def _source_splits(options: DemoOptions) -> dict[str, torch.Tensor]:
    splits = {}
    for name, per_class in (("train", options.source_per_class), ("test", options.source_test_per_class)):
        rng = np.random.default_rng([options.seed, SPLIT_STREAMS[f"source_{name}"]])
        labels = np.repeat(np.arange(NUM_SOURCE_CLASSES), per_class)
        n = len(labels)
        attributes = np.stack([rng.integers(0, NUM_SHAPES, n), labels // NUM_HUES, labels % NUM_HUES,
                               rng.integers(0, len(COUNTS), n), rng.integers(0, len(ORIENTATIONS), n),
                               rng.integers(0, 2, n)], axis=1)
        splits[f"{name}_images"] = _draw(attributes, SOURCE_RENDERING, options.image_size, rng)
        splits[f"{name}_labels"] = torch.from_numpy(labels)
    return splits


def _cached(path: Path, make) -> dict[str, torch.Tensor]:
    """Loads `path`, or makes the tensors and writes them atomically (temp file + rename) for the next caller."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    tensors = make()
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return tensors


def target_splits(cfg: DataConfig) -> dict[str, torch.Tensor]:
    """{train,test,val}_{images,labels} of the long-tailed target domain (uint8 [N, S, S, 3], int64 [N])."""
    options = DemoOptions.from_config(cfg)
    path = Path(cfg.cache_dir) / "demo" / f"target-{options.digest(*TARGET_KEYS)}.pt"
    return _cached(path, lambda: _target_splits(options))


def demo_source_split(cfg: DataConfig, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images uint8 [N, S, S, 3], labels int64 [N], number of source classes) of the balanced source domain."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: the source domain has 'train' and 'test'")
    options = DemoOptions.from_config(cfg)
    path = Path(cfg.cache_dir) / "demo" / f"source-{options.digest(*SOURCE_KEYS)}.pt"
    splits = _cached(path, lambda: _source_splits(options))
    return splits[f"{split}_images"], splits[f"{split}_labels"], NUM_SOURCE_CLASSES


def source_digest(cfg: DataConfig) -> str:
    """Names the source split: what a backbone pretrained on it depends on."""
    return DemoOptions.from_config(cfg).digest(*SOURCE_KEYS)


@register_dataset("demo")
def demo(cfg: DataConfig, norm: Normalization) -> DatasetBundle:
    options = DemoOptions.from_config(cfg)
    if cfg.eval_split == "val" and options.val_per_class == 0:
        raise ConfigError("data.eval_split='val' needs data.options.val_per_class >= 1 for dataset 'demo'")
    splits = target_splits(cfg)
    images, labels = splits["train_images"].numpy(), splits["train_labels"]
    train_tf = build_transforms(cfg.img_size, cfg.resize_size, norm, True, cfg.crop_min_scale)
    test_tf = build_transforms(cfg.img_size, cfg.resize_size, norm, False, cfg.crop_min_scale)
    eval_images, eval_labels = splits[f"{cfg.eval_split}_images"].numpy(), splits[f"{cfg.eval_split}_labels"]
    names = [f"g{c % options.num_groups}_c{c // options.num_groups}" for c in range(options.num_classes)]
    return DatasetBundle(
        name="demo", num_classes=options.num_classes, train=ArrayImageDataset(images, labels, train_tf),
        test=ArrayImageDataset(eval_images, eval_labels, test_tf), train_labels=labels,
        class_counts=torch.bincount(labels, minlength=options.num_classes),
        train_eval=ArrayImageDataset(images, labels, test_tf), class_names=names)
