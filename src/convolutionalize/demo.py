"""The digits demo: find every handwritten digit on pages the classifier has never seen.

The whole point of the project on real data, with no network: train a small padding-free
classifier on scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten digits,
scaled up ``scale`` times), with an eleventh "background" class for blank paper, noise and
digits that are off-centre or only partly in the window, so that it fires only on centred
digits. Then convolutionalize it (``crop_equivalent`` must hold: no padding, no global
context), run it once over each held-out page (held-out digits at random positions), turn
the softmax map into boxes with :func:`~convolutionalize.detect.detect`, and score them
against the ground truth (a detection matches a true digit of the same label at IoU >= 0.5).

:func:`run_demo` does all of it and returns a :class:`DemoResult`; ``convolutionalize demo``
prints it. Progress goes to the ``progress`` callback, never to stdout directly.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .api import convolutionalize
from .detect import Detection, box_iou, class_probabilities, detect
from .frameworks.torch.layers import ConvolutionalizedModule

__all__ = ["BACKGROUND", "LABELS", "DemoConfig", "DemoResult", "Page", "digits_classifier",
           "make_page", "run_demo", "score"]

logger = logging.getLogger(__name__)

BACKGROUND = 10
LABELS = [str(d) for d in range(10)] + ["background"]
JITTER = 1  # a digit up to this many pixels off-centre is still "centred" (half the stride)
OFF_CENTRE = 3  # a window this many pixels or more off a digit is background
GAP = 4  # minimum free pixels between digits on a page
NOISE = 0.05  # standard deviation of the page noise (paper is 1, ink 0)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the demo's numbers (the defaults are what ``make demo`` runs)."""

    seed: int = 0
    scale: int = 2  # 8x8 digits -> 16x16 windows
    epochs: int = 10
    train_pages: int = 900  # small pages of training digits the training crops come from
    pages: int = 20  # held-out pages scored
    page_size: int = 512
    digits_per_page: int = 16
    threshold: float = 0.5
    iou: float = 0.3
    exclusive_iou: float | None = 0.4  # one digit per place: classes suppress each other
    pictures: int = 3  # pages drawn as heatmap and detection PNGs


@dataclass
class Page:
    """A grey page (``(H, W)`` float32, paper 1, ink 0) and its true digits."""

    image: np.ndarray
    labels: list[int]
    boxes: list[Box]


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
    files: list[str] = field(default_factory=list)

    def metrics_line(self) -> str:
        return f"precision {self.precision:.3f} recall {self.recall:.3f} F1 {self.f1:.3f}"


def run_demo(output: str | Path, config: DemoConfig = DemoConfig(),
             progress: Callable[[str], None] | None = None) -> DemoResult:
    """Train, convolutionalize, detect on held-out pages, score, and write ``output/``."""
    say = progress or logger.info
    start = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    train, heldout = _split(config.seed)
    say(f"load_digits: {len(train[1])} training digits, {len(heldout[1])} held out "
        f"(stratified, seed {config.seed}); windows {8 * config.scale}x{8 * config.scale}")
    crops, targets = _training_set(rng, train, config)
    say(f"training set: {len(targets)} crops ({int((targets == BACKGROUND).sum())} background)")
    model = digits_classifier(config.scale)
    accuracy = _train(model, crops, targets, config.epochs, say)
    fcn = convolutionalize(model, input_size=(8 * config.scale, 8 * config.scale))
    if not (isinstance(fcn, ConvolutionalizedModule) and fcn.geometry.crop_equivalent):
        raise RuntimeError("the digits classifier should convert crop-equivalently")
    pages = [make_page(rng, heldout, config.page_size, config.digits_per_page, config.scale)
             for _ in range(config.pages)]
    found, maps = _detect_pages(fcn, pages, config)
    tp, n_det, n_true = score(pages, found)
    precision, recall = tp / max(n_det, 1), tp / max(n_true, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    result = DemoResult(
        precision=precision, recall=recall, f1=f1, true_positives=tp, detections=n_det,
        digits=n_true, pages=len(pages), train_digits=len(train[1]),
        heldout_digits=len(heldout[1]), train_accuracy=accuracy,
        crop_equivalent=fcn.geometry.crop_equivalent, window=fcn.geometry.window,
        stride=fcn.geometry.stride, seconds=0.0)
    result.files = _write(output, model, fcn, pages, maps, found, config)
    result.seconds = time.perf_counter() - start
    (output / "metrics.json").write_text(json.dumps(
        {**asdict(result), "config": asdict(config)}, indent=2) + "\n")
    result.files.append(str(output / "metrics.json"))
    return result


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
              count: int, scale: int) -> Page:
    """A ``size x size`` noisy page with up to ``count`` of ``digits`` at random positions,
    at least ``GAP`` pixels apart (rejection sampling; crowded pages get fewer)."""
    images, targets = digits
    side = 8 * scale
    ink = np.zeros((size, size), np.float32)
    labels: list[int] = []
    boxes: list[Box] = []
    for _ in range(count * 20):
        if len(boxes) == count:
            break
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = (x0, y0, x0 + side, y0 + side)
        if any(_near(box, other, GAP) for other in boxes):
            continue
        k = int(rng.integers(len(targets)))
        ink[y0:y0 + side, x0:x0 + side] = np.kron(images[k], np.ones((scale, scale), np.float32))
        labels.append(int(targets[k]))
        boxes.append(box)
    page = 1.0 - ink + rng.normal(0.0, NOISE, ink.shape).astype(np.float32)
    return Page(np.clip(page, 0.0, 1.0), labels, boxes)


def _near(a: Box, b: Box, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _training_set(rng: np.random.Generator, train: tuple[np.ndarray, np.ndarray],
                  config: DemoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of small training pages: each digit centred (jittered up to ``JITTER`` pixels,
    its label), the same digit ``OFF_CENTRE`` or more pixels off (background), and random
    crops that are not near any digit's centre (blank paper, noise, parts of digits)."""
    side = 8 * config.scale
    size = 6 * side
    crops: list[np.ndarray] = []
    targets: list[int] = []
    for _ in range(config.train_pages):
        page = make_page(rng, train, size, 4, config.scale)
        for label, (x0, y0, _, _) in zip(page.labels, page.boxes):
            dx, dy = rng.integers(-JITTER, JITTER + 1, 2)
            if _take(page.image, x0 + dx, y0 + dy, side, crops):
                targets.append(label)
            for _ in range(2):
                dx, dy = _off_centre(rng, side)
                if _take(page.image, x0 + dx, y0 + dy, side, crops):
                    targets.append(BACKGROUND)
        for _ in range(2):
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            if all(max(abs(x - b[0]), abs(y - b[1])) >= OFF_CENTRE for b in page.boxes):
                crops.append(page.image[y:y + side, x:x + side])
                targets.append(BACKGROUND)
    return torch.from_numpy(np.stack(crops)[:, None]), torch.tensor(targets)


def _off_centre(rng: np.random.Generator, side: int) -> tuple[int, int]:
    """A shift with at least one coordinate ``OFF_CENTRE`` .. ``side - 2`` pixels away."""
    far = int(rng.integers(OFF_CENTRE, side - 1)) * int(rng.choice([-1, 1]))
    near = int(rng.integers(-side // 2, side // 2 + 1))
    return (far, near) if rng.random() < 0.5 else (near, far)


def _take(image: np.ndarray, x: int, y: int, side: int, crops: list[np.ndarray]) -> bool:
    if x < 0 or y < 0 or y + side > image.shape[0] or x + side > image.shape[1]:
        return False
    crops.append(image[y:y + side, x:x + side])
    return True


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
    """Adam with a cosine schedule; returns the final training accuracy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = epochs * ((len(targets) + 127) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(steps, 1))
    accuracy = 0.0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(targets))
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
                  ) -> tuple[list[list[Detection]], list[np.ndarray]]:
    found, maps = [], []
    for page in pages:
        probs = class_probabilities(fcn, torch.from_numpy(page.image)[None])
        maps.append(probs)
        found.append(detect(probs, fcn.geometry, threshold=config.threshold,
                            background_class=BACKGROUND, iou=config.iou,
                            exclusive_iou=config.exclusive_iou))
    return found, maps


def score(pages: list[Page], found: list[list[Detection]], iou: float = 0.5) -> tuple[int, int, int]:
    """``(true positives, detections, true digits)``: each detection, best first, matches the
    unmatched true digit of its label that it overlaps most, if that IoU is >= ``iou``."""
    tp = detections = digits = 0
    for page, dets in zip(pages, found):
        free = set(range(len(page.boxes)))
        for det in sorted(dets, key=lambda d: -d.score):
            overlaps = [(box_iou(det.box, page.boxes[k]), k) for k in free
                        if page.labels[k] == det.label]
            best = max(overlaps, default=(0.0, -1))
            if best[0] >= iou:
                free.discard(best[1])
                tp += 1
        detections += len(dets)
        digits += len(page.boxes)
    return tp, detections, digits


# --------------------------------------------------------------------------- output


def _write(output: Path, model: nn.Module, fcn: ConvolutionalizedModule, pages: list[Page],
           maps: list[np.ndarray], found: list[list[Detection]], config: DemoConfig) -> list[str]:
    """``digits.pth`` (the trained state_dict: ``load_model("demo:digits", path)``, or on the
    command line ``demo:digits --weights path``, which needs no ``--trust-pickle``), and for
    the first pages: the page, its heatmap, its detections."""
    from PIL import Image

    from .render import draw_detections, heatmap

    files: list[Path] = [output / "digits.pth"]
    torch.save(model.state_dict(), files[0])
    for n, (page, probs, dets) in enumerate(zip(pages, maps, found)):
        if n >= config.pictures:
            break
        grey = Image.fromarray(np.round(page.image * 255).astype(np.uint8), mode="L")
        grey.save(output / f"page{n:02d}.png")
        heatmap(grey, probs, fcn.geometry, top=1, labels=LABELS, background_class=BACKGROUND,
                any_object=True, zoom=2).save(output / f"page{n:02d}_heatmap.png")
        draw_detections(grey, dets, LABELS, truth=list(zip(page.labels, page.boxes)), zoom=2).save(
            output / f"page{n:02d}_detections.png")
        files += [output / f"page{n:02d}{suffix}.png" for suffix in ("", "_heatmap", "_detections")]
    return [str(f) for f in files]
