"""Models with several outputs: ``select_output`` / ``output_keys``, and ``output=`` in
``dense_map``, ``class_probabilities``, the crop-by-crop fallback and the CLI (``--model-output``).

The two-head nets share one padding-free trunk, so every map is exact: the reference for each
output is the converted model's own map of that output on the whole image (float32, relative
1e-5: only the summation order of differently sized convolutions differs). ``output="all"``
must give each output's map bit for bit as ``output=key`` does.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convolutionalize import convolutionalize, dense_map
from convolutionalize.cli import main
from convolutionalize.detect import class_probabilities
from convolutionalize.inference import _runner
from convolutionalize.outputs import output_keys, select_output

from _tiny import TinyNet
from conftest import rel

RTOL = 1e-5
NATIVE = (12, 12)  # 12x12 window, stride 2


class Trunk(nn.Module):
    """Padding-free convolutions (3x12x12 -> 8x4x4), flattened into two Linear heads.

    At module level so that ``torch.load`` can unpickle the CLI tests' model files.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2),
                                      nn.ReLU())
        self.scores = nn.Linear(8 * 4 * 4, 5)
        self.box = nn.Linear(8 * 4 * 4, 4)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


class TupleHeads(Trunk):
    """``(box, scores)``: no ``logits`` key, so the first output is the default."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.flat(x)
        return self.box(f), self.scores(f)


class DictHeads(Trunk):
    """``{"box", "logits"}`` with ``box`` first: ``logits`` is the default all the same."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.flat(x)
        return {"box": self.box(f), "logits": self.scores(f)}


class TwoHeadViT(nn.Module):
    """Patch tokens, a class token and attention, two heads on it: not convertible."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, 8) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.logits = nn.Linear(8, 3)
        self.box = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.pos
        token = self.encoder(tokens)[:, 0]
        return {"box": self.box(token), "logits": self.logits(token)}


MODELS = {"tuple": TupleHeads, "dict": DictHeads}


@pytest.fixture(scope="module")
def fcns() -> dict[str, nn.Module]:
    converted = {}
    for kind, cls in MODELS.items():
        torch.manual_seed(0)
        converted[kind] = convolutionalize(cls().eval(), NATIVE)
    return converted


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(3, 40, 52, generator=torch.Generator().manual_seed(1))  # a 15x21 map


def direct(fcn: nn.Module, image: torch.Tensor) -> Any:
    """The converted model's own output on the whole image (the reference)."""
    with torch.no_grad():
        return fcn(image[None])


# --------------------------------------------------------------------------- select_output


@dataclasses.dataclass
class Heads:
    box: torch.Tensor
    scores: torch.Tensor
    note: str = "not a tensor"


A, B = torch.zeros(1, 4), torch.ones(1, 5)

STRUCTURES = {  # output, its keys, the default's position
    "tensor": (A, [0], 0),
    "tuple": ((A, B), [0, 1], 0),
    "tuple-with-none": ((A, None, B), [0, 1], 0),
    "list": ([A, B], [0, 1], 0),
    "dict-with-logits": ({"box": A, "logits": B}, ["box", "logits"], 1),
    "dict-without-logits": ({"box": A, "scores": B}, ["box", "scores"], 0),
    "dataclass": (Heads(A, B), ["box", "scores"], 0),
}


@pytest.mark.parametrize("name", STRUCTURES)
def test_output_keys(name: str) -> None:
    out, keys, _ = STRUCTURES[name]
    assert output_keys(out) == keys


@pytest.mark.parametrize("name", STRUCTURES)
def test_select_output_default_is_logits_else_the_first(name: str) -> None:
    out, keys, default = STRUCTURES[name]
    assert select_output(out) is select_output(out, keys[default])


@pytest.mark.parametrize("name", STRUCTURES)
def test_select_output_by_key_and_by_index_agree(name: str) -> None:
    out, keys, _ = STRUCTURES[name]
    for index, key in enumerate(keys):
        assert select_output(out, key) is select_output(out, index)


@pytest.mark.parametrize(("out", "output", "error", "match"), [
    ({"box": A, "logits": B}, "nope", ValueError, "no output 'nope'; its outputs are 'box', 'logits'"),
    ((A, B), 2, ValueError, "output index 2 is out of range: the model returns 2 tensors"),
    (A, 1, ValueError, "single output; output=1 names no other"),
    (A, "logits", ValueError, "single output"),
    ((A, B), 1.0, TypeError, "output must be an index or a name, got float"),
    ((A, B), True, TypeError, "got bool"),
], ids=["unknown-key", "index-out-of-range", "tensor-index", "tensor-key", "float", "bool"])
def test_select_output_bad_values(out: Any, output: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=re.escape(match)):
        select_output(out, output)


# --------------------------------------------------------------------------- dense_map

CASES = {  # model kind, output=, the output's key in the converted model's own output
    "tuple-0": ("tuple", 0, 0),
    "tuple-1": ("tuple", 1, 1),
    "tuple-minus-1": ("tuple", -1, 1),
    "dict-logits": ("dict", "logits", "logits"),
    "dict-box": ("dict", "box", "box"),
    "dict-index-0": ("dict", 0, "box"),
}
CHANNELS = {0: 4, 1: 5, "box": 4, "logits": 5}


@pytest.mark.parametrize("case", CASES)
def test_dense_map_of_each_output_equals_the_converted_models_map(
        fcns: dict[str, nn.Module], image: torch.Tensor, case: str) -> None:
    kind, output, key = CASES[case]
    got = dense_map(fcns[kind], image, output=output)
    assert got.shape == (CHANNELS[key], 15, 21)
    assert rel(got, direct(fcns[kind], image)[key][0].numpy()) <= RTOL


@pytest.mark.parametrize("case", CASES)
def test_tiled_map_of_each_output_equals_the_whole_image_map(
        fcns: dict[str, nn.Module], image: torch.Tensor, case: str) -> None:
    kind, output, _ = CASES[case]
    whole = dense_map(fcns[kind], image, output=output)
    assert rel(dense_map(fcns[kind], image, output=output, tile=16), whole) <= RTOL


@pytest.mark.parametrize(("kind", "default"), [("tuple", 0), ("dict", "logits")])
def test_default_output_is_logits_else_the_first(fcns: dict[str, nn.Module], image: torch.Tensor,
                                                 kind: str, default: int | str) -> None:
    np.testing.assert_array_equal(dense_map(fcns[kind], image),
                                  dense_map(fcns[kind], image, output=default))


@pytest.mark.parametrize(("kind", "keys"), [("tuple", [0, 1]), ("dict", ["box", "logits"])])
def test_all_gives_every_output_as_output_key_does(fcns: dict[str, nn.Module], image: torch.Tensor,
                                                   kind: str, keys: list[int | str]) -> None:
    maps = dense_map(fcns[kind], image, output="all", tile=16)
    assert list(maps) == keys
    for key in keys:
        np.testing.assert_array_equal(maps[key], dense_map(fcns[kind], image, output=key, tile=16))


def test_all_as_dask_tasks_gives_the_same_maps(fcns: dict[str, nn.Module], image: torch.Tensor) -> None:
    maps = dense_map(fcns["dict"], image, output="all", tile=16, scheduler="synchronous")
    for key in ("box", "logits"):
        np.testing.assert_array_equal(maps[key], dense_map(fcns["dict"], image, output=key, tile=16))


def test_all_of_a_dask_input_is_lazy_maps_by_key(fcns: dict[str, nn.Module]) -> None:
    import dask
    import dask.array as da

    pixels = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    lazy = dense_map(fcns["dict"], da.from_array(pixels, chunks=20), output="all", tile=16)
    assert all(isinstance(m, da.Array) for m in lazy.values())
    computed = dict(zip(lazy, dask.compute(*lazy.values(), scheduler="synchronous")))
    for key in ("box", "logits"):
        np.testing.assert_array_equal(computed[key], dense_map(fcns["dict"], pixels, output=key, tile=16))


def test_all_of_a_single_output_model_is_its_map_under_index_0(image: torch.Tensor) -> None:
    torch.manual_seed(0)
    fcn = convolutionalize(TinyNet().eval(), NATIVE)
    maps = dense_map(fcn, image[:1], output="all")
    assert list(maps) == [0]
    np.testing.assert_array_equal(maps[0], dense_map(fcn, image[:1]))


class PooledHeads(Trunk):
    """Global average pooling, then the two heads: ``pool="global"`` keeps the original."""

    def __init__(self) -> None:
        super().__init__()
        self.scores, self.box = nn.Linear(8, 5), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x).mean((2, 3))
        return {"box": self.box(f), "logits": self.scores(f)}


def test_all_with_a_global_pool_is_one_cell_per_output(image: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = PooledHeads().eval()
    maps = dense_map(model, image, input_size=NATIVE, pool="global", output="all")
    expected = direct(model, image)
    assert {key: m.shape for key, m in maps.items()} == {"box": (4, 1, 1), "logits": (5, 1, 1)}
    for key, got in maps.items():
        assert rel(got[:, 0, 0], expected[key][0].numpy()) <= RTOL


def test_maps_of_two_outputs_of_one_model_in_turn(fcns: dict[str, nn.Module], image: torch.Tensor) -> None:
    # the shapes and runners remembered for one output must not answer for another
    assert dense_map(fcns["tuple"], image, output=0).shape[0] == 4
    assert dense_map(fcns["tuple"], image, output=1).shape[0] == 5
    assert dense_map(fcns["tuple"], image, output=0, tile=16).shape[0] == 4


def test_runners_of_other_outputs_share_the_prepared_model(fcns: dict[str, nn.Module]) -> None:
    cpu = torch.device("cpu")
    first = _runner.runner_for(fcns["dict"], "fp32", cpu, "box")
    assert _runner.runner_for(fcns["dict"], "fp32", cpu, "box") is first
    other = _runner.runner_for(fcns["dict"], "fp32", cpu, "logits")
    assert other is not first and other.output == "logits" and other.model is first.model


@pytest.mark.parametrize(("output", "error", "match"), [
    ("nope", ValueError, "the model has no output 'nope'; its outputs are 'box', 'logits'"),
    (2, ValueError, "output index 2 is out of range"),
    (1.5, TypeError, "output must be an output's index or name, or 'all', got float 1.5"),
], ids=["unknown-key", "index-out-of-range", "float"])
def test_bad_output_is_refused_before_any_tile_runs(fcns: dict[str, nn.Module], image: torch.Tensor,
                                                     monkeypatch: pytest.MonkeyPatch, output: Any,
                                                     error: type[Exception], match: str) -> None:
    monkeypatch.setattr(_runner.TileRunner, "__call__", lambda *_: pytest.fail("a tile ran"))
    with pytest.raises(error, match=re.escape(match)):
        dense_map(fcns["dict"], image, output=output)


def test_all_with_a_zarr_output_is_refused(fcns: dict[str, nn.Module], image: torch.Tensor,
                                           tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape('output="all" returns the maps in memory')):
        dense_map(fcns["dict"], image, output="all", out=tmp_path / "map.zarr")
    assert not (tmp_path / "map.zarr").exists()


def test_a_zarr_store_of_one_output_is_not_resumed_for_another(
        fcns: dict[str, nn.Module], image: torch.Tensor, tmp_path: Path) -> None:
    store = dense_map(fcns["dict"], image, output="box", tile=16, out=tmp_path / "map.zarr")
    np.testing.assert_array_equal(store[:], dense_map(fcns["dict"], image, output="box", tile=16))
    with pytest.raises(ValueError, match="different arguments"):
        dense_map(fcns["dict"], image, output="logits", tile=16, out=tmp_path / "map.zarr")


def crop_outputs(model: nn.Module, image: torch.Tensor, key: str, window: int, stride: int) -> np.ndarray:
    rows = (image.shape[1] - window) // stride + 1
    cols = (image.shape[2] - window) // stride + 1
    crops = torch.stack([image[:, i * stride:i * stride + window, j * stride:j * stride + window]
                         for i in range(rows) for j in range(cols)])
    with torch.no_grad():
        return model(crops)[key].reshape(rows, cols, -1).permute(2, 0, 1).numpy()


@pytest.mark.parametrize(("output", "key"), [(None, "logits"), ("box", "box"), (0, "box")])
def test_windows_fallback_scores_the_chosen_output_of_every_crop(output: str | None, key: str) -> None:
    torch.manual_seed(0)
    model = TwoHeadViT().eval()
    image = torch.randn(3, 40, 52)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FallbackWarning: tested in test_dense
        got = dense_map(model, image, input_size=16, fallback="windows", stride=8, tile=16,
                        output=output)
    assert rel(got, crop_outputs(model, image, key, 16, 8)) <= RTOL


# --------------------------------------------------------------------------- class_probabilities


@pytest.mark.parametrize(("output", "key"), [(None, "logits"), ("box", "box"), (0, "box")])
def test_class_probabilities_of_the_chosen_output(fcns: dict[str, nn.Module], image: torch.Tensor,
                                                  output: str | None, key: str) -> None:
    expected = torch.softmax(direct(fcns["dict"], image)[key][0].double(), 0).numpy()
    got = class_probabilities(fcns["dict"], image, output=output)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    torch.save(TupleHeads().eval(), root / "tuple.pt")
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "page.png")  # a 5x7 map
    return root


def cli(files: Path, command: str, *args: str) -> list[str]:
    return [command, str(files / "tuple.pt"), "--trust-pickle", "--input-size", "12", "12",
            str(files / "page.png"), *args]


def test_predict_writes_the_chosen_outputs_map(cli_files: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "scores.npy"
    assert main(cli(cli_files, "predict", "-o", str(output), "--no-progress",
                    "--model-output", "1")) == 0
    assert "5 classes x 5 x 7 cells" in capsys.readouterr().out
    expected = dense_map(torch.load(cli_files / "tuple.pt", weights_only=False), cli_files / "page.png",
                         input_size=NATIVE, output=1)
    assert rel(np.load(output), expected) <= RTOL


@pytest.mark.parametrize(("command", "value", "match"), [
    ("predict", "nope", "no output 'nope'; its outputs are 0, 1"),
    ("predict", "2", "output index 2 is out of range"),
    ("predict", "all", "'all' names every output; this command uses one"),
    ("heatmap", "nope", "no output 'nope'"),
    ("detect", "2", "output index 2 is out of range"),
])
def test_bad_model_output_is_one_line_exit_2_and_no_file(cli_files: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         command: str, value: str, match: str) -> None:
    suffix = {"predict": ".npy", "heatmap": ".png", "detect": ".json"}[command]
    extra = ["--no-progress"] if command == "predict" else []
    code = main(cli(cli_files, command, "-o", str(tmp_path / f"out{suffix}"), *extra,
                    "--model-output", value))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("convolutionalize: error: ")
    assert re.search(re.escape(match), err)
    assert list(tmp_path.iterdir()) == []


def test_heatmap_draws_the_chosen_output(cli_files: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "heat.png"
    assert main(cli(cli_files, "heatmap", "-o", str(output), "--model-output", "1", "--class", "4")) == 0
    assert output.is_file()  # class 4 exists in the 5-class scores head only (the box head has 4)
    capsys.readouterr()
    assert main(cli(cli_files, "heatmap", "-o", str(tmp_path / "box.png"), "--class", "4")) == 2
    assert "unknown class 4 (--class): the model has 4 classes" in capsys.readouterr().err
