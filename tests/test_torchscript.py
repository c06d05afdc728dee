"""TorchScript in and out: ``torch.jit.script`` / ``trace`` / ``freeze`` objects and ``.pt``
archives convert (lifted by torch's TorchScript -> ExportedProgram converter), and a model
converted from TorchScript is written back as TorchScript carrying its conversion."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from convolutionalize import NotConvolutionalizable, convolutionalize, geometry_of
from convolutionalize.cli import main
from convolutionalize.export import save
from convolutionalize.models import load_model

from _tiny import INPUT_SIZE, STRIDE, TinyNet
from conftest import fingerprint, rel_error

FORMS = ["script", "trace", "freeze"]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def _scripted(model: torch.nn.Module, form: str, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch.jit is deprecated; it is what people deploy
        warnings.simplefilter("ignore")
        if form == "trace":
            return torch.jit.trace(model, example)
        scripted = torch.jit.script(model)
        return torch.jit.freeze(scripted) if form == "freeze" else scripted


def _archive(scripted: torch.jit.ScriptModule, path: Path) -> torch.jit.ScriptModule:
    torch.jit.save(scripted, str(path))
    return load_model(str(path))


@pytest.mark.parametrize("archive", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_padding_free_cnn_cells_equal_the_original_on_crops(form: str, archive: bool,
                                                            tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = TinyNet().eval()
    scripted = _scripted(tiny, form, torch.randn(1, 1, *INPUT_SIZE))
    if archive:
        scripted = _archive(scripted, tmp_path / "tiny.pt")
    fcn = convolutionalize(scripted, INPUT_SIZE)
    assert fcn.geometry.crop_equivalent and fcn.geometry.stride == STRIDE
    assert fcn.self_check.crop_error is not None and fcn.self_check.crop_error < 1e-4
    image = torch.randn(1, 1, INPUT_SIZE[0] + 3 * STRIDE[0], INPUT_SIZE[1] + 5 * STRIDE[1])
    with torch.no_grad():
        dense = fcn(image)
        assert dense.shape == (1, 10, 4, 6)
        for i, j in [(0, 0), (3, 5), (2, 1)]:
            y, x = i * STRIDE[0], j * STRIDE[1]
            crop = image[..., y:y + INPUT_SIZE[0], x:x + INPUT_SIZE[1]]
            assert rel_error(dense[0, :, i, j], scripted(crop)[0]) < 1e-4


@pytest.mark.parametrize("form", ["script", "trace"])
def test_resnet18_archive_converts_exactly(form: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    scripted = _archive(_scripted(model, form, x), tmp_path / "r18.pt")
    before = fingerprint(scripted)
    fcn = convolutionalize(scripted, (224, 224))
    assert fingerprint(scripted) == before, "the caller's model changed"
    with torch.no_grad():
        assert rel_error(fcn(x).flatten(1), model(x)) < 1e-4
        assert fcn(torch.randn(1, 3, 224 + 64, 224 + 96)).shape == (1, 1000, 3, 4)


def test_what_blocks_the_lift_is_named() -> None:
    class Looped(TinyNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.features(x)
            parts = []
            for i in range(int(y.shape[1])):  # a TorchScript loop (prim::Loop)
                parts.append(y[:, i:i + 1])
            return self.classifier(torch.cat(parts, 1))

    scripted = _scripted(Looped().eval(), "script", torch.randn(1, 1, *INPUT_SIZE))
    with pytest.raises(NotConvolutionalizable, match=r"cannot lift the scripted Looped.*prim::Loop"):
        convolutionalize(scripted, INPUT_SIZE)


def test_torchscript_in_torchscript_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = TinyNet().eval()
    scripted = _archive(_scripted(tiny, "trace", torch.randn(1, 1, *INPUT_SIZE)), tmp_path / "in.pt")
    fcn = convolutionalize(scripted, INPUT_SIZE)
    save(fcn, tmp_path / "out.pt")
    deployed = torch.jit.load(str(tmp_path / "out.pt"))  # plain TorchScript: no pickle, no library
    back = load_model(str(tmp_path / "out.pt"))
    assert geometry_of(back) == fcn.geometry
    image = torch.randn(2, 1, 20, 26)
    with torch.no_grad():
        assert rel_error(deployed(image), fcn(image)) < 1e-6
        assert rel_error(back(image), fcn(image)) < 1e-6
    assert back.source_format == "torchscript"  # saved as .pt again: TorchScript again
    save(back, tmp_path / "again.pt")
    assert isinstance(torch.jit.load(str(tmp_path / "again.pt")), torch.jit.ScriptModule)


def test_cli_converts_an_archive_and_reads_it_back(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    _scripted(TinyNet().eval(), "script", torch.randn(1, 1, *INPUT_SIZE)).save(str(tmp_path / "in.pt"))
    size = ["--input-size", *map(str, INPUT_SIZE)]
    assert main(["convert", str(tmp_path / "in.pt"), *size, "-o", str(tmp_path / "out.pt")]) == 0
    assert main(["inspect", str(tmp_path / "out.pt")]) == 0  # no --input-size: the file says it
    out = capsys.readouterr().out
    assert "window: 12x12  stride: 2x2" in out


@pytest.mark.parametrize("suffix", [".pt", ".pt2", ".onnx"])
def test_a_model_converted_from_torchscript_maps_from_every_format(suffix: str, tmp_path: Path) -> None:
    """Its weights come from TorchScript as buffers that require grad; saved in any format and
    read back, ``predict`` maps with it (a copy of such weights was not a leaf and failed)."""
    import numpy as np
    from PIL import Image

    torch.manual_seed(0)
    scripted = _archive(_scripted(TinyNet().eval(), "trace", torch.randn(1, 1, *INPUT_SIZE)),
                        tmp_path / "in.pt")
    fcn = convolutionalize(scripted, INPUT_SIZE)
    save(fcn, tmp_path / f"out{suffix}")
    page = np.random.default_rng(0).integers(0, 256, (20, 26), dtype=np.uint8)
    Image.fromarray(page).save(tmp_path / "page.png")
    out = tmp_path / "map.npy"
    assert main(["predict", str(tmp_path / f"out{suffix}"), str(tmp_path / "page.png"), "-o", str(out),
                 "--no-progress"]) == 0
    assert np.load(out).shape == (10, 5, 8)
