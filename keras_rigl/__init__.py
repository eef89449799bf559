"""keras_rigl: sparse neural networks trained from scratch in Keras 3 (RigL, SET, SNFS)."""

from keras_rigl.callbacks import SET, SNFS, RigL, SparseTraining, Static
from keras_rigl.condense import CondenseReport, condense
from keras_rigl.fan_in import FanIn
from keras_rigl.distributions import erk_densities, layer_densities
from keras_rigl.maskable import MaskableLayer, register_maskable
from keras_rigl.masked import Masked
from keras_rigl.digest import model_digests
from keras_rigl.counting import count_active, count_nonzero_params, model_flops, training_flops_summary
from keras_rigl.report import sparsity_report
from keras_rigl.schedule import DecayedFraction, DropFractionSchedule
from keras_rigl import structure
from keras_rigl.structure import register_structure
from keras_rigl.sparsify import (
    initialize_masks,
    masked_layers,
    masks_from_weights,
    rescale_active_weights,
    sparsify,
    strip,
)
from keras_rigl.tflite import (
    export_saved_model,
    export_tflite,
    tflite_parity,
    tflite_predict,
    tflite_weight_report,
)

__version__ = "0.1.0"

__all__ = [
    "Masked",
    "RigL",
    "SET",
    "SNFS",
    "Static",
    "SparseTraining",
    "DropFractionSchedule",
    "DecayedFraction",
    "MaskableLayer",
    "register_maskable",
    "sparsify",
    "initialize_masks",
    "strip",
    "rescale_active_weights",
    "masked_layers",
    "sparsity_report",
    "erk_densities",
    "export_tflite",
    "export_saved_model",
    "tflite_predict",
    "tflite_parity",
    "tflite_weight_report",
    "model_flops",
    "training_flops_summary",
    "count_active",
    "count_nonzero_params",
    "masks_from_weights",
    "layer_densities",
    "model_digests",
    "condense",
    "CondenseReport",
    "FanIn",
    "structure",
    "register_structure",
]
