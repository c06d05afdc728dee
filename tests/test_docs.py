"""Every code block of README.md and docs/ runs as written.

Each page is one test. Its fenced blocks run in order in a fresh folder: ```python blocks in one
namespace per page, every ``$ `` line of a ```console block as a command (``convolutionalize ...``
through the CLI's ``main``, exit code 0 expected). ```text blocks are output listings and do not
run. What a page needs that this machine cannot give (the network, a real slide, the full demo)
is substituted visibly, in the tables below; anything else a page says must run unchanged.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from convolutionalize.cli import main
from convolutionalize.demo import run_demo
from test_demo import FAST

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
RUNS = {"python", "console"}  # the fences that run; "text" is output, anything else is refused

# commands a page shows that are not run here, and why
NOT_RUN = {
    "make test": "this test is part of it",
    "make docs": "make test builds the site",
    "make demo": "the demo's outputs come from the shorter demo below (tests/test_demo.py's FAST)",
    "make bench": "a benchmark: it measures, benchmarks/ prints",
    "pip install": "the environment is what make installed",
}


def _demo(folder: Path) -> None:
    """``make demo``'s ``demo-output/``, from the shorter training tests/test_demo.py uses (on
    one thread, as there: small batches on two shared threads are slower)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_demo(folder / "demo-output", FAST)
    finally:
        torch.set_num_threads(threads)


def _slide(folder: Path) -> None:
    """A small pyramidal OME-TIFF with its resolution (0.5 um per pixel) in place of a scanner's."""
    from test_slides import write_slide

    pixels = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    write_slide(folder / "slide.ome.tif", pixels, mpp=0.5)


def _scene(folder: Path) -> None:
    """A 4-band GeoTIFF scene in UTM coordinates."""
    from test_geotiff import write_input

    write_input(folder / "scene.tif", 4, "uint16")


def _classifier(folder: Path, name: str) -> None:
    """A small padded CNN exported to ONNX with a static 1x3x32x32 input: a user's classifier."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3)).eval()
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), folder / name, dynamo=False)


# files a page names -> how they are made here (made only for the pages that name them)
STAND_INS: dict[str, Callable[[Path], None]] = {
    "demo-output/": _demo,
    "slide.ome.tif": _slide,
    "scene.tif": _scene,
    "tissue_classifier.onnx": lambda folder: _classifier(folder, "tissue_classifier.onnx"),
    "landcover.onnx": lambda folder: _classifier(folder, "landcover.onnx"),
}


def blocks(page: Path) -> list[tuple[int, str, str]]:
    """The page's fenced blocks: (line, language, code)."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.append((line, match.group(1), match.group(2)))
    return found


def commands(code: str) -> list[str]:
    """The ``$`` lines of a console block, continuation lines joined."""
    lines, current = [], None
    for raw in code.splitlines():
        if raw.startswith("$ "):
            current = raw[2:]
        elif current is not None:
            current += " " + raw.strip()
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1]
            continue
        lines.append(current)
        current = None
    return lines


def run_command(command: str, where: str) -> None:
    args = shlex.split(command, comments=True)
    text = " ".join(args)
    if any(text.startswith(skipped) for skipped in NOT_RUN):
        return
    assert args and args[0] == "convolutionalize", f"{where}: a command the docs test cannot run: {command}"
    code = main(args[1:])
    assert code == 0, f"{where}: exit {code}: {command}"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The stand-in named ``name``, made the first time a page asks (read-only to the pages)."""
    folder = tmp_path_factory.mktemp("stand-ins")

    def get(name: str) -> Path:
        path = folder / name.rstrip("/")
        if not path.exists():
            STAND_INS[name](folder)
        return path
    return get


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_runs_as_written(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              stand_ins: Callable[[str], Path]) -> None:
    found = blocks(page)
    unknown = {lang for _, lang, _ in found} - RUNS - {"text"}
    assert not unknown, f"{page.name}: fences must be python, console or text, not {unknown}"
    text = page.read_text()
    for name in STAND_INS:
        if name in text:
            (tmp_path / name.rstrip("/")).symlink_to(stand_ins(name))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, lang, code in found:
        where = f"{page.relative_to(ROOT)}:{line}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)
        elif lang == "console":
            for command in commands(code):
                run_command(command, where)


def test_commands_join_continuation_lines() -> None:
    code = "$ convolutionalize predict m.onnx a.png \\\n    -o b.npy   # a map\nout\n$ make test\n"
    assert commands(code) == ["convolutionalize predict m.onnx a.png  -o b.npy   # a map", "make test"]
    assert os.path.basename(PAGES[0]) == "README.md" and len(PAGES) > 1
