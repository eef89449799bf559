"""The example scripts' helper package (not part of keras_rigl): what scripts/train.py and compare.py share.

* :mod:`rigl_harness.datasets`: the built-in data sets and validated ``.npz`` loading;
* :mod:`rigl_harness.zoo`: the model builders (CNN, LeNet-300-100, LSTM, keras.applications);
* :mod:`rigl_harness.runner`: one training run (``Config``, ``run``);
* :mod:`rigl_harness.comparison`: compare.py's grid, baselines, results CSV, summary and plots;
* :mod:`rigl_harness.atomic`: atomic file writes and the staged run folder;
* :mod:`rigl_harness.cli`: argument parsing shared by the two scripts.

It imports keras_rigl (the library); keras_rigl never imports it.
"""
