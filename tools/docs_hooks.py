"""MkDocs hooks for the documentation site (``hooks:`` in mkdocs.yml).

Two things the prose pages cannot hold by hand:

- **The CLI reference.** ``docs/cli.md`` holds markers, ``<!-- cli-help -->`` for
  ``convolutionalize --help`` and ``<!-- cli-help COMMAND -->`` for each subcommand; each is
  replaced by that ``--help`` as the real parser prints it (``convolutionalize.cli.commands``
  builds it with the standard library only, so no framework is imported). A subcommand without
  a marker, or a marker naming no subcommand, is a warning, which fails ``mkdocs build --strict``.
- **The demo's pictures.** ``docs/images/`` is filled with the PNGs ``convolutionalize demo``
  writes: copied from ``demo-output/`` when a finished demo is there (``make demo``), otherwise
  the demo is run once into a temporary folder. ``docs/images/`` is not committed.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

log = logging.getLogger("mkdocs.hooks.convolutionalize")

ROOT = Path(__file__).resolve().parent.parent
CLI_PAGE = "cli.md"
HELP_WIDTH = 100  # columns of the --help text on the page, whatever the terminal building it
MARKER = re.compile(r"<!--\s*cli-help(?:\s+(?P<command>[\w-]+))?\s*-->")
DEMO_OUTPUT = ROOT / "demo-output"
DEMO_DONE = "metrics.json"  # the demo writes it last: a folder holding it is a finished demo
IMAGES = "images"


# --------------------------------------------------------------------------- CLI reference


def _parsers() -> dict[str | None, argparse.ArgumentParser]:
    """The top-level parser (key None) and each subcommand's, from the real command line."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from convolutionalize.cli.commands import _parser

    parser = _parser()
    found: dict[str | None, argparse.ArgumentParser] = {None: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    """argparse wraps help to $COLUMNS (shutil.get_terminal_size): fix it while formatting."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def _fenced(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def cli_reference(markdown: str) -> str:
    """``markdown`` with every cli-help marker replaced by that command's ``--help``."""
    parsers = _parsers()
    seen: set[str | None] = set()

    def replace(match: re.Match[str]) -> str:
        command = match.group("command")
        if command not in parsers:
            log.warning("%s: <!-- cli-help %s --> names no subcommand (they are: %s)", CLI_PAGE,
                        command, ", ".join(str(name) for name in parsers if name))
            return match.group(0)
        seen.add(command)
        with _columns(HELP_WIDTH):
            return _fenced(parsers[command].format_help())

    markdown = MARKER.sub(replace, markdown)
    missing = [name or "(the top level)" for name in parsers if name not in seen]
    if missing:
        log.warning("%s has no cli-help marker for: %s", CLI_PAGE, ", ".join(missing))
    return markdown


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != CLI_PAGE:
        return markdown
    return cli_reference(markdown)


# --------------------------------------------------------------------------- demo pictures


def _demo_pictures(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def _run_demo(output: Path) -> None:
    """``python -m convolutionalize demo --output OUTPUT`` in this interpreter (tens of seconds)."""
    log.info("docs/%s: no finished demo in %s; running `convolutionalize demo` once", IMAGES,
             DEMO_OUTPUT.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "convolutionalize", "demo", "--output", str(output)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PluginError(f"`convolutionalize demo` failed (exit {done.returncode}), so the guide's "
                          f"pictures cannot be made:\n{done.stderr.strip()}")


def _copy_pictures(source: Path, images: Path) -> None:
    """Copy the PNGs of ``source`` into ``images``, only those whose bytes differ (so that
    ``mkdocs serve``, which watches docs/, is not woken by identical files)."""
    pictures = _demo_pictures(source)
    if not pictures:
        raise PluginError(f"{source} holds no PNG: `convolutionalize demo` wrote no pictures")
    images.mkdir(parents=True, exist_ok=True)
    for picture in pictures:
        target = images / picture.name
        if not (target.exists() and filecmp.cmp(picture, target, shallow=False)):
            shutil.copyfile(picture, target)


def on_pre_build(config: Any) -> None:
    """Fill docs/images before MkDocs collects the files (so the pictures are part of the site)."""
    images = Path(config["docs_dir"]) / IMAGES
    if (DEMO_OUTPUT / DEMO_DONE).is_file():
        _copy_pictures(DEMO_OUTPUT, images)
    elif not _demo_pictures(images):
        with tempfile.TemporaryDirectory(prefix="convolutionalize-demo-") as tmp:
            _run_demo(Path(tmp))
            _copy_pictures(Path(tmp), images)
