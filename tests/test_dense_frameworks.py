"""dense_map and ``predict`` on Keras and ONNX models: the same exact tiling as for PyTorch.

Each framework's reference is its own converted model run once on the whole image (Keras's
``predict_nchw``, onnxruntime); tiled maps must match it to relative 1e-5, borders included,
and the same weights give the same map in all three frameworks.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
import torch
import zarr
from torch import nn

from convolutionalize import convolutionalize, dense_map, geometry_of
from convolutionalize.cli import main
from convolutionalize.frameworks.keras.model import predict_nchw
from convolutionalize.frameworks.onnx.model import Predictor, save_onnx
from convolutionalize.inference._runner import FrameworkRunner, dense_model

from conftest import rel

RTOL = 1e-5
NATIVE = (24, 24)


class Padded(nn.Module):
    """Zero padding, a strided conv and a GAP head: exact tiling must get the borders right."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def keras_padded(torch_model: Padded, data_format: str = "channels_last") -> keras.Model:
    """The same network (and weights) in Keras: 'same' padding equals padding=1 for 3x3 kernels
    at stride 1, and for the strided conv on even sizes an explicit ZeroPadding2D keeps it so."""
    layers = keras.layers
    shape = (*NATIVE, 3) if data_format == "channels_last" else (3, *NATIVE)
    kw = {"data_format": data_format}
    x = inputs = keras.Input(shape)
    x = layers.Conv2D(8, 3, padding="same", activation="relu", **kw)(x)
    x = layers.MaxPooling2D(2, **kw)(x)
    x = layers.ZeroPadding2D(1, **kw)(x)
    x = layers.Conv2D(16, 3, strides=2, activation="relu", **kw)(x)
    x = layers.Conv2D(16, 3, padding="same", **kw)(x)
    x = layers.GlobalAveragePooling2D(**kw)(x)
    model = keras.Model(inputs, layers.Dense(5)(x))
    convs = [m for m in torch_model.modules() if isinstance(m, nn.Conv2d)]
    weights = []
    for conv in convs:
        weights += [conv.weight.detach().permute(2, 3, 1, 0).numpy(), conv.bias.detach().numpy()]
    weights += [torch_model.fc.weight.detach().T.numpy(), torch_model.fc.bias.detach().numpy()]
    model.set_weights(weights)
    return model


@pytest.fixture(scope="module")
def torch_model() -> Padded:
    torch.manual_seed(0)
    return Padded().eval()


@pytest.fixture(scope="module")
def onnx_model(torch_model: Padded, tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("onnx") / "padded.onnx"
    torch.onnx.export(torch_model, (torch.randn(1, 3, *NATIVE),), str(path), dynamo=False)
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((3, 101, 131)).astype(np.float32)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_keras_tiled_map_equals_whole_image(torch_model: Padded, image: np.ndarray, data_format: str) -> None:
    model = keras_padded(torch_model, data_format)
    fcn = convolutionalize(model)
    expected = predict_nchw(fcn, image[None])[0]
    assert dense_map(model, image).shape == expected.shape == (5, 20, 28)
    for tile in (16, 40):
        assert rel(dense_map(fcn, image, tile=tile), expected) < RTOL, tile


def test_onnx_tiled_map_equals_whole_image(onnx_model: onnx.ModelProto, image: np.ndarray) -> None:
    fcn = convolutionalize(onnx_model)
    expected = Predictor(fcn)(image[None])[0]
    assert expected.shape == (5, 20, 28)
    assert rel(dense_map(onnx_model, image), expected) < RTOL
    for tile in (16, 40):
        assert rel(dense_map(fcn, image, tile=tile, batch_size=2), expected) < RTOL, tile


def test_same_weights_give_the_same_map_in_every_framework(
        torch_model: Padded, onnx_model: onnx.ModelProto, image: np.ndarray) -> None:
    reference = dense_map(torch_model, image, input_size=NATIVE, tile=40)
    assert rel(dense_map(onnx_model, image, tile=40), reference) < 1e-4
    assert rel(dense_map(keras_padded(torch_model), image, tile=40), reference) < 1e-4


@pytest.mark.parametrize("framework", ["keras", "onnx"])
def test_pyramids_of_keras_and_onnx_models_are_the_pytorch_pyramid(
        framework: str, torch_model: Padded, onnx_model: onnx.ModelProto, image: np.ndarray) -> None:
    model = onnx_model if framework == "onnx" else keras_padded(torch_model)
    scales = (1.0, 0.6, 0.35)
    reference = dense_map(torch_model, image, input_size=NATIVE, scales=scales)
    tiled = dense_map(model, image, scales=scales, tile=16)
    assert [m.size for m in tiled] == [m.size for m in reference] == [(101, 131), (61, 79), (35, 46)]
    for level, expected in zip(tiled, reference):
        assert level.geometry.factor == expected.geometry.factor and level.box(3, 5) == expected.box(3, 5)
        assert rel(level.map, expected.map) < 1e-4  # as for one scale: frameworks round differently


def test_shapes_without_running_match_the_run(torch_model: Padded, onnx_model: onnx.ModelProto) -> None:
    for model in (convolutionalize(onnx_model), convolutionalize(keras_padded(torch_model))):
        adapter = dense_model(model)
        assert adapter.channels == 3
        for size in ((24, 24), (57, 83)):
            x = np.zeros((1, 3, *size), np.float32)
            ran = FrameworkRunner(model)(x)
            assert adapter.map_shape(size) == ran.shape[1:], size
            assert adapter.bytes_per_pixel(size) > 4 * 3


@pytest.mark.parametrize("kind", ["keras", "onnx"])
def test_runner_pickles_as_the_saved_model(kind: str, torch_model: Padded, onnx_model: onnx.ModelProto,
                                           image: np.ndarray) -> None:
    fcn = convolutionalize(keras_padded(torch_model) if kind == "keras" else onnx_model)
    runner = FrameworkRunner(fcn)
    copy = pickle.loads(pickle.dumps(runner))
    assert copy.model is not fcn
    assert np.array_equal(copy(image[None]), runner(image[None]))
    assert geometry_of(copy.model) == geometry_of(fcn)


def test_dask_threads_and_resumable_zarr(onnx_model: onnx.ModelProto, image: np.ndarray,
                                         tmp_path: Path) -> None:
    expected = dense_map(onnx_model, image)
    by_dask = dense_map(onnx_model, image, tile=32, scheduler="threads")
    assert rel(by_dask, expected) < RTOL
    out = dense_map(onnx_model, image, tile=32, out=tmp_path / "map.zarr")
    assert rel(np.asarray(out), expected) < RTOL
    assert zarr.open_group(tmp_path / "map.zarr", mode="r")["done"][:].all()
    again = dense_map(onnx_model, image, tile=32, out=tmp_path / "map.zarr")  # all tiles done
    assert np.array_equal(np.asarray(again), np.asarray(out))


def test_model_path_and_torch_only_options(torch_model: Padded, onnx_model: onnx.ModelProto,
                                           image: np.ndarray, tmp_path: Path) -> None:
    path = save_onnx(convolutionalize(onnx_model), tmp_path / "fcn.onnx")
    assert rel(dense_map(path, image), dense_map(onnx_model, image)) < RTOL
    for model in (onnx_model, keras_padded(torch_model)):
        with pytest.raises(ValueError, match="precision=\"bf16\" runs PyTorch models only"):
            dense_map(model, image, precision="bf16")
        with pytest.raises(ValueError, match="applies to PyTorch models"):
            dense_map(model, image, device="cuda")
    with pytest.raises(TypeError, match="dense_map takes"):
        dense_map(object(), image)


@pytest.mark.parametrize("framework", ["keras", "onnx"])
@pytest.mark.parametrize(("output", "message"), [("box", "pick an output by index"), (1, "has 1 output"),
                                                 ("all", "pick an output by index")])
def test_keras_and_onnx_outputs_are_named_by_index(framework: str, output: object, message: str,
                                                   torch_model: Padded, onnx_model: onnx.ModelProto,
                                                   image: np.ndarray) -> None:
    model = onnx_model if framework == "onnx" else keras_padded(torch_model)
    name = {"onnx": "ONNX", "keras": "Keras"}[framework]
    with pytest.raises(ValueError, match=rf"{name} model.* {message}.*output={output!r}"):
        dense_map(model, image, output=output)


def test_keras_and_onnx_output_0_is_the_map(onnx_model: onnx.ModelProto, image: np.ndarray) -> None:
    np.testing.assert_array_equal(dense_map(onnx_model, image, output=0), dense_map(onnx_model, image))


@pytest.mark.parametrize("suffix", [".keras", ".onnx"])
def test_cli_predict_takes_model_files(suffix: str, torch_model: Padded, onnx_model: onnx.ModelProto,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path = tmp_path / f"model{suffix}"
    if suffix == ".keras":
        keras_padded(torch_model).save(model_path)
    else:
        onnx.save(onnx_model, str(model_path))
    pixels = np.random.default_rng(3).integers(0, 256, (60, 70, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", pixels)
    out = tmp_path / "map.npy"
    assert main(["predict", str(model_path), str(tmp_path / "image.npy"), "-o", str(out),
                 "--tile", "24", "--no-progress"]) == 0
    assert "5 classes x 10 x 13 cells" in capsys.readouterr().out
    expected = dense_map(model_path, pixels)  # the library on the same file and pixels
    assert rel(np.load(out), expected) < RTOL
    bad = tmp_path / "bad.npy"
    assert main(["predict", str(model_path), str(tmp_path / "image.npy"), "-o", str(bad),
                 "--precision", "bf16"]) == 2
    assert "runs PyTorch models only" in capsys.readouterr().err
    assert not bad.exists()


@pytest.mark.zoo
def test_zoo_tiling_is_exact_for_real_architectures(tmp_path: Path) -> None:
    """TF 'same' padding (asymmetric at stride 2) in Keras MobileNetV2, and shufflenet's channel
    shuffles (Reshapes that read H and W at run time) in ONNX: tiled == whole image."""
    import torchvision

    keras.utils.set_random_seed(0)
    torch.manual_seed(0)
    mobilenet = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
    shufflenet = torchvision.models.shufflenet_v2_x0_5().eval()
    path = tmp_path / "shufflenet.onnx"
    torch.onnx.export(shufflenet, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False)
    image = np.random.default_rng(4).standard_normal((3, 300, 420)).astype(np.float32)
    for model, tile in ((mobilenet, 96), (onnx.load(str(path)), 128)):
        fcn = convolutionalize(model)
        expected = FrameworkRunner(fcn)(image[None])[0]
        assert rel(dense_map(fcn, image, tile=tile), expected) < RTOL


def test_repeated_maps_reuse_the_adapter_and_its_session(onnx_model: onnx.ModelProto,
                                                         torch_model: Padded) -> None:
    from convolutionalize.inference import _cache

    fcn = convolutionalize(onnx_model)
    adapter = dense_model(fcn)
    assert dense_model(fcn) is adapter
    assert adapter.runner("fp32", torch.device("cpu")) is adapter.runner("fp32", torch.device("cpu"))
    fcn.graph.node.append(onnx.helper.make_node("Identity", [fcn.graph.output[0].name], ["spare"]))
    assert dense_model(fcn) is not adapter  # the graph changed: shapes and session made again
    for _ in range(_cache.HELD + 2):  # a bounded cache: old protos are let go
        dense_model(convolutionalize(onnx_model))
    assert len(_cache.CACHE.held) == _cache.HELD
    keras_fcn = convolutionalize(keras_padded(torch_model))
    dense_model(keras_fcn).shapes((40, 40))
    assert (40, 40) in dense_model(keras_fcn)._shapes  # a new adapter, the same shapes


def test_the_caches_keep_no_model_alive(torch_model: Padded, image: np.ndarray) -> None:
    import gc
    import weakref

    makers = (lambda: convolutionalize(torch_model, NATIVE),
              lambda: convolutionalize(keras_padded(torch_model)))
    for make in makers:
        model = make()
        dense_map(model, image, tile=40)
        ref = weakref.ref(model)
        del model
        gc.collect()
        assert ref() is None
