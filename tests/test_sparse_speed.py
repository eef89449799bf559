"""Fast check of benchmarks/sparse_speed.py at one tiny size (host engines only)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ai_edge_litert  # noqa: E402,F401  (a test requirement: the host engines run on LiteRT)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from conftest import load_script  # noqa: E402



def _load():
    return load_script("benchmarks/sparse_speed.py")


def test_sweep_tiny(tmp_path):
    ss = _load()
    csv, png = tmp_path / "s.csv", tmp_path / "s.png"
    # 2 repeats: _interleaved runs both orders (dense first, sparse first); the timing loops run for a
    # fixed ~0.3 s per repeat and engine, and nothing below depends on how many repeats were taken.
    ss.main(["--tiny", "--sparsities", "0.9", "--repeats", "2",
             "--models", "mobilenet_v1", "dense_stack",
             "--engines", "tflite_xnnpack_host", "tflite_builtin_host",
             "tf_sparse_dense_matmul", "tf_csr_matmul",
             "--csv", str(csv), "--png", str(png), "--workdir", str(tmp_path / "w")])
    df = pd.read_csv(csv)
    assert list(df.columns)[:9] == ["engine", "model", "sparsity", "batch", "threads",
                                    "dense_ms", "sparse_ms", "ratio", "max_abs_diff"]
    assert set(df.engine) == {"tflite_xnnpack_host", "tflite_builtin_host",
                              "tf_sparse_dense_matmul", "tf_csr_matmul"}
    assert set(df[df.engine == "tf_csr_matmul"].batch) == {1, 64}
    assert df[["dense_ms", "sparse_ms", "ratio"]].notna().all().all()
    assert (df.max_abs_diff <= 1e-4).all(), df
    np.testing.assert_allclose(df.ratio, df.sparse_ms / df.dense_ms, rtol=1e-4)
    # MobileNet was rewritten so XNNPACK's sparse path would accept it
    assert df[df.model == "mobilenet_v1"].sparse_path.all()
    assert png.exists() and png.stat().st_size > 1000
    be = ss.break_even(df)
    assert set(be) >= {"tflite_xnnpack_host/mobilenet_v1/b1", "tf_csr_matmul/dense_stack/b64"}
