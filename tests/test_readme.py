"""Every code block of README.md works as written.

```python blocks are executed in order, each in a fresh namespace and its own
temporary working directory (the files the README writes -- m.keras,
model.tflite, serving/ -- land there), all in one Python subprocess so that
TensorFlow is imported once, after a short preamble that supplies what the
README leaves to the reader. What the preambles supply, and every textual substitution, is listed in
PREAMBLES and SUBSTITUTIONS below; nothing else is changed. Keras' warning that
``from_logits=True`` was given a softmax output is turned into an error, so a
loss that does not match the model's output fails the test.

```bash blocks are not run (they install packages and train for minutes). Each
command's file arguments (scripts/..., benchmarks/...) must exist in the
repository, every pip extra ``.[name]`` must be declared in setup.py, and every
pytest marker selected with ``-m`` must be declared in pytest.ini.
"""

import ast
import configparser
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

BLOCK_RE = re.compile(r"^```(\w+)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def readme_blocks(language, text=None):
    """``[(line_number, code)]`` of the fenced blocks of ``language`` in README.md."""
    text = README.read_text(encoding="utf-8") if text is None else text
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in BLOCK_RE.finditer(text)
        if m.group(1) == language
    ]


# --------------------------------------------------------------------------- python blocks

COMMON_PREAMBLE = textwrap.dedent(
    """
    import os, warnings
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # A loss with from_logits=True on a softmax output is a silent bug: Keras only warns.
    warnings.filterwarnings("error", message=".*from_logits")
    import numpy as np
    import keras, keras_rigl   # the README imports these once, in the quick start
    """
)

TINY_SPARSE_CNN = textwrap.dedent(
    """
    def _tiny_sparse_cnn():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 1))
        h = keras.layers.Conv2D(8, 3, activation="relu")(inp)
        h = keras.layers.Flatten()(h)
        out = keras.layers.Dense(10)(h)
        return keras_rigl.sparsify(keras.Model(inp, out), sparsity=0.8, seed=0)
    """
)

# (marker that identifies the block, preamble run before it, why). A block matching no
# marker gets only COMMON_PREAMBLE.
PREAMBLES = [
    (
        "keras.applications.MobileNetV2",
        "rng = np.random.default_rng(0)\n"
        "x = rng.random((4, 96, 96, 3), dtype=np.float32)\n"
        "y = rng.integers(0, 10, size=4)\n",
        "the quick start's training data x, y: 4 random 96x96 RGB images, labels 0..9",
    ),
    (
        "class MyDense",
        "class ThirdPartyConv(keras.layers.Layer):\n"
        "    pass\n",
        "ThirdPartyConv stands for a layer class from another package",
    ),
    (
        "rigl.attach(model)",
        TINY_SPARSE_CNN
        + textwrap.dedent(
            """
            import tensorflow as tf
            model = _tiny_sparse_cnn()
            optimizer = keras.optimizers.SGD(0.01)
            loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            rng = np.random.default_rng(0)
            dataset = tf.data.Dataset.from_tensor_slices(
                (rng.normal(size=(32, 8, 8, 1)).astype("float32"), rng.integers(0, 10, size=32))
            ).batch(8)

            @tf.function
            def train_step(x, y):
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
            """
        ),
        "the reader's sparse model, optimizer, dataset and train_step (a tiny sparse CNN)",
    ),
    (
        "keras_rigl.export_tflite(sparse",
        TINY_SPARSE_CNN
        + "sparse = _tiny_sparse_cnn()\n"
        "x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype('float32')\n",
        "a tiny sparse CNN stands in for the quick start's `sparse` MobileNetV2 (exporting MobileNetV2 "
        "to TFLite and a SavedModel takes over a minute here); the quick start itself runs MobileNetV2",
    ),
]

# (marker, old, new, why): textual substitutions; each must match, so a stale one fails.
SUBSTITUTIONS = [
    ("keras.applications.MobileNetV2", "epochs=30", "epochs=1", "one epoch on the stand-in data is enough to run"),
]


def prepared_source(code):
    """The block's code with its preamble and substitutions applied."""
    preamble = COMMON_PREAMBLE
    for marker, extra, _why in PREAMBLES:
        if marker in code:
            preamble += extra
    for marker, old, new, _why in SUBSTITUTIONS:
        if marker in code:
            assert old in code, f"substitution {old!r} -> {new!r} no longer matches the README block; update SUBSTITUTIONS"
            code = code.replace(old, new)
    return preamble + "\n# ---- README block ----\n" + code


# Runs every block in ONE subprocess (TensorFlow is imported once; each block still gets
# its own namespace and its own working directory) and records "ok" or the traceback.
RUNNER = textwrap.dedent(
    """
    import json, os, sys, traceback
    blocks = json.load(open(sys.argv[1], encoding="utf-8"))
    results = {}
    for name, source in blocks.items():
        os.makedirs(name, exist_ok=True)
        os.chdir(name)
        try:
            exec(compile(source, f"<{name}>", "exec"), {"__name__": "__main__"})
            results[name] = "ok"
        except BaseException:
            results[name] = traceback.format_exc()
        finally:
            os.chdir("..")
            sys.modules.get("keras") and sys.modules["keras"].backend.clear_session()
        with open("results.json", "w", encoding="utf-8") as f:
            json.dump(results, f)
    """
)

# Must fail under COMMON_PREAMBLE: proves that a from_logits mismatch fails a block.
CANARY = textwrap.dedent(
    """
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.zeros((8, 4), "float32"), np.zeros(8, "int32"), verbose=0)
    """
)

PYTHON_BLOCKS = readme_blocks("python")


def block_name(line):
    return f"README.md_line_{line}"


@pytest.fixture(scope="module")
def block_results(tmp_path_factory):
    """``{block name: "ok" | traceback}`` for every README python block and the canary."""
    import json

    work = tmp_path_factory.mktemp("readme_blocks")
    blocks = {block_name(line): prepared_source(code) for line, code in PYTHON_BLOCKS}
    blocks["canary_softmax_with_from_logits"] = COMMON_PREAMBLE + CANARY
    (work / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    (work / "runner.py").write_text(RUNNER, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    proc = subprocess.run(
        [sys.executable, "runner.py", "blocks.json"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    results = json.loads((work / "results.json").read_text()) if (work / "results.json").exists() else {}
    missing = set(blocks) - set(results)
    assert not missing, f"runner died (rc {proc.returncode}) before {sorted(missing)}:\n{proc.stderr[-4000:]}"
    return results


def test_readme_has_the_blocks_this_test_expects():
    # Guards against a silently empty parametrisation (e.g. a changed fence style).
    assert len(PYTHON_BLOCKS) >= 4, PYTHON_BLOCKS
    assert len(readme_blocks("bash")) >= 4
    # Every preamble and substitution is used by some block: no stale stand-ins.
    codes = [code for _, code in PYTHON_BLOCKS]
    for marker, *_ in PREAMBLES + SUBSTITUTIONS:
        assert any(marker in c for c in codes), f"no README python block contains {marker!r} any more"


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs(line, code, block_results):
    result = block_results[block_name(line)]
    assert result == "ok", f"README.md python block at line {line} failed:\n{result}"


def test_the_from_logits_check_catches_a_softmax_output(block_results):
    """The check above can fail: a softmax model with from_logits=True is an error under the preamble."""
    result = block_results["canary_softmax_with_from_logits"]
    assert result != "ok" and "from_logits" in result, result


# ----------------------------------------------------------------------------- bash blocks


def setup_extras():
    """Names of ``extras_require`` in setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            assert isinstance(node.value, ast.Dict), "extras_require in setup.py is not a literal dict"
            return {ast.literal_eval(k) for k in node.value.keys}
    return set()


def pytest_markers():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "pytest.ini")
    lines = parser.get("pytest", "markers", fallback="").strip().splitlines()
    return {line.split(":", 1)[0].strip() for line in lines if line.strip()}


def bash_commands(text):
    """``[(line, argv)]`` for every simple command in the bash blocks of ``text``."""
    commands = []
    for line, code in readme_blocks("bash", text):
        for offset, row in enumerate(code.splitlines()):
            row = row.split(" #", 1)[0].strip()  # trailing comments
            if not row or row.startswith("#"):
                continue
            for part in re.split(r"&&|\|\||;|\|", row):
                if part.strip():
                    commands.append((line + 1 + offset, shlex.split(part)))
    return commands


def bash_problems(text):
    """What the bash blocks of ``text`` name that does not exist, and how much was checked."""
    problems, checked = [], {"files": 0, "extras": 0, "markers": 0}
    known_extras, known_markers = setup_extras(), pytest_markers()
    for line, argv in bash_commands(text):
        for i, arg in enumerate(argv):
            if re.match(r"^(scripts|benchmarks|tests|docs)/", arg) or re.search(r"\.(py|sh)$", arg):
                checked["files"] += 1
                if not (ROOT / arg).is_file():
                    problems.append(f"line {line}: file {arg} does not exist")
            extras = re.match(r"^\.\[([\w,-]+)\]$", arg)
            if extras:
                for extra in extras.group(1).split(","):
                    checked["extras"] += 1
                    if extra not in known_extras:
                        problems.append(f"line {line}: pip extra {extra!r} is not in setup.py ({sorted(known_extras)})")
        if "pytest" in argv:
            after = argv[argv.index("pytest") + 1 :]
            for i, arg in enumerate(after[:-1]):
                if arg == "-m":
                    checked["markers"] += 1
                    marker = after[i + 1].removeprefix("not ").strip()
                    if marker not in known_markers:
                        problems.append(f"line {line}: pytest marker {marker!r} is not declared in pytest.ini")
    return problems, checked


def test_bash_blocks_name_files_extras_and_markers_that_exist():
    problems, checked = bash_problems(README.read_text(encoding="utf-8"))
    assert not problems, problems
    # The README names scripts, extras and a marker today; zero would mean the parser broke.
    assert all(checked.values()), checked


def test_bash_check_catches_a_missing_file_extra_and_marker():
    fake = (
        "```bash\n"
        ".venv/bin/pip install -e \".[nope]\" && .venv/bin/python scripts/nope.py\n"
        ".venv/bin/python -m pytest -m nope -q\n"
        "```\n"
    )
    problems, _ = bash_problems(fake)
    assert len(problems) == 3, problems
    assert any("scripts/nope.py" in p for p in problems)
    assert any("'nope'" in p and "setup.py" in p for p in problems)
    assert any("marker 'nope'" in p for p in problems)
