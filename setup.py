from setuptools import find_packages, setup

setup(
    name="keras_rigl",
    version="0.1.0",
    description="Sparse neural networks trained from scratch in Keras 3: RigL, SET, SNFS, static sparse; ERK; sparse TFLite export.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_rigl", "keras_rigl.*"]),
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.12",  # the oldest Keras TensorFlow 2.21 takes; checked as in README "Keras versions"
        "numpy",
        "pandas",
    ],
    extras_require={
        # tf_keras pins TensorFlow's minor version (tf_keras 2.21 needs tensorflow 2.21.*): left unpinned here,
        # pip picks the tf_keras that matches the TensorFlow it installs. The tests run TFMOT pruning for real.
        # The backend is an extra: TensorFlow (the default backend, and TFLite export), JAX or PyTorch.
        "tensorflow": ["tensorflow>=2.21"],
        "test": ["tensorflow>=2.21", "pytest", "pytest-xdist", "hypothesis", "tensorboard", "mlxtend", "scikit-learn",
                 "matplotlib", "ai-edge-litert; platform_system=='Linux'", "tf_keras",
                 "tensorflow-model-optimization>=0.8"],
        # the backend-independent tests on JAX / PyTorch (a second environment, without TensorFlow)
        "test-backends": ["pytest", "hypothesis", "scipy", "mlxtend", "scikit-learn", "matplotlib"],
        "examples": ["tensorflow>=2.21", "matplotlib", "mlxtend", "scikit-learn", "ai-edge-litert; platform_system=='Linux'",
                     "tqdm"],
        "tfmot": ["tf_keras", "tensorflow-model-optimization>=0.8"],
        # Other Keras backends (KERAS_BACKEND=jax / torch). For PyTorch's CPU-only wheel add
        # --extra-index-url https://download.pytorch.org/whl/cpu; TFLite export still needs TensorFlow.
        "jax": ["jax>=0.4.30"],
        "torch": ["torch>=2.1"],
    },
    license="Apache-2.0",
)
