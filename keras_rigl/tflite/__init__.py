"""Sparse TFLite: export, read-back report, runtime, parity check and the XNNPACK sparse path.

Modules:

* ``flatbuffer`` -- the one reader of ``.tflite`` files (schema, op names,
  tensor decode, densify) that every other module uses;
* ``export`` -- :func:`export_tflite`, :func:`export_saved_model`;
* ``report`` -- :func:`tflite_weight_report`, read back from the file;
* ``runtime`` -- :func:`tflite_predict` and the interpreter choice;
* ``parity`` -- :func:`tflite_parity`, Keras vs TFLite outputs;
* ``structured`` -- block-sparse FULLY_CONNECTED weights: which masked Dense
  layers TFLite runs on its sparse kernels (:func:`block_sparse_layers`);
* ``xnnpack_rewrite`` / ``xnnpack_report`` -- make a model fit XNNPACK's
  sparse inference path, and check a file against its rules.
"""

from keras_rigl.tflite.export import export_saved_model, export_tflite, representative_dataset
from keras_rigl.tflite.flatbuffer import densify_tensor, read_tflite_model, tflite_tensor_values
from keras_rigl.tflite.parity import tflite_parity
from keras_rigl.tflite.report import CONVERTER_MIN_SPARSITY, TFLiteReport, format_report, tflite_weight_report
from keras_rigl.tflite.runtime import TFLiteRunner, interpreter_backend, make_interpreter, tflite_predict
from keras_rigl.tflite.structured import (
    block_sparse_layers,
    fully_connected_ops,
    kernel_block_size,
    xnnpack_misread_ops,
)
from keras_rigl.tflite.xnnpack_report import xnnpack_sparse_report
from keras_rigl.tflite.xnnpack_rewrite import SpatialFlip, rewrite_for_xnnpack_sparse, same_padding

__all__ = [
    "export_tflite",
    "export_saved_model",
    "representative_dataset",
    "tflite_weight_report",
    "format_report",
    "TFLiteReport",
    "CONVERTER_MIN_SPARSITY",
    "read_tflite_model",
    "densify_tensor",
    "tflite_tensor_values",
    "tflite_predict",
    "TFLiteRunner",
    "make_interpreter",
    "interpreter_backend",
    "tflite_parity",
    "block_sparse_layers",
    "fully_connected_ops",
    "kernel_block_size",
    "xnnpack_misread_ops",
    "rewrite_for_xnnpack_sparse",
    "xnnpack_sparse_report",
    "SpatialFlip",
    "same_padding",
]
