"""The digits demo: find every handwritten digit, at every size, on pages the classifier has never seen.

The whole point of the project on real data, with no network: train a small padding-free
classifier on scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten digits,
scaled up ``scale`` times), with an eleventh "background" class for blank paper, noise and
digits that are off-centre, only partly in the window or of another size, so that it fires
only on centred digits of its window's size. Then convolutionalize it (``crop_equivalent``
must hold: no padding, no global context) and run it over an image pyramid of each held-out
page (held-out digits at random positions, drawn ``sizes`` times their 8x8 pixels): at scale
``scale / size`` a digit drawn ``size`` times has the trained size, so every size is found at
one scale (:func:`~convolutionalize.detect.detection_maps`). One suppression over all scales
turns the softmax maps into boxes in the page's pixels (:func:`~convolutionalize.detect.detect`),
scored against the ground truth per size and overall (a detection matches a true digit of the
same label at IoU >= 0.5). The training pages hold digits of the same sizes, resized the same
way, so the background class learns what a wrong-sized digit looks like at every scale.

It also converts the classifier at output stride 1 (a trous) and draws one page's class map
at both strides side by side (``strides.png``): what the finer stride buys.

:func:`run_demo` does all of it and returns a :class:`DemoResult`; ``convolutionalize demo``
prints it. Progress goes to the ``progress`` callback, never to stdout directly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .api import convolutionalize
from .detect import Detection, box_iou, class_probabilities, detect, detection_maps
from .frameworks.torch.layers import ConvolutionalizedModule
from .inference import ScaledMap
from .inference.pyramid import scaled_size
from .inference.resize import resize

__all__ = ["BACKGROUND", "LABELS", "DemoConfig", "DemoResult", "Page", "SizeScore",
           "digits_classifier", "make_page", "run_demo", "score", "score_by_size"]

logger = logging.getLogger(__name__)

BACKGROUND = 10
LABELS = [str(d) for d in range(10)] + ["background"]
JITTER = 1  # a digit up to this many pixels off-centre is still "centred" (half the stride)
OFF_CENTRE = 3  # a window this many pixels or more off a digit is background
SAME_SIZE = 1.2  # a digit within this factor of the window's size is the window's digit ...
OTHER_SIZE = 1.45  # ... one this factor or more larger or smaller is background (between: neither)
BACKGROUND_SHARE = 0.5  # of the background crops, per training epoch
GAP = 4  # minimum free pixels between digits on a page
NOISE = 0.05  # standard deviation of the page noise (paper is 1, ink 0)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the demo's numbers (the defaults are what ``make demo`` runs)."""

    seed: int = 0
    scale: int = 2  # the trained size: 8x8 digits -> 16x16 windows
    sizes: tuple[int, ...] = (2, 3, 4)  # digits on the pages drawn 16, 24, 32 px (8 * size)
    epochs: int = 10
    train_pages: int = 900  # small pages of training digits the training crops come from
    pages: int = 20  # held-out pages scored
    page_size: int = 512
    digits_per_page: int = 16
    threshold: float = 0.5
    iou: float = 0.3
    # one digit per place: a box overlapping a better one of any class this much goes. Below
    # 0.25, the IoU of a window inside one twice its side: a wrong-scale duplicate inside a
    # digit's box goes too (true digits never overlap). Chosen on pages of training digits.
    exclusive_iou: float | None = 0.2
    pictures: int = 3  # pages drawn as heatmap and detection PNGs

    def __post_init__(self) -> None:
        if not self.sizes or not all(isinstance(s, int) and s >= 1 for s in self.sizes):
            raise ValueError(f"sizes must be one or more positive ints (times the 8x8 pixels), got "
                             f"{self.sizes!r}")

    @property
    def scales(self) -> tuple[float, ...]:
        """The pyramid: at ``scale / size`` a digit drawn ``size`` times has the trained size."""
        return tuple(self.scale / size for size in self.sizes)


@dataclass
class Page:
    """A grey page (``(H, W)`` float32, paper 1, ink 0) and its true digits (a digit's size
    is its box's side)."""

    image: np.ndarray
    labels: list[int]
    boxes: list[Box]


@dataclass
class SizeScore:
    """The scores of the digits of one size (``size`` pixels square) and of the detections
    attributed to it: the true digit each matched, else the size nearest its box's."""

    size: int
    precision: float
    recall: float
    f1: float
    true_positives: int
    detections: int
    digits: int

    @classmethod
    def of(cls, size: int, tp: int, detections: int, digits: int) -> SizeScore:
        precision, recall = tp / max(detections, 1), tp / max(digits, 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        return cls(size, precision, recall, f1, tp, detections, digits)

    def line(self) -> str:
        return (f"precision {self.precision:.3f} recall {self.recall:.3f} F1 {self.f1:.3f} "
                f"({self.digits} digits, {self.detections} detections)")


@dataclass
class DemoResult:
    """What the demo measured and wrote."""

    precision: float
    recall: float
    f1: float
    true_positives: int
    detections: int
    digits: int
    pages: int
    train_digits: int
    heldout_digits: int
    train_accuracy: float
    crop_equivalent: bool
    window: tuple[int, int]
    stride: tuple[int, int]
    seconds: float
    scales: tuple[float, ...] = ()
    per_size: list[SizeScore] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def metrics_line(self) -> str:
        """Overall precision, recall and F1, then one line per digit size."""
        lines = [f"precision {self.precision:.3f} recall {self.recall:.3f} F1 {self.f1:.3f} "
                 f"(all sizes, {self.digits} digits)"]
        lines += [f"  {s.size}x{s.size} px: {s.line()}" for s in self.per_size]
        return "\n".join(lines)


def run_demo(output: str | Path, config: DemoConfig = DemoConfig(),
             progress: Callable[[str], None] | None = None) -> DemoResult:
    """Train, convolutionalize, detect on held-out pages across scales, score, write ``output/``."""
    say = progress or logger.info
    start = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    train, heldout = _split(config.seed)
    sides = ", ".join(str(8 * s) for s in config.sizes)
    say(f"load_digits: {len(train[1])} training digits, {len(heldout[1])} held out "
        f"(stratified, seed {config.seed}); windows {8 * config.scale}x{8 * config.scale}, "
        f"digits drawn {sides} px")
    crops, targets = _training_set(rng, train, config)
    say(f"training set: {len(targets)} crops ({int((targets == BACKGROUND).sum())} background) "
        f"from {config.train_pages} pages at scales {_scales_text(config.scales)}")
    model = digits_classifier(config.scale)
    accuracy = _train(model, crops, targets, config.epochs, say)
    fcn = convolutionalize(model, input_size=(8 * config.scale, 8 * config.scale))
    if not (isinstance(fcn, ConvolutionalizedModule) and fcn.geometry.crop_equivalent):
        raise RuntimeError("the digits classifier should convert crop-equivalently")
    pages = [make_page(rng, heldout, config.page_size, config.digits_per_page, config.sizes)
             for _ in range(config.pages)]
    found, maps = _detect_pages(fcn, pages, config)
    overall, per_size = _scores(pages, found, config)
    result = DemoResult(
        precision=overall.precision, recall=overall.recall, f1=overall.f1,
        true_positives=overall.true_positives, detections=overall.detections,
        digits=overall.digits, pages=len(pages), train_digits=len(train[1]),
        heldout_digits=len(heldout[1]), train_accuracy=accuracy,
        crop_equivalent=fcn.geometry.crop_equivalent, window=fcn.geometry.window,
        stride=fcn.geometry.stride, seconds=0.0, scales=config.scales, per_size=per_size)
    result.files = _write(output, model, fcn, pages, maps, found, config)
    result.seconds = time.perf_counter() - start
    (output / "metrics.json").write_text(json.dumps(
        {**asdict(result), "config": {**asdict(config), "scales": config.scales}}, indent=2) + "\n")
    result.files.append(str(output / "metrics.json"))
    return result


def _scales_text(scales: Sequence[float]) -> str:
    return ", ".join(f"{s:.3g}" for s in scales)


# --------------------------------------------------------------------------- data


def _split(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Stratified training / held-out split of ``load_digits`` (images 0..1, ink high)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, stratify=digits.target, random_state=seed)
    return (x_train, y_train), (x_test, y_test)


def make_page(rng: np.random.Generator, digits: tuple[np.ndarray, np.ndarray], size: int,
              count: int, scale: int | Sequence[int]) -> Page:
    """A ``size x size`` noisy page with up to ``count`` of ``digits`` at random positions,
    at least ``GAP`` pixels apart (rejection sampling; crowded pages get fewer), each drawn
    ``scale`` times its 8x8 pixels; with several scales, they take turns (from a random
    one), so that every size is about equally common."""
    images, targets = digits
    scales = [scale] if isinstance(scale, int) else list(scale)
    first = int(rng.integers(len(scales))) if len(scales) > 1 else 0
    ink = np.zeros((size, size), np.float32)
    labels: list[int] = []
    boxes: list[Box] = []
    for _ in range(count * 20):
        if len(boxes) == count:
            break
        zoom = scales[(first + len(boxes)) % len(scales)]
        side = 8 * zoom
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = (x0, y0, x0 + side, y0 + side)
        if any(_near(box, other, GAP) for other in boxes):
            continue
        k = int(rng.integers(len(targets)))
        ink[y0:y0 + side, x0:x0 + side] = np.kron(images[k], np.ones((zoom, zoom), np.float32))
        labels.append(int(targets[k]))
        boxes.append(box)
    page = 1.0 - ink + rng.normal(0.0, NOISE, ink.shape).astype(np.float32)
    return Page(np.clip(page, 0.0, 1.0), labels, boxes)


def _near(a: Box, b: Box, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _resized(image: np.ndarray, scale: float) -> tuple[np.ndarray, tuple[float, float]]:
    """``image`` at ``scale`` exactly as ``dense_map(scales=...)`` resizes it, and the factor
    ``(fy, fx)`` (resized size over original size) that takes original pixels there."""
    size = scaled_size(image.shape, scale)
    if size == image.shape:
        return image, (1.0, 1.0)
    small = resize(torch.from_numpy(image)[None], size)[0].numpy()
    return small, (size[0] / image.shape[0], size[1] / image.shape[1])


def _training_set(rng: np.random.Generator, train: tuple[np.ndarray, np.ndarray],
                  config: DemoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of small training pages (digits of every size in ``config.sizes``), each page
    resized to every scale of the pyramid as the held-out pages will be (:func:`_page_crops`)."""
    side = 8 * config.scale
    size = 4 * 8 * max(config.sizes)  # room for 4 digits of any size
    crops: list[np.ndarray] = []
    targets: list[int] = []
    for _ in range(config.train_pages):
        page = make_page(rng, train, size, 4, config.sizes)
        for scale in config.scales:
            image, factor = _resized(page.image, scale)
            _page_crops(rng, image, page, factor, side, crops, targets)
    return torch.from_numpy(np.stack(crops)[:, None]), torch.tensor(targets)


def _page_crops(rng: np.random.Generator, image: np.ndarray, page: Page, factor: tuple[float, float],
                side: int, crops: list[np.ndarray], targets: list[int]) -> None:
    """Crops of one page at one scale (``image``, the page resized by ``factor``): each digit
    centred (jittered up to ``JITTER`` pixels): its label when it has the window's size (within
    ``SAME_SIZE``), background when it is ``OTHER_SIZE`` times larger or smaller, nothing in
    between; each digit twice ``OFF_CENTRE`` or more pixels off (background, whatever its size);
    and a random crop that is not near the centre of a digit (blank paper, noise, parts of
    digits)."""
    centres = []
    for label, box in zip(page.labels, page.boxes):
        apparent = (box[2] - box[0]) * factor[1]
        ratio = max(apparent / side, side / apparent)
        x, y = _centred(box, factor, side)
        centres.append((x, y))
        if ratio <= SAME_SIZE or ratio >= OTHER_SIZE:
            dx, dy = rng.integers(-JITTER, JITTER + 1, 2)
            _take(image, x + dx, y + dy, side, label if ratio <= SAME_SIZE else BACKGROUND, crops, targets)
        for _ in range(2):
            dx, dy = _off_centre(rng, side)
            _take(image, x + dx, y + dy, side, BACKGROUND, crops, targets)
    x, y = (int(v) for v in rng.integers(0, np.array(image.shape[::-1]) - side + 1))
    if all(max(abs(x - cx), abs(y - cy)) >= OFF_CENTRE for cx, cy in centres):
        _take(image, x, y, side, BACKGROUND, crops, targets)


def _centred(box: Box, factor: tuple[float, float], side: int) -> tuple[int, int]:
    """The top-left corner of the ``side`` window centred on ``box`` in the resized page."""
    return (round((box[0] + box[2]) / 2 * factor[1] - side / 2),
            round((box[1] + box[3]) / 2 * factor[0] - side / 2))


def _off_centre(rng: np.random.Generator, side: int) -> tuple[int, int]:
    """A shift with at least one coordinate ``OFF_CENTRE`` .. ``side - 2`` pixels away."""
    far = int(rng.integers(OFF_CENTRE, side - 1)) * int(rng.choice([-1, 1]))
    near = int(rng.integers(-side // 2, side // 2 + 1))
    return (far, near) if rng.random() < 0.5 else (near, far)


def _take(image: np.ndarray, x: int, y: int, side: int, label: int, crops: list[np.ndarray],
          targets: list[int]) -> None:
    if 0 <= x and 0 <= y and y + side <= image.shape[0] and x + side <= image.shape[1]:
        crops.append(image[y:y + side, x:x + side])
        targets.append(label)


# --------------------------------------------------------------------------- model


def digits_classifier(scale: int = 2, classes: int = len(LABELS)) -> nn.Sequential:
    """The seeds' shape: padding-free convolutions, then Flatten -> Linear -> ReLU -> Linear.

    ``8 * scale`` square inputs (scale 2: 16 -> 14 -> 12 -> pool 6 -> 4, 32 x 4 x 4 features).
    The model carries what the command line reads: ``input_size`` and, with the demo's 11
    classes, ``labels`` and ``background_class``. ``load_model("demo:digits", weights)``
    builds it (scale 2) and loads a state_dict such as the demo's ``digits.pth``.
    """
    side = 8 * scale
    feature = (side - 4) // 2 - 2
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(),
        nn.Conv2d(16, 32, 3), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * feature * feature, 64), nn.ReLU(),
        nn.Linear(64, classes),
    )
    model.input_size = (side, side)  # type: ignore[assignment]
    if classes == len(LABELS):
        model.labels = LABELS  # type: ignore[assignment]
        model.background_class = BACKGROUND  # type: ignore[assignment]
    return model


def _train(model: nn.Module, crops: torch.Tensor, targets: torch.Tensor, epochs: int,
           say: Callable[[str], None]) -> float:
    """Adam with a one-cycle schedule (peak 8e-3); returns the final training accuracy. Each
    epoch sees every digit crop and a fresh random ``BACKGROUND_SHARE`` of the background
    crops: they outnumber the digits several times and most are easy, so half of them per
    epoch trains as well as all of them, in about half the time (both chosen on pages of
    training digits the model did not train on, never on the held-out pages)."""
    digits, background = (targets != BACKGROUND).nonzero()[:, 0], (targets == BACKGROUND).nonzero()[:, 0]
    per_epoch = len(digits) + round(BACKGROUND_SHARE * len(background))
    optimizer = torch.optim.Adam(model.parameters(), lr=8e-3)
    steps = epochs * ((per_epoch + 127) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=8e-3, total_steps=max(steps, 1))
    accuracy = 0.0
    model.train()
    for epoch in range(epochs):
        chosen = background[torch.randperm(len(background))[:per_epoch - len(digits)]]
        order = torch.cat([digits, chosen])[torch.randperm(per_epoch)]
        total, correct, seen = 0.0, 0, 0
        for batch in order.split(128):
            logits = model(crops[batch])
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == targets[batch]).sum())
            seen += len(batch)
        accuracy = correct / seen
        say(f"epoch {epoch + 1}/{epochs}  loss {total / seen:.4f}  train accuracy {accuracy:.4f}")
    model.eval()
    return accuracy


# --------------------------------------------------------------------------- detection


def _detect_pages(fcn: ConvolutionalizedModule, pages: list[Page], config: DemoConfig,
                  ) -> tuple[list[list[Detection]], list[list[ScaledMap]]]:
    """Each page's detections across the pyramid ``config.scales``, and its probability maps."""
    found, maps = [], []
    for page in pages:
        probs, _ = detection_maps(fcn, torch.from_numpy(page.image)[None], scales=config.scales)
        maps.append(probs)
        found.append(detect(probs, threshold=config.threshold, background_class=BACKGROUND,
                            iou=config.iou, exclusive_iou=config.exclusive_iou))
    return found, maps


def _matches(page: Page, dets: list[Detection], iou: float) -> list[int | None]:
    """For each detection, the true digit it matches (an index into ``page.boxes``) or ``None``:
    best first, each takes the unmatched true digit of its label that it overlaps most, if
    that IoU is >= ``iou``."""
    free = set(range(len(page.boxes)))
    matched: list[int | None] = [None] * len(dets)
    for n in sorted(range(len(dets)), key=lambda n: -dets[n].score):
        overlaps = [(box_iou(dets[n].box, page.boxes[k]), k) for k in free
                    if page.labels[k] == dets[n].label]
        best = max(overlaps, default=(0.0, -1))
        if best[0] >= iou:
            free.discard(best[1])
            matched[n] = best[1]
    return matched


def score(pages: list[Page], found: list[list[Detection]], iou: float = 0.5) -> tuple[int, int, int]:
    """``(true positives, detections, true digits)``: each detection, best first, matches the
    unmatched true digit of its label that it overlaps most, if that IoU is >= ``iou``."""
    tp = detections = digits = 0
    for page, dets in zip(pages, found):
        tp += sum(k is not None for k in _matches(page, dets, iou))
        detections += len(dets)
        digits += len(page.boxes)
    return tp, detections, digits


def score_by_size(pages: list[Page], found: list[list[Detection]], sides: Sequence[int],
                  iou: float = 0.5) -> dict[int, tuple[int, int, int]]:
    """:func:`score` per digit side in pixels, for each of ``sides``: the true digits of that
    size, and the detections attributed to it: a matched detection to its digit's size, any
    other to the side nearest its box's (by ratio). The counts add up to :func:`score`'s."""
    counts = {side: [0, 0, 0] for side in sides}
    for page, dets in zip(pages, found):
        for box in page.boxes:
            counts[_nearest(box[2] - box[0], sides)][2] += 1
        for det, k in zip(dets, _matches(page, dets, iou)):
            side = _nearest(det.box[2] - det.box[0] if k is None else
                            page.boxes[k][2] - page.boxes[k][0], sides)
            counts[side][0] += k is not None
            counts[side][1] += 1
    return {side: (tp, n_det, n_true) for side, (tp, n_det, n_true) in counts.items()}


def _scores(pages: list[Page], found: list[list[Detection]],
            config: DemoConfig) -> tuple[SizeScore, list[SizeScore]]:
    """All digits' scores (``size`` 0), and each size's."""
    by_size = score_by_size(pages, found, [8 * s for s in config.sizes])
    return (SizeScore.of(0, *score(pages, found)),
            [SizeScore.of(side, *counts) for side, counts in by_size.items()])


def _nearest(width: float, sides: Sequence[int]) -> int:
    return min(sides, key=lambda side: abs(math.log(width / side)))


# --------------------------------------------------------------------------- output


def _write(output: Path, model: nn.Module, fcn: ConvolutionalizedModule, pages: list[Page],
           maps: list[list[ScaledMap]], found: list[list[Detection]], config: DemoConfig) -> list[str]:
    """``digits.pth`` (the trained state_dict: ``load_model("demo:digits", path)``, or on the
    command line ``demo:digits --weights path``, which needs no ``--trust-pickle``); for the
    first pages: the page, its heatmaps (one panel per scale) and its detections; and
    ``strides.png``, page 0's class map at the network's stride and at output stride 1."""
    from .render import draw_detections

    files: list[Path] = [output / "digits.pth"]
    torch.save(model.state_dict(), files[0])
    for n, (page, probs, dets) in enumerate(zip(pages, maps, found)):
        if n >= config.pictures:
            break
        grey = Image.fromarray(np.round(page.image * 255).astype(np.uint8), mode="L")
        grey.save(output / f"page{n:02d}.png")
        _pyramid_heatmap(page, probs, fcn, config).save(output / f"page{n:02d}_heatmap.png")
        draw_detections(grey, dets, LABELS, truth=list(zip(page.labels, page.boxes)), zoom=2).save(
            output / f"page{n:02d}_detections.png")
        files += [output / f"page{n:02d}{suffix}.png" for suffix in ("", "_heatmap", "_detections")]
    if pages:
        files.append(output / "strides.png")
        _stride_comparison(model, fcn, pages[0], config.scale).save(files[-1])
    return [str(f) for f in files]


def _pyramid_heatmap(page: Page, maps: list[ScaledMap], fcn: ConvolutionalizedModule,
                     config: DemoConfig) -> Image.Image:
    """One panel per scale: ``1 - P(background)`` over the page resized to that scale, each
    enlarged to about twice the page's size (where the digits of one size light up)."""
    from .render import overlay

    panels = []
    for level in maps:
        image, _ = _resized(page.image, level.scale)
        zoom = max(1, round(2 * page.image.shape[0] / image.shape[0]))
        side = round(8 * config.scale / level.scale)
        panels.append(overlay(image, 1.0 - np.asarray(level.map)[BACKGROUND], fcn.geometry, zoom=zoom,
                              title=f"scale {level.scale:.3g}: {side} px digits, 1 - P(background)"))
    return _side_by_side(panels)


def _stride_comparison(model: nn.Module, fcn: ConvolutionalizedModule, page: Page,
                       scale: int) -> Image.Image:
    """Two panels of one digit's class probability around it on ``page``: at the network's
    stride (``fcn``) and at output stride 1 (``model`` converted with ``output_stride=1``,
    one window per pixel), enlarged 6 times. The digit is the page's first of the trained size
    (``8 * scale`` pixels), else its first; the region is four windows wide at most."""
    from .render import overlay

    side, width = 8 * scale, 4 * 8 * scale
    fine = convolutionalize(model, input_size=(side, side), output_stride=1)
    sizes = [box[2] - box[0] for box in page.boxes]
    k = sizes.index(side) if side in sizes else 0
    label, box = (page.labels[k], page.boxes[k]) if page.boxes else (0, (0, 0, side, side))
    x0, y0 = (_region_start(start, end, width, length)
              for start, end, length in ((box[0], box[2], page.image.shape[1]),
                                         (box[1], box[3], page.image.shape[0])))
    crop = np.ascontiguousarray(page.image[y0:y0 + width, x0:x0 + width])
    panels = []
    for converted, what in ((fcn, "network stride"), (fine, "output stride 1")):
        probs = class_probabilities(converted, torch.from_numpy(crop)[None])
        every = "pixel" if converted.geometry.stride == (1, 1) else f"{converted.geometry.stride[0]} px"
        panels.append(overlay(crop, probs[label], converted.geometry, zoom=6,
                              title=f"P({LABELS[label]}), {what}: a window every {every} "
                                    f"({probs.shape[1]}x{probs.shape[2]})"))
    return _side_by_side(panels)


def _region_start(start: int, end: int, width: int, length: int) -> int:
    """Where a ``width`` region centred on ``[start, end)`` starts, inside ``[0, length)``."""
    return int(min(max((start + end - width) // 2, 0), max(length - width, 0)))


def _side_by_side(panels: list[Image.Image], gap: int = 4) -> Image.Image:
    """``panels`` left to right on white, ``gap`` pixels apart, top-aligned."""
    sheet = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1),
                              max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + gap
    return sheet
