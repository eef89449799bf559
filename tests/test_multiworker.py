"""Training in more than one process: every process must end with the same masks and weights.

``scripts/train_multiworker.py`` is started as two real processes on
localhost. TensorFlow: a custom loop under
``tf.distribute.MultiWorkerMirroredStrategy`` (Keras' ``model.fit`` does not
run under that strategy, keras-team/keras#20585), each worker with its own
``TF_CONFIG``. JAX: ``model.fit`` with ``keras_rigl.RigL`` under
``keras.distribution.DataParallel`` over both processes
(``jax.distributed.initialize`` with a localhost coordinator), each process
feeding its half of every global batch. Each process writes
the sha256 digests of its masks and weights; they must agree, a mask update
must have moved connections, and the loss must fall.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train_multiworker.py")
WORKER_TIMEOUT_S = 420  # two TensorFlow processes on a loaded 2-core machine: ~2 minutes, usually less


def free_ports(n):
    """``n`` distinct ports that were free on localhost a moment ago (held together, so distinct)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]


def _kill(procs):
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the worker and only its children
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def run_processes(tmp_path, commands, timeout=WORKER_TIMEOUT_S):
    """Start every ``(argv, env)`` of ``commands`` at once (``--result`` appended); return their results.

    One process failing leaves the others waiting for it forever: all are
    killed at the first failure or at ``timeout``, and the assertion shows
    every process's log.
    """
    procs, logs, results = [], [], []
    try:
        for index, (argv, env) in enumerate(commands):
            results.append(tmp_path / f"process{index}.json")
            logs.append(open(tmp_path / f"process{index}.log", "w+"))
            procs.append(subprocess.Popen(
                [*argv, "--result", str(results[-1])],
                env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True,
            ))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        _kill(procs)
        text = []
        for index, log in enumerate(logs):
            log.seek(0)
            text.append(f"--- process {index} (exit {procs[index].returncode}) ---\n{log.read()[-4000:]}")
            log.close()
    report = "\n".join(text)
    assert all(p.returncode == 0 for p in procs), f"a process failed or timed out after {timeout} s:\n{report}"
    return [json.loads(path.read_text()) for path in results], report


PORT_TAKEN = ("address already in use", "failed to bind", "failed to add port")


def run_on_free_ports(tmp_path, make_commands, n_ports):
    """``run_processes(make_commands(ports))``, once more on new ports if a port was taken in between."""
    for attempt in (1, 2):
        try:
            return run_processes(tmp_path, make_commands(free_ports(n_ports)))
        except AssertionError as failure:
            if attempt == 2 or not any(text in str(failure).lower() for text in PORT_TAKEN):
                raise


def run_cluster(tmp_path, argv, n=2):
    """``n`` TensorFlow workers of ``SCRIPT argv`` on localhost, each with its TF_CONFIG."""

    def commands(ports):
        workers = [f"localhost:{port}" for port in ports]
        made = []
        for index in range(n):
            env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
            made.append(([sys.executable, SCRIPT, *argv], env))
        return made

    return run_on_free_ports(tmp_path, commands, n)


def saved_digests(path):
    """:func:`keras_rigl.model_digests` of the model the chief saved, loaded here."""
    import keras

    import keras_rigl

    return keras_rigl.model_digests(keras.models.load_model(path))


ARGS = ["--dataset", "synthetic", "--model", "mlp", "--sparsity", "0.8", "--lr", "0.1", "--steps", "24",
        "--update-freq", "4", "--drop-fraction", "0.5", "--batch-size", "32", "--seed", "3"]


@pytest.mark.parametrize("method", ["rigl", "snfs"])  # the gradient of this step / its moving average
def test_two_tensorflow_workers_end_with_identical_masks_and_weights(tmp_path, method):
    saved = tmp_path / "model.keras"
    results, report = run_cluster(tmp_path, ARGS + ["--method", method, "--save", str(saved)])
    assert all(r["method"] == method for r in results)
    assert [r["worker"] for r in results] == [0, 1] and all(r["workers"] == 2 for r in results), report
    assert all(r["replicas"] == 2 for r in results), "one replica per worker, two in sync"
    first, second = results
    assert first["digests"]["masks"] == second["digests"]["masks"], report
    assert first["digests"]["weights"] == second["digests"]["weights"], report
    assert first["start_digests"] == second["start_digests"], "the workers started from different models"
    # Mask updates happened and moved connections (steps 4, 8, ..., 16 of the 0.75 * 24-step plan).
    assert first["mask_updates"] == 4 and first["moved"] > 0, report
    assert first["digests"]["masks"] != first["start_digests"]["masks"], "the masks never changed"
    # The all-reduced loss is the same number in every worker, and it fell.
    assert np.array_equal(first["losses"], second["losses"])
    assert first["last_loss"] < 0.5 * first["first_loss"], first["losses"]
    assert abs(first["sparsity"] - 0.8) < 1e-3
    # The chief's --save holds the trained masks and weights.
    assert saved_digests(saved) == first["digests"]


def jax_python():
    """The Python that runs the JAX processes: KERAS_RIGL_BACKEND_PYTHON (as in test_backends), else this one."""
    return os.environ.get("KERAS_RIGL_BACKEND_PYTHON", sys.executable)


def test_two_jax_processes_under_data_parallel_end_with_identical_masks_and_weights(tmp_path):
    """keras.distribution.DataParallel over two processes (jax.distributed.initialize, localhost coordinator)."""
    python = jax_python()
    probe = subprocess.run([python, "-c", "import jax"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        reason = (f"jax is not importable by {python} ({probe.stderr.strip().splitlines()[-1:]}); "
                  'pip install -e ".[jax]" or set KERAS_RIGL_BACKEND_PYTHON')
        print(reason)
        pytest.skip(reason)
    saved = tmp_path / "model.keras"

    def commands(ports):
        made = []
        for index in range(2):
            env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="jax", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
            env.pop("TF_CONFIG", None)
            argv = [python, SCRIPT, *ARGS, "--method", "rigl", "--coordinator", f"localhost:{ports[0]}",
                    "--num-processes", "2", "--process-id", str(index), "--save", str(saved)]
            made.append((argv, env))
        return made

    results, report = run_on_free_ports(tmp_path, commands, 1)
    first, second = results
    assert [r["worker"] for r in results] == [0, 1] and all(r["workers"] == 2 for r in results), report
    assert all(r["replicas"] == 2 for r in results), "one CPU device per process, two in the data-parallel mesh"
    assert first["digests"] == second["digests"], report
    assert first["start_digests"] == second["start_digests"], "the processes started from different models"
    assert first["mask_updates"] == 4 and first["moved"] > 0, report
    assert first["digests"]["masks"] != first["start_digests"]["masks"], "the masks never changed"
    # fit's loss is the mean over the global batch: the same in both processes, and it fell.
    assert np.allclose(first["losses"], second["losses"], rtol=1e-5)
    assert first["last_loss"] < 0.5 * first["first_loss"], first["losses"]
    # Process 0's --save, loaded here on TensorFlow, holds the trained masks (its weights
    # digest on JAX also covers the gradient probes, which are not saved).
    assert saved_digests(saved)["masks"] == first["digests"]["masks"]


# ---------------------------------------------------- argument checks (no TensorFlow run)
def _script_module():
    return load_script("scripts/train_multiworker.py")


@pytest.mark.parametrize(
    "tf_config, message",
    [
        ("{not json", "not valid JSON"),
        ('["worker"]', "is a list"),
        ('{"cluster": {"worker": ["localhost:1"]}}', "needs 'cluster' and 'task'"),
        ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}', "'host:port'"),
        ('{"cluster": {"ps": ["localhost:1"]}, "task": {"type": "ps", "index": 0}}', "only 'chief' and 'worker'"),
        ('{"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 2}}',
         "not one of the cluster's members"),
    ],
)
def test_bad_tf_config_is_a_usage_error(tf_config, message, capsys):
    module = _script_module()
    with pytest.raises(SystemExit) as exit_info:
        module.cluster_from_env(module.build_parser(), {"TF_CONFIG": tf_config})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tf_config_gives_worker_count_and_index():
    module = _script_module()
    parser = module.build_parser()
    two = '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}'
    with_chief = '{"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}'
    assert module.cluster_from_env(parser, {"TF_CONFIG": two}) == (2, 1)
    assert module.cluster_from_env(parser, {"TF_CONFIG": with_chief}) == (2, 1)
    assert module.cluster_from_env(parser, {}) == (1, 0)


def test_batch_that_does_not_split_over_the_workers_is_refused(capsys, monkeypatch):
    module = _script_module()
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}')
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--batch-size", "33"])
    assert exit_info.value.code == 2
    assert "multiple of 2" in capsys.readouterr().err


# ------------------------------------------------------------ model_digests
def test_model_digests_see_one_flipped_mask_entry_and_one_changed_weight():
    import keras

    import keras_rigl
    from conftest import sparse_cnn

    model, twin = sparse_cnn(seed=0), sparse_cnn(seed=0)
    before = keras_rigl.model_digests(model)
    assert before == keras_rigl.model_digests(twin)  # same seed, same state
    mw = keras_rigl.masked_layers(model)[0].masked_weights[0]
    mask = keras.ops.convert_to_numpy(mw.mask).copy()
    mask.flat[0] = 1 - mask.flat[0]
    mw.mask.assign(mask)
    flipped = keras_rigl.model_digests(model)
    assert flipped["masks"] != before["masks"] and flipped["weights"] != before["weights"]
    bias = model.get_layer("masked_out").layer.bias
    bias.assign(bias.numpy() + np.float32(1e-7))
    nudged = keras_rigl.model_digests(model)
    assert nudged["masks"] == flipped["masks"] and nudged["weights"] != flipped["weights"]


def test_model_digests_of_a_saved_and_loaded_model_are_the_same(tmp_path):
    """The digest is of the values, not of how the variables were named when the model was built."""
    import keras

    import keras_rigl
    from conftest import sparse_cnn

    model = sparse_cnn(seed=0)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    assert keras_rigl.model_digests(again) == keras_rigl.model_digests(model)


@pytest.mark.parametrize(
    "backend, argv, message",
    [
        ("jax", ["--num-processes", "2", "--process-id", "2", "--coordinator", "localhost:1"], "must be below --num-processes 2"),
        ("jax", ["--num-processes", "2", "--process-id", "1"], "needs --coordinator HOST:PORT"),
        ("jax", ["--num-processes", "2", "--process-id", "1", "--coordinator", "localhost"], "needs --coordinator HOST:PORT"),
        ("tensorflow", ["--coordinator", "localhost:1"], "on TensorFlow every worker reads TF_CONFIG"),
        ("torch", [], "runs on tensorflow (MultiWorkerMirroredStrategy) or jax"),
    ],
)
def test_cluster_flags_are_checked_before_training(backend, argv, message, capsys, monkeypatch):
    module = _script_module()
    monkeypatch.setenv("KERAS_BACKEND", backend)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
