"""Fault cases of the TFLite export path (issue 10): each failed on the code before its fix.

Only the top-level API is used here, so the same tests ran against the old
flat modules to see them fail.
"""

import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_rigl
from conftest import load_script

# the checkout whose keras_rigl is imported (scripts/ and subprocesses use the same one)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(keras_rigl.__file__)))


def _small(seed=0):
    """Conv 3x3 (864 weights) + conv 1x1 (2,048) + dense: big enough for every quantize mode."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(32, 3, activation="relu")(inp)
    x = keras.layers.Conv2D(64, 1, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10)(x)
    return keras_rigl.sparsify(keras.Model(inp, out), 0.85, distribution="uniform", seed=0)


def _images(n, seed=0):
    return np.random.default_rng(seed).random((n, 12, 12, 3)).astype("float32")


# --- int8 with non-finite representative data --------------------------------------------

def test_int8_refuses_all_nan_representative_data(tmp_path):
    # before: a float32 file was written and the report said quantize="int8"
    path = tmp_path / "q.tflite"
    with pytest.raises(ValueError, match=r"representative_data sample 0 holds NaN or inf values"):
        keras_rigl.export_tflite(_small(), str(path), quantize="int8",
                                 representative_data=np.full((8, 12, 12, 3), np.nan, "float32"))
    assert not path.exists()


def test_int8_refuses_one_nan_pixel_in_200_images(tmp_path):
    # before: an int8 file agreeing with Keras on 0% of predictions, no word said
    x = _images(200)
    x[137, 5, 6, 1] = np.nan
    path = tmp_path / "q.tflite"
    with pytest.raises(ValueError, match=r"sample 137 holds NaN or inf values.*finite inputs"):
        keras_rigl.export_tflite(_small(), str(path), quantize="int8", representative_data=x)
    assert not path.exists()
    x[137, 5, 6, 1] = np.inf
    with pytest.raises(ValueError, match="sample 137 holds NaN or inf"):
        keras_rigl.export_tflite(_small(), str(path), quantize="int8", representative_data=x)


@pytest.mark.parametrize("quantize,weight_dtype,io_dtype", [
    (None, "float32", np.float32), ("dynamic", "int8", np.float32),
    ("float16", "float16", np.float32), ("int8", "int8", np.int8)])
def test_report_describes_the_written_file(quantize, weight_dtype, io_dtype, tmp_path):
    path = str(tmp_path / "m.tflite")
    data = _images(16) if quantize == "int8" else None
    info = keras_rigl.export_tflite(_small(), path, quantize=quantize, representative_data=data,
                                    check_runtime=False)
    # read back independently: the interpreter's own view of the file's input tensor
    from ai_edge_litert.interpreter import Interpreter

    assert Interpreter(model_path=path).get_input_details()[0]["dtype"] == io_dtype
    assert info.attrs["quantize"] == quantize
    big = info[(info["role"] == "weight") & (info["size"] >= 1024)]
    assert len(big) and (big["dtype"] == weight_dtype).all()


def test_a_file_that_is_not_what_was_asked_for_is_refused(tmp_path, monkeypatch):
    # a converter that silently falls back to float32 (what all-NaN calibration did)
    import keras_rigl.tflite.export as export_module

    real_convert = export_module._convert
    monkeypatch.setattr(export_module, "_convert",
                        lambda model, quantize, representative, sparse: real_convert(model, None, None, sparse))
    path = tmp_path / "q.tflite"
    with pytest.raises(ValueError, match=r"asked for quantize='int8' but the converter produced a file holding "
                                         r"float32 weights/inputs \(nothing was written\)"):
        keras_rigl.export_tflite(_small(), str(path), quantize="int8", representative_data=_images(8))
    assert not path.exists()


# --- truncated files ----------------------------------------------------------------------

def test_weight_report_on_truncated_file_is_one_line_value_error(tmp_path):
    good = tmp_path / "good.tflite"
    keras_rigl.export_tflite(_small(), str(good), check_runtime=False)
    raw = good.read_bytes()
    for cut in (40, len(raw) // 3, len(raw) // 2, len(raw) - 64):
        bad = tmp_path / f"cut{cut}.tflite"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError) as err:
            keras_rigl.tflite_weight_report(str(bad))
        message = str(err.value)
        assert "\n" not in message
        assert repr(str(bad)) in message and "is not a complete .tflite flatbuffer" in message, message
        assert message.endswith("re-export it")


# --- XNNPACK refusal message ----------------------------------------------------------------

def test_xnnpack_refusal_messages_are_separated(tmp_path):
    # before: "failed to delegate CONV_2D node #2Node number 6 (TfLiteXNNPackDelegate) failed to prepare."
    info = keras_rigl.export_tflite(_small(), str(tmp_path / "d.tflite"), quantize="dynamic")
    status = info.attrs["xnnpack_delegate"]
    assert status.startswith("refused: "), status
    parts = status[len("refused: "):].split("; ")
    assert len(parts) >= 2, status
    assert parts[0].startswith("failed to delegate CONV_2D node #")
    assert parts[-1].startswith("Node number ") and parts[-1].endswith("(TfLiteXNNPackDelegate) failed to prepare.")


# --- a killed write leaves no temp file for good ------------------------------------------

_KILLED_WRITER = """
import os, signal, sys
import keras, numpy as np
import keras_rigl
inp = keras.Input((4,))
model = keras.Model(inp, keras.layers.Dense(2)(inp))
real_fsync = os.fsync
target_dir = os.path.dirname(os.path.abspath(sys.argv[1]))
def die(fd):
    written = os.readlink(f"/proc/self/fd/{fd}")
    if os.path.dirname(written) == target_dir:  # the .tflite temp file, written: SIGKILL before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    return real_fsync(fd)
os.fsync = die
keras_rigl.export_tflite(model, sys.argv[1], check_runtime=False)
"""


def test_killed_write_leaves_a_temp_that_the_next_write_removes(tmp_path):
    path = tmp_path / "m.tflite"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -9, stderr.decode()[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert not path.exists() and len(leftovers) == 1 and leftovers[0].endswith(".tmp"), leftovers
    assert leftovers[0].startswith(f".m.tflite.{proc.pid}-")  # names the dead writer
    keras_rigl.export_tflite(_small(), str(path), check_runtime=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]


def test_temp_of_a_live_writer_is_left_alone(tmp_path):
    live = tmp_path / f".m.tflite.{os.getppid()}-0123abcd.tmp"  # our parent: alive while we run
    live.write_bytes(b"partial")
    keras_rigl.export_tflite(_small(), str(tmp_path / "m.tflite"), check_runtime=False)
    assert live.exists()


# --- scripts/export.py --representative-data validation -----------------------------------

def _script():
    return load_script("scripts/export.py")


def _npz_with_header(path, member, header_shape):
    """An .npz whose member's .npy header declares ``header_shape`` over 16 bytes of data."""
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": header_shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, header.getvalue() + b"\0" * 16)


def _bad_crc_npz(path):
    np.savez(path, x=np.arange(64, dtype="float32").reshape(4, 4, 4, 1), y=np.arange(4))
    raw = bytearray(open(path, "rb").read())
    offset = raw.index(b"\x00\x00\x80?")  # the float 1.0 of x's data, stored uncompressed
    raw[offset + 3] ^= 0xFF
    open(path, "wb").write(bytes(raw))


@pytest.fixture(scope="module")
def small_model_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "small.keras")
    _small().save(path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("bad_crc", r"member 'x.npy' of .* is corrupted \(bad CRC"),
    ("huge_shape", r"member 'x.npy' of .* declares shape \(100000, 100000, 100000\)"),
    ("not_npy", r"member 'notes.txt' of .* is not a .npy array"),
    ("not_zip", r"could not read .* as an .npz archive"),
])
def test_export_script_refuses_a_bad_representative_npz(kind, message, small_model_file, tmp_path, capsys):
    data = str(tmp_path / f"{kind}.npz")
    if kind == "bad_crc":
        _bad_crc_npz(data)
    elif kind == "huge_shape":
        _npz_with_header(data, "x.npy", (100000, 100000, 100000))
    elif kind == "not_npy":
        with zipfile.ZipFile(data, "w") as archive:
            archive.writestr("notes.txt", "hello")
    else:
        open(data, "wb").write(b"this is not a zip file")
    out = str(tmp_path / "q.tflite")
    with pytest.raises(SystemExit) as err:
        _script().main([small_model_file, "--quantize", "int8", "--representative-data", data, "--out", out])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --representative-data")
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not os.path.exists(out)


def test_export_script_does_not_fall_back_from_a_broken_train_test_npz(small_model_file, tmp_path, capsys):
    # x_train and y_train disagree in length: the file fails validation as a train/test set, and
    # must not be re-read silently as loose calibration images
    data = str(tmp_path / "mismatch.npz")
    np.savez(data, x_train=_images(10), y_train=np.zeros(9, "int64"), x_test=_images(4), y_test=np.zeros(4, "int64"))
    out = str(tmp_path / "q.tflite")
    with pytest.raises(SystemExit) as err:
        _script().main([small_model_file, "--quantize", "int8", "--representative-data", data, "--out", out])
    assert err.value.code == 2
    assert "x_train has 10 rows but y_train has 9" in capsys.readouterr().err
    assert not os.path.exists(out)
