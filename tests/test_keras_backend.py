"""Keras on its own default configuration, and converted Keras models outside this library.

Keras writes ``"backend": "tensorflow"`` into ``~/.keras/keras.json`` on first use; our
``[keras]`` extra installs no TensorFlow. The CLI and the library choose an importable backend
before keras is first imported (before: ``convert`` exited 1 with a 62-line traceback ending in
``No module named 'tensorflow'``). A converted model with a strided ``padding="same"`` max pool
is built from standard Keras layers only, so ``keras.saving.load_model`` reads it in a process
that never imported ``convolutionalize`` (before: our ``ConstantPadding2D`` could not be found).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers

import convolutionalize as cz
from convolutionalize.frameworks.keras import configured_backend, select_backend
from convolutionalize.frameworks.keras.model import convolutionalize_keras, load_keras, save_keras
from convolutionalize.frameworks.keras.rewrite import ConstantPadding2D, _max_pool_at_pads
from convolutionalize.geometry import same_padding

RTOL = 1e-5  # float32, the same backend on both sides

NO_TENSORFLOW = """# This process cannot import tensorflow, installed or not (a test's sitecustomize).
import sys

sys.modules["tensorflow"] = None  # import raises ModuleNotFoundError; importlib.util.find_spec gives None
"""

LIBRARY = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import convolutionalize as cz
from convolutionalize.frameworks.keras import select_backend
fcn = cz.convolutionalize(sys.argv[1])
import keras
print(keras.config.backend(), select_backend(), cz.geometry_of(fcn).stride)
"""

FRESH_LOAD = """
import sys
{line}
import keras, numpy as np
model = keras.saving.load_model(sys.argv[1], compile=False)
np.save(sys.argv[3], np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(np.load(sys.argv[2])))))
print(keras.config.backend(), sorted(m for m in sys.modules if m.partition(".")[0] == "convolutionalize"))
"""


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def python(*args: str | Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600, check=False)


def small_cnn(data_format: str = "channels_last", size: int = 32) -> keras.Model:
    """A strided "same" convolution and max pool before a Flatten head (the pool's native
    padding becomes explicit in the conversion)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3) if data_format == "channels_last" else (3, size, size))
    x = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", data_format=data_format)(inputs)
    x = layers.MaxPooling2D(3, strides=2, padding="same", data_format=data_format)(x)
    x = layers.Conv2D(6, 3, data_format=data_format)(x)
    return keras.Model(inputs, layers.Dense(5)(layers.Flatten()(x)), name="small_cnn")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.keras"
    small_cnn(size=12).save(path)
    return path


@pytest.fixture
def tensorflow_default(tmp_path: Path) -> dict[str, str]:
    """A fresh user's environment: HOME's keras.json names tensorflow (as Keras writes it on
    first use), KERAS_BACKEND unset, tensorflow not importable."""
    home, site = tmp_path / "home", tmp_path / "site"
    (home / ".keras").mkdir(parents=True)
    (home / ".keras" / "keras.json").write_text(json.dumps({"floatx": "float32", "epsilon": 1e-07,
                                                            "backend": "tensorflow",
                                                            "image_data_format": "channels_last"}))
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TENSORFLOW)
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME", "PYTHONPATH")}
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# --------------------------------------------------------------------------- the default configuration


def test_keras_alone_fails_in_the_default_configuration(tensorflow_default: dict[str, str],
                                                        tmp_path: Path) -> None:
    """The environment the other tests use reproduces the issue: plain ``import keras`` fails."""
    result = python("-c", "import keras", env=tensorflow_default, cwd=tmp_path)
    assert result.returncode != 0 and "ModuleNotFoundError: No module named 'tensorflow" in result.stderr


def test_cli_converts_in_the_default_configuration(tensorflow_default: dict[str, str], model_file: Path,
                                                   tmp_path: Path) -> None:
    result = python("-m", "convolutionalize", "convert", model_file, "-o", "out.keras",
                    env=tensorflow_default, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "error" not in result.stderr
    assert (tmp_path / "out.keras").is_file()
    assert cz.geometry_of(load_keras(tmp_path / "out.keras")).stride == (4, 4)


def test_library_picks_torch_and_says_so_once(tensorflow_default: dict[str, str], model_file: Path,
                                              tmp_path: Path) -> None:
    result = python("-c", LIBRARY, model_file, env=tensorflow_default, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch", "torch", "(4,", "4)"]
    said = [line for line in result.stderr.splitlines() if "Keras backend" in line]
    keras_json = Path(tensorflow_default["HOME"]) / ".keras" / "keras.json"
    assert said == [f"convolutionalize.frameworks.keras: Keras backend 'tensorflow' (from {keras_json}) "
                    "needs tensorflow, which cannot be imported; using 'torch' (set KERAS_BACKEND to choose)"]
    assert "Traceback" not in result.stderr


def test_explicit_importable_backend_is_kept(tensorflow_default: dict[str, str], model_file: Path,
                                             tmp_path: Path) -> None:
    env = {**tensorflow_default, "KERAS_BACKEND": "torch"}
    result = python("-c", LIBRARY, model_file, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["torch", "torch"] and "Keras backend" not in result.stderr


@pytest.mark.parametrize("keras_backend, config, expected", [
    ("torch", {"backend": "jax"}, ("torch", "KERAS_BACKEND")),
    ("", {"backend": "jax"}, ("jax", "keras.json")),
    ("", {"floatx": "float32"}, ("tensorflow", "Keras' default")),
    ("", None, ("tensorflow", "Keras' default")),
], ids=["env", "keras-json", "json-without-backend", "no-json"])
def test_configured_backend_reads_what_keras_reads(keras_backend: str, config: dict | None,
                                                   expected: tuple[str, str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_BACKEND", keras_backend)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    if config is not None:
        (tmp_path / "keras.json").write_text(json.dumps(config))
    backend, source = configured_backend()
    assert (backend, source.replace(str(tmp_path / "keras.json"), "keras.json")) == expected


def test_keras_imported_with_a_missing_backend_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Too late to choose: keras already runs on a backend that cannot be imported."""
    monkeypatch.setattr(sys.modules["keras.src.backend.config"], "_BACKEND", "tensorflow")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as NO_TENSORFLOW does
    with pytest.raises(ValueError, match=r"^keras was imported with the 'tensorflow' backend, which needs "
                       r"tensorflow, which cannot be imported; set KERAS_BACKEND=torch before"):
        select_backend()


# --------------------------------------------------------------------------- converted models outside us


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_converted_same_max_pool_loads_where_convolutionalize_was_never_imported(
        data_format: str, tmp_path: Path) -> None:
    fcn = convolutionalize_keras(small_cnn(data_format))
    assert all(type(layer).__module__.startswith("keras.") for layer in fcn.layers)  # standard layers only
    assert not any(isinstance(layer, ConstantPadding2D) for layer in fcn.layers)
    shape = (1, 32 + 8 * 2 + 1, 32 + 8 * 3 + 3, 3)  # not the native size, not a multiple of the stride
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    x = x if data_format == "channels_last" else x.transpose(0, 3, 1, 2)
    np.save(tmp_path / "x.npy", x)
    path = save_keras(fcn, tmp_path / "fcn.keras")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    result = python("-c", FRESH_LOAD.format(line=""), path, tmp_path / "x.npy", tmp_path / "y.npy", env=env,
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch", "[]"]  # no convolutionalize module in that process
    expected = np.asarray(keras.ops.convert_to_numpy(fcn.predict_on_batch(x)))
    rows, cols = fcn.geometry.cells(*shape[1:3])
    assert expected.shape == ((1, rows, cols, 5) if data_format == "channels_last" else (1, 5, rows, cols))
    assert rel(np.load(tmp_path / "y.npy"), expected) <= RTOL


def test_window_cells_load_with_the_documented_line(tmp_path: Path) -> None:
    """``output_stride`` with ``pool="window"`` keeps our ``WindowCells`` layer: the one line
    that ``save_keras``'s docstring and the README give is enough to load it."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = layers.Conv2D(4, 3, strides=2)(x)
    fcn = cz.convolutionalize(keras.Model(inputs, layers.Dense(5)(layers.Flatten()(x))), output_stride=2)
    ours = [type(layer).__name__ for layer in fcn.layers if not type(layer).__module__.startswith("keras.")]
    assert ours == ["WindowCells"]
    x = np.random.default_rng(0).standard_normal((1, 23, 21, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    path = save_keras(fcn, tmp_path / "fcn.keras")
    line = "import convolutionalize.frameworks.keras.model"
    result = python("-c", FRESH_LOAD.format(line=line), path, tmp_path / "x.npy", tmp_path / "y.npy",
                    env={**os.environ, "KERAS_BACKEND": "torch"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = np.asarray(keras.ops.convert_to_numpy(fcn.predict_on_batch(x)))
    assert expected.shape == (1, *fcn.geometry.cells(23, 21), 5)
    assert rel(np.load(tmp_path / "y.npy"), expected) <= RTOL


@pytest.mark.parametrize("kernel, stride, native", [
    ((3, 3), (2, 2), 8), ((3, 3), (2, 2), 7), ((2, 2), (2, 2), 7), ((4, 3), (3, 2), 9), ((5, 1), (2, 3), 8),
], ids=["3s2-even", "3s2-odd", "2s2-odd", "4x3s3x2", "5x1s2x3"])
@pytest.mark.parametrize("size", [(7, 9), (8, 8), (13, 6)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_max_pool_at_native_pads_equals_minus_inf_padding(kernel: tuple[int, int], stride: tuple[int, int],
                                                          native: int, size: tuple[int, int]) -> None:
    """The standard-layer max pool equals -inf padding by the native "same" pads, then a "valid"
    pool, exactly, at every size (all inputs negative: a zero padding would show)."""
    pads = tuple(same_padding(native, k, s, 1) for k, s in zip(kernel, stride))
    inputs = keras.Input((None, None, 2))
    pool = layers.MaxPooling2D(kernel, strides=stride, padding="same")
    ours = keras.Model(inputs, _max_pool_at_pads(pool, pads, "channels_last", "pool", inputs))
    reference = keras.Model(inputs, layers.MaxPooling2D(kernel, strides=stride)(
        ConstantPadding2D(pads, float("-inf"))(inputs)))
    x = -1.0 - np.random.default_rng(0).random((1, *size, 2)).astype("float32")
    want = np.asarray(keras.ops.convert_to_numpy(reference.predict_on_batch(x)))
    got = np.asarray(keras.ops.convert_to_numpy(ours.predict_on_batch(x)))
    assert got.shape == want.shape and np.array_equal(got, want)
