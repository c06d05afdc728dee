"""The command line: output content, written files that load and run at larger sizes,
exit codes, and one-line errors for every kind of bad input.

Models are small (a tiny padding-free net pickled to a temporary ``.pt``, loaded with
``--trust-pickle``, torchvision's resnet18 and squeezenet1_1 with random weights) and nothing
touches the network.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from convolutionalize import VerifyReport, __version__, cli, convolutionalize, export, models
from convolutionalize.cli import main

from _tiny import INPUT_SIZE, Branchy, TinyNet

GOLDEN = Path(__file__).parent / "golden" / "inspect_tiny.txt"
TINY_SIZE = [str(INPUT_SIZE[0]), str(INPUT_SIZE[1])]
IMAGE = (20, 24)  # 12x12 window, stride 2: a 5x7 map


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the tiny model and the other files the bad-input cases read."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    torch.save(TinyNet(), root / "tiny.pt")
    torch.save(Branchy(), root / "branchy.pt")
    torch.save(TinyNet().state_dict(), root / "tiny_state.pth")
    with warnings.catch_warnings():  # torch.jit.script is deprecated; it still writes archives
        warnings.simplefilter("ignore")
        torch.jit.script(TinyNet()).save(str(root / "scripted.pt"))
    (root / "garbage.pth").write_bytes(b"not a torch file")
    return root


@pytest.fixture()
def out_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny(files: Path, *args: str) -> list[str]:
    return [str(files / "tiny.pt"), "--trust-pickle", "--input-size", *TINY_SIZE, *args]


# --------------------------------------------------------------------------- entry points


def test_module_help_runs_as_a_subprocess() -> None:
    result = subprocess.run([sys.executable, "-m", "convolutionalize", "--help"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: convolutionalize")
    for command in ("inspect", "convert", "verify"):
        assert command in result.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"], capsys)[:2] == (0, f"convolutionalize {__version__}\n")


# --------------------------------------------------------------------------- inspect


def test_inspect_resnet18_plan_geometry_and_flops(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["inspect", "torchvision:resnet18", "--weights", "random",
                          "--image-size", "320", "320"], capsys)
    assert (code, err) == (0, "")
    assert re.search(r"^  fc +linear +Linear 512->1000 -> Conv2d 1x1$", out, re.M)
    assert re.search(r"^  avgpool +global_pool ", out, re.M)
    assert "window: 224x224  stride: 32x32" in out
    assert "crop equivalent: no" in out
    assert "map: 4x4 cells x 1000 classes  windows: 16" in out
    ratio = float(re.search(r"^ratio: ([0-9.]+)x", out, re.M).group(1))  # type: ignore[union-attr]
    assert ratio > 1


def test_inspect_without_image_size_counts_no_flops(capsys: pytest.CaptureFixture[str],
                                                    files: Path) -> None:
    code, out, _ = run(["inspect", *tiny(files), "--pool", "global"], capsys)
    assert code == 0
    assert "pool: global" in out
    assert "FLOPs" not in out


def test_inspect_tiny_matches_golden(capsys: pytest.CaptureFixture[str], files: Path) -> None:
    code, out, err = run(["inspect", *tiny(files, "--image-size", *map(str, IMAGE))], capsys)
    assert (code, err) == (0, "")
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(out)
    # float32 rounding errors differ between CPUs (a self-check measured 1.0e-07 on one, 1.5e-07 on
    # another): compared as bounds
    errors = re.compile(r"\d\.\de-\d\d")
    assert all(float(e) < 1e-6 for e in errors.findall(out)) and len(errors.findall(out)) == 2
    assert errors.sub("<error>", out) == errors.sub("<error>", GOLDEN.read_text()), (
        "inspect output changed; regenerate with UPDATE_GOLDEN=1")


# --------------------------------------------------------------------------- convert


def _reference(files: Path, x: torch.Tensor) -> torch.Tensor:
    model = torch.load(files / "tiny.pt", weights_only=False)
    with torch.no_grad():
        return convolutionalize(model, INPUT_SIZE)(x)


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _run_pt2(path: Path, x: torch.Tensor) -> torch.Tensor:
    return torch.export.load(str(path)).module()(x)


def _run_pt(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.load(path, weights_only=False)(x)


@pytest.mark.parametrize(("suffix", "runner"),
                         [(".onnx", _run_onnx), (".pt2", _run_pt2), (".pt", _run_pt)],
                         ids=["onnx", "pt2", "pt"])
def test_convert_writes_a_model_that_runs_larger(
        capsys: pytest.CaptureFixture[str], files: Path, out_dir: Path, suffix: str,
        runner: Callable[[Path, torch.Tensor], torch.Tensor]) -> None:
    output = out_dir / f"tiny{suffix}"
    code, out, err = run(["convert", *tiny(files), "-o", str(output)], capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"wrote {output}")
    assert [p.name for p in out_dir.iterdir()] == [output.name]  # no temporary left over
    x = torch.randn(2, 1, *IMAGE, generator=torch.Generator().manual_seed(1))
    scores = runner(output, x)
    assert tuple(scores.shape) == (2, 10, 5, 7)
    torch.testing.assert_close(scores, _reference(files, x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- verify


def test_verify_passes_crop_equivalent_tiny(capsys: pytest.CaptureFixture[str],
                                            files: Path) -> None:
    code, out, err = run(["verify", *tiny(files), "--samples", "4", "--seed", "3"], capsys)
    assert (code, err) == (0, "")
    assert "crop equivalent: yes" in out
    assert "(4 cells of a 18x18 image, seed 3)" in out
    assert out.rstrip().endswith("PASS")


def test_verify_padded_squeezenet_passes_but_is_not_crop_equivalent(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["verify", "torchvision:squeezenet1_1", "--weights", "random"], capsys)
    assert code == 0
    assert "crop equivalent: no" in out
    assert "padding in" in out


def test_verify_failure_exits_1(capsys: pytest.CaptureFixture[str], files: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = cli.commands.verify

    def failing(*args: object, **kwargs: object) -> VerifyReport:
        report = real(*args, **kwargs)  # type: ignore[arg-type]
        return dataclasses.replace(report, crop_error=0.5)  # the tiny net is crop equivalent

    monkeypatch.setattr(cli.commands, "verify", failing)
    code, out, err = run(["verify", *tiny(files)], capsys)
    assert (code, err) == (1, "")
    assert out.rstrip().endswith("FAIL")


# --------------------------------------------------------------------------- bad input

TRUST = "--trust-pickle"  # tiny.pt and branchy.pt are whole pickled modules

BAD_INPUT = {
    "unknown-torchvision-model": (["inspect", "torchvision:no_such_net", "--weights", "random"],
                                  "list_models"),
    "unknown-timm-model": (["inspect", "timm:no_such_net"], "list_models"),
    "unknown-spec": (["inspect", "no_such_net"], "torchvision:NAME"),
    "unknown-demo-model": (["inspect", "demo:letters", "--weights", "random"], "demo:digits"),
    "demo-without-weights": (["inspect", "demo:digits"], "--weights demo-output/digits.pth"),
    "missing-model-file": (["inspect", "{files}/missing.pt"], "not found"),
    "garbage-model-file": (["inspect", "{files}/garbage.pth"], "cannot read"),
    "untrusted-pickle": (["inspect", "{files}/tiny.pt", "--input-size", "12", "12"], TRUST),
    "state-dict-as-model": (["inspect", "{files}/tiny_state.pth"], "--weights"),
    "torchscript": (["inspect", "{files}/scripted.pt"], "pass --input-size H W"),
    "untraceable": (["inspect", "{files}/branchy.pt", TRUST, "--input-size", "12", "12"], "trace"),
    "no-input-size": (["inspect", "{files}/tiny.pt", TRUST], "--input-size"),
    "missing-weights": (["inspect", "torchvision:resnet18", "--weights", "{files}/none.pth"],
                        "not found"),
    "garbage-weights": (["inspect", "torchvision:resnet18", "--weights", "{files}/garbage.pth"],
                        "cannot read"),
    "mismatched-weights": (["inspect", "torchvision:squeezenet1_1", "--weights",
                            "{files}/tiny_state.pth"], "do not fit"),
    "unknown-weights-name": (["inspect", "torchvision:resnet18", "--weights", "V9"], "V9"),
    "random-weights-for-file": (["inspect", "{files}/tiny.pt", "--weights", "random"], "random"),
    "zero-input-size": (["inspect", "torchvision:resnet18", "--input-size", "0", "224"],
                        "positive"),
    "negative-image-size": (["inspect", "{files}/tiny.pt", "--input-size", "12", "12",
                             "--image-size", "-5", "20"], "positive"),
    "image-smaller-than-window": (["inspect", "{files}/tiny.pt", TRUST, "--input-size", "12", "12",
                                   "--image-size", "8", "8"], "smaller"),
    "unknown-pool": (["inspect", "{files}/tiny.pt", "--pool", "avg"], "invalid choice"),
    "zero-samples": (["verify", "{files}/tiny.pt", "--samples", "0"], "positive"),
    "missing-command": ([], "required"),
    "unknown-suffix": (["convert", "{files}/tiny.pt", TRUST, "--input-size", "12", "12",
                        "-o", "{out}/tiny.txt"], ".onnx"),
    "missing-output-dir": (["convert", "{files}/tiny.pt", TRUST, "--input-size", "12", "12",
                            "-o", "{out}/nowhere/tiny.onnx"], "does not exist"),
    "output-dir-is-a-file": (["convert", "{files}/tiny.pt", TRUST, "--input-size", "12", "12",
                              "-o", "{files}/tiny.pt/tiny.pt"], "not a directory"),
    "untraceable-convert": (["convert", "{files}/branchy.pt", TRUST, "--input-size", "12", "12",
                             "-o", "{out}/branchy.onnx"], "trace"),
}


def _assert_one_error_line(err: str, fragment: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("convolutionalize: error: "), err
    assert fragment in lines[0]


@pytest.mark.parametrize(("args", "fragment"), list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], files: Path,
                                         out_dir: Path, args: list[str], fragment: str) -> None:
    before = sorted(p.name for p in files.iterdir())
    code, out, err = run([a.format(files=files, out=out_dir) for a in args], capsys)
    assert code == 2
    assert out == ""
    _assert_one_error_line(err, fragment)
    assert list(out_dir.iterdir()) == []
    assert sorted(p.name for p in files.iterdir()) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_dir_exits_2(capsys: pytest.CaptureFixture[str], files: Path,
                                       out_dir: Path) -> None:
    out_dir.chmod(0o500)
    try:
        code, _, err = run(["convert", *tiny(files), "-o", str(out_dir / "tiny.pt")], capsys)
    finally:
        out_dir.chmod(0o700)
    assert code == 2
    _assert_one_error_line(err, "cannot write")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("error", [ValueError("exporter gave up"),
                                   OSError(28, "No space left on device")],
                         ids=["value-error", "os-error"])
def test_failed_write_leaves_no_file(capsys: pytest.CaptureFixture[str], files: Path,
                                     out_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                     error: Exception) -> None:
    def half_written(fcn: torch.nn.Module, path: Path) -> None:
        path.write_bytes(b"partial")
        raise error

    monkeypatch.setitem(export.FORMATS, ".pt", half_written)
    code, _, err = run(["convert", *tiny(files), "-o", str(out_dir / "tiny.pt")], capsys)
    assert code == 2
    _assert_one_error_line(err, error.args[-1])
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- offline


@pytest.fixture()
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network and empty weight caches, whatever the machine running the tests has."""
    monkeypatch.setattr(models, "_reachable", lambda url: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet18"])
@pytest.mark.usefixtures("offline")
def test_pretrained_weights_offline_fail_fast_with_hint(capsys: pytest.CaptureFixture[str],
                                                        spec: str) -> None:
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    start = time.monotonic()
    code, out, err = run(["inspect", spec], capsys)
    assert time.monotonic() - start < 20
    assert (code, out) == (2, "")
    _assert_one_error_line(err, "--weights random")


def test_inspect_at_an_output_stride_counts_shift_and_stitch(capsys: pytest.CaptureFixture[str],
                                                             files: Path) -> None:
    args = tiny(files, "--output-stride", "1", "--image-size", "20", "24")
    code, out, err = run(["inspect", *args], capsys)
    assert (code, err) == (0, "")
    assert "stride: 1x1" in out
    assert "FLOPs shift-and-stitch:" in out and "(shift-and-stitch / dense)" in out
    assert "cells vs true crops" in out  # the tiny net is padding-free: the self-check compared crops


def test_verify_at_an_output_stride_passes(capsys: pytest.CaptureFixture[str], files: Path) -> None:
    code, out, err = run(["verify", *tiny(files, "--output-stride", "1")], capsys)
    assert (code, err) == (0, "")
    assert out.rstrip().endswith("PASS")


def test_impossible_output_stride_exits_2(capsys: pytest.CaptureFixture[str], files: Path) -> None:
    code, out, err = run(["inspect", *tiny(files, "--output-stride", "3")], capsys)
    assert code == 2 and out == ""
    _assert_one_error_line(err, "--output-stride 3 is not possible")  # the option, not the keyword
