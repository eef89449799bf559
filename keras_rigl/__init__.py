"""keras_rigl: sparse neural networks trained from scratch in Keras 3 (RigL, SET, SNFS)."""

from keras_rigl.callbacks import SET, SNFS, RigL, SparseTraining, Static
from keras_rigl.datasets import load_dataset
from keras_rigl.distributions import erk_densities, layer_densities
from keras_rigl.maskable import MaskableLayer, register_maskable
from keras_rigl.masked import Masked
from keras_rigl.report import sparsity_report
from keras_rigl.schedule import DecayedFraction, DropFractionSchedule
from keras_rigl.sparsify import initialize_masks, masked_layers, rescale_active_weights, sparsify, strip
from keras_rigl.training_flops import model_flops
from keras_rigl.tflite_export import export_saved_model, export_tflite
from keras_rigl.tflite_report import tflite_weight_report
from keras_rigl.tflite_runtime import tflite_predict

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
    "tflite_weight_report",
    "load_dataset",
    "model_flops",
    "layer_densities",
]
