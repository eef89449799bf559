#!/usr/bin/env python
"""Train a sparse network with RigL (or SET, SNFS) on several machines, on TensorFlow or JAX.

TensorFlow (tf.distribute.MultiWorkerMirroredStrategy): start the same
command on every machine, each with its own TF_CONFIG (the
cluster's worker addresses, the same on every machine, and this machine's
index); here two workers on one machine:

    TF_CONFIG='{"cluster": {"worker": ["localhost:12345", "localhost:12346"]}, "task": {"type": "worker", "index": 0}}' \\
        python scripts/train_multiworker.py --dataset synthetic --steps 60 &
    TF_CONFIG='{"cluster": {"worker": ["localhost:12345", "localhost:12346"]}, "task": {"type": "worker", "index": 1}}' \\
        python scripts/train_multiworker.py --dataset synthetic --steps 60

Without TF_CONFIG it trains alone (one worker). Keras 3's ``model.fit``
does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585), so
this is a custom training loop driven by the callback's hooks
(``attach``, ``before_step``, ``after_step``), the loop the README's
"Custom training loop" section describes, inside ``strategy.run``:

* every worker reads the same shuffled stream of global batches and feeds
  its own slice of each (``--batch-size`` is the global batch);
* the optimizer sums the gradients over all workers (the loss is divided
  by the global batch), so every copy of the weights takes the same step;
* on an update step each worker's ``Masked`` layers store the dense
  gradient of their own slice in a sync-on-read buffer; the mask update
  reads it averaged over all workers (an all-reduce), i.e. the dense
  gradient of the global batch, and ranks the same weights with the same
  seed, so every worker selects the same masks without sending any mask.

JAX (KERAS_BACKEND=jax): ``model.fit(..., callbacks=[keras_rigl.RigL(...)])``
under ``keras.distribution.DataParallel`` over the devices of all processes;
every process calls ``jax.distributed.initialize`` with process 0's address,
the number of processes and its own id, and feeds its slice of every global
batch (``auto_shard_dataset=False``); two processes on one machine:

    KERAS_BACKEND=jax python scripts/train_multiworker.py --coordinator localhost:12345 --num-processes 2 --process-id 0 &
    KERAS_BACKEND=jax python scripts/train_multiworker.py --coordinator localhost:12345 --num-processes 2 --process-id 1

There the dense gradient is the global batch's already (the gradient probes
of keras_rigl.backend_capture are replicated variables, reduced by the
compiled step), and the update computed from replicated values in each
process is written back through JAX, which checks that every process passes
the same value.

Each worker prints, and writes with ``--result FILE`` (JSON, atomically),
the sha256 digests of its masks and of all its weights
(:func:`keras_rigl.model_digests`), the loss per step and the mask updates;
the digests agree across workers. ``--save FILE.keras`` makes the chief
(worker 0) save the trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from rigl_harness import datasets, zoo  # noqa: E402  (scripts/ is on sys.path when this file runs)
from rigl_harness.atomic import write_file, write_text  # noqa: E402
from rigl_harness.cli import HelpFormatter, ranged  # noqa: E402

MODELS = ("cnn", "mlp")
METHODS = ("rigl", "set", "snfs")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dataset", default="synthetic", help="mnist5k | digits | synthetic | PATH.npz")
    p.add_argument("--model", default="cnn", choices=MODELS, help="architecture (rigl_harness.zoo)")
    p.add_argument("--method", default="rigl", choices=METHODS,
                   help="rigl grows by the all-reduced dense gradient, snfs by its all-reduced moving average, "
                        "set at random from the seed")
    p.add_argument("--sparsity", type=ranged(float, 0.0, 1.0, hi_open=True, what=" (must be in [0, 1))"), default=0.9,
                   help="share of masked weights that are zero (ERK)")
    p.add_argument("--steps", type=ranged(int, 1, what=" (optimizer steps, >= 1)"), default=200,
                   help="optimizer steps of the whole run")
    p.add_argument("--batch-size", type=ranged(int, 1, what=" (global batch, >= 1)"), default=64,
                   help="global batch: every worker feeds batch-size / workers examples of it")
    p.add_argument("--update-freq", type=ranged(int, 1, what=" (steps between mask updates, >= 1)"), default=50,
                   help="ΔT: optimizer steps between mask updates (updates stop at 75%% of --steps)")
    p.add_argument("--drop-fraction", type=ranged(float, 0.0, 1.0, lo_open=True, what=" (must be in (0, 1])"),
                   default=0.3, help="share of active connections moved at an update, cosine-decayed")
    p.add_argument("--lr", type=ranged(float, 0.0, lo_open=True, what=" (> 0)"), default=0.05,
                   help="SGD (momentum 0.9) learning rate")
    p.add_argument("--seed", type=ranged(int, 0, what=" (--seed must be an integer >= 0)"), default=0,
                   help="seed of the initialisation, masks and batch order: the same on every worker")
    jax_group = p.add_argument_group("KERAS_BACKEND=jax (TensorFlow reads TF_CONFIG instead)")
    jax_group.add_argument("--coordinator", default=None,
                           help="HOST:PORT of process 0, the same on every machine (jax.distributed.initialize)")
    jax_group.add_argument("--num-processes", type=ranged(int, 1, what=" (>= 1)"), default=1,
                           help="number of processes (machines), the same on every machine")
    jax_group.add_argument("--process-id", type=ranged(int, 0, what=" (>= 0)"), default=0,
                           help="this process: 0 .. num-processes - 1")
    p.add_argument("--result", default=None, help="write this worker's digests, losses and updates here (JSON)")
    p.add_argument("--save", default=None, help="the chief (worker 0) saves the trained model here (.keras)")
    return p


def cluster_from_env(parser, environ=os.environ):
    """``(workers, index)`` from TF_CONFIG (``(1, 0)`` without it); a bad TF_CONFIG is a usage error."""
    text = environ.get("TF_CONFIG")
    if not text:
        return 1, 0
    hint = ('TF_CONFIG must be JSON like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        parser.error(f"TF_CONFIG is not valid JSON ({exc.msg}); {hint}.")
    if not isinstance(config, dict):
        parser.error(f"TF_CONFIG is a {type(config).__name__}; {hint}.")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        parser.error(f"TF_CONFIG needs 'cluster' and 'task'; {hint}.")
    unknown = sorted(set(cluster) - {"worker", "chief"})
    if unknown:
        parser.error(f"TF_CONFIG cluster has {unknown}: MultiWorkerMirroredStrategy takes only 'chief' and 'worker'.")
    members = []
    for kind in ("chief", "worker"):
        addresses = cluster.get(kind, [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            parser.error(f"TF_CONFIG cluster '{kind}' must be a list of 'host:port' strings; {hint}.")
        members += [(kind, i) for i in range(len(addresses))]
    if not members:
        parser.error(f"TF_CONFIG lists no worker; {hint}.")
    kind, index = task.get("type"), task.get("index")
    if (kind, index) not in members or isinstance(index, bool):
        parser.error(f"TF_CONFIG task {task!r} is not one of the cluster's members {members}; {hint}.")
    return len(members), members.index((kind, index))


def cluster_from_flags(parser, args):
    """``(processes, index)`` of a JAX run from --coordinator, --num-processes and --process-id."""
    if args.process_id >= args.num_processes:
        parser.error(f"--process-id {args.process_id} must be below --num-processes {args.num_processes} "
                     "(0 on the first machine, num-processes - 1 on the last).")
    if args.num_processes > 1 and (args.coordinator is None or ":" not in args.coordinator):
        parser.error(f"--num-processes {args.num_processes} needs --coordinator HOST:PORT (process 0's address), "
                     f"got {args.coordinator!r}.")
    return args.num_processes, args.process_id


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax":
        workers, worker = cluster_from_flags(parser, args)
    elif backend == "tensorflow":
        given = [flag for flag, value, default in (("--coordinator", args.coordinator, None),
                 ("--num-processes", args.num_processes, 1), ("--process-id", args.process_id, 0)) if value != default]
        if given:
            parser.error(f"{', '.join(given)}: for KERAS_BACKEND=jax; on TensorFlow every worker reads TF_CONFIG.")
        workers, worker = cluster_from_env(parser)
    else:
        parser.error(f"KERAS_BACKEND={backend!r}: this script runs on tensorflow (MultiWorkerMirroredStrategy) "
                     "or jax (keras.distribution.DataParallel).")
    if args.batch_size % workers:
        parser.error(f"--batch-size {args.batch_size} does not split over {workers} workers; "
                     f"use a multiple of {workers}.")
    if args.save is not None and not args.save.endswith(".keras"):
        parser.error(f"--save {args.save!r} must end in .keras")
    for flag, path in (("--result", args.result), ("--save", args.save)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            parser.error(f"{flag} {path!r}: folder {folder!r} does not exist; create it first.")
    try:
        data = datasets.load_dataset(args.dataset, seed=args.seed)
    except (ValueError, TypeError, OSError) as exc:
        parser.error(f"--dataset {args.dataset!r}: {exc}")
    result = (train_jax if backend == "jax" else train)(args, data, workers, worker)
    line = (f"{backend} worker {result['worker']}/{result['workers']}: loss {result['first_loss']:.4f} -> "
            f"{result['last_loss']:.4f}, {result['mask_updates']} mask updates, test accuracy "
            f"{result['test_accuracy']:.3f}, sparsity {result['sparsity']:.3f}\n"
            f"  masks sha256   {result['digests']['masks']}\n"
            f"  weights sha256 {result['digests']['weights']}")
    print(line, flush=True)
    if args.result:
        write_text(args.result, json.dumps(result, indent=1) + "\n")
    return 0


def sparse_model(args, data):
    """The model every worker builds alike: same seed, same initial weights, same masks."""
    import keras_rigl

    model = zoo.build_model(args.model, data.input_shape, data.num_classes, seed=args.seed)
    model = keras_rigl.sparsify(model, args.sparsity, distribution="erk", seed=args.seed)
    keras_rigl.rescale_active_weights(model)
    return model


def sparse_method(args):
    import keras_rigl

    method = {"rigl": keras_rigl.RigL, "set": keras_rigl.SET, "snfs": keras_rigl.SNFS}[args.method]
    return method(update_freq=args.update_freq, drop_fraction=args.drop_fraction, seed=args.seed)


def summary(args, data, model, algo, losses, start_digests, workers, worker, replicas):
    """What every worker prints and writes: digests, losses, mask updates, held-out accuracy."""
    import keras
    import numpy as np

    import keras_rigl

    if not np.isfinite(losses[-1]):
        raise SystemExit(f"error: the loss became {losses[-1]}; lower --lr.")
    logits = model(data.x_test, training=False)  # the whole test split in every worker
    accuracy = float(np.mean(np.argmax(keras.ops.convert_to_numpy(logits), -1) == data.y_test))
    updates = algo.updates
    share = max(1, len(losses) // 5)
    return {
        "worker": worker,
        "workers": workers,
        "replicas": replicas,
        "method": args.method,
        "steps": args.steps,
        "global_batch": args.batch_size,
        "losses": [float(v) for v in losses],
        "first_loss": float(np.mean(losses[:share])),
        "last_loss": float(np.mean(losses[-share:])),
        "mask_updates": int(updates["step"].nunique()) if len(updates) else 0,
        "moved": int(updates["n_moved"].sum()) if len(updates) else 0,
        "test_accuracy": accuracy,
        "sparsity": algo.current_sparsity(model),
        "start_digests": start_digests,
        "digests": keras_rigl.model_digests(model),
    }


def train(args, data, workers=1, worker=0):
    """TensorFlow: a custom loop under MultiWorkerMirroredStrategy (TF_CONFIG names the workers)."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_rigl

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    replicas = strategy.num_replicas_in_sync
    if args.batch_size % replicas:
        raise SystemExit(f"error: --batch-size {args.batch_size} does not split over {replicas} replicas; "
                         f"use a multiple of {replicas}.")

    with strategy.scope():
        # (The strategy also broadcasts the chief's initial values.)
        model = sparse_model(args, data)
        optimizer = keras.optimizers.SGD(args.lr, momentum=0.9)
        optimizer.build(model.trainable_variables)
    per_example_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    algo = sparse_method(args)
    # Before the step is traced: RigL and SNFS make the gradient buffers (one per
    # replica) and the capture switch that before_step turns on for update steps.
    algo.attach(model, total_steps=args.steps)
    start_digests = keras_rigl.model_digests(model)

    global_batch = args.batch_size

    def dataset_fn(context):
        # The same stream of global batches on every worker (same seed); each
        # input pipeline keeps its own contiguous slice, cut per replica.
        per_pipeline = global_batch // context.num_input_pipelines
        per_replica = context.get_per_replica_batch_size(global_batch)
        first = context.input_pipeline_id * per_pipeline
        ds = tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train.astype("int32")))
        ds = ds.shuffle(len(data.x_train), seed=args.seed, reshuffle_each_iteration=True).repeat()
        ds = ds.batch(global_batch, drop_remainder=True)
        ds = ds.map(lambda x, y: (x[first:first + per_pipeline], y[first:first + per_pipeline]))
        return ds.unbatch().batch(per_replica, drop_remainder=True)

    options = tf.distribute.InputOptions(experimental_fetch_to_device=False)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn, options))

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            # Divided by the global batch: the optimizer sums over replicas.
            loss = tf.nn.compute_average_loss(per_example_loss(y, logits), global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(iterator):
        per_replica_loss = strategy.run(replica_step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

    losses = []
    for _ in range(args.steps):
        step = int(optimizer.iterations.numpy()) + 1
        algo.before_step(model, step)          # RigL: capture on for update steps
        losses.append(float(train_step(iterator)))
        algo.after_step(model, step, optimizer)  # the update reads the all-reduced gradient
    if args.save and worker == 0:  # the chief: the first 'chief', else worker 0
        write_file(args.save, lambda tmp: model.save(tmp))
    return summary(args, data, model, algo, losses, start_digests, workers, worker, replicas)


def train_jax(args, data, processes=1, process=0):
    """JAX: ``model.fit`` under ``keras.distribution.DataParallel`` over the devices of all processes."""
    import jax

    if processes > 1:
        # Before Keras touches a device: afterwards jax.devices() lists every process's devices.
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=processes,
                                   process_id=process)
    import keras
    import numpy as np

    import keras_rigl

    devices = keras.distribution.list_devices()
    replicas = len(devices)
    if args.batch_size % replicas:
        raise SystemExit(f"error: --batch-size {args.batch_size} does not split over {replicas} devices; "
                         f"use a multiple of {replicas}.")
    # auto_shard_dataset=False: each process passes its own slice of every global
    # batch, and Keras assembles the global batch from the processes' slices.
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
    model = sparse_model(args, data)
    model.compile(keras.optimizers.SGD(args.lr, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    algo = sparse_method(args)
    start_digests = keras_rigl.model_digests(model)

    # The same shuffled stream of global batches in every process (same seed);
    # process p keeps rows p*per .. (p+1)*per - 1 of each.
    per_process = args.batch_size // processes
    rng = np.random.default_rng(args.seed)
    epochs = -(-args.steps * args.batch_size // len(data.x_train))
    order = np.concatenate([rng.permutation(len(data.x_train)) for _ in range(epochs)])
    order = order[: args.steps * args.batch_size].reshape(args.steps, args.batch_size)
    local = order[:, process * per_process:(process + 1) * per_process].reshape(-1)

    class StepLosses(keras.callbacks.Callback):
        """The loss of every step, from the running mean over the epoch that ``fit`` logs."""

        def __init__(self):
            super().__init__()
            self.losses, self._total = [], 0.0

        def on_train_batch_end(self, batch, logs=None):
            total = float(logs["loss"]) * (batch + 1)  # equal batches: mean * count = sum so far
            self.losses.append(total - self._total)
            self._total = total

    step_losses = StepLosses()
    model.fit(data.x_train[local], data.y_train[local].astype("int32"), batch_size=per_process, epochs=1,
              shuffle=False, callbacks=[algo, step_losses], verbose=0)
    if args.save:
        # Every process saves (reading the model's state may run computations over
        # all processes' devices, which process 0 alone would wait for forever);
        # only process 0 keeps its file.
        if process == 0:
            write_file(args.save, lambda tmp: model.save(tmp))
        else:
            with tempfile.TemporaryDirectory() as folder:
                model.save(os.path.join(folder, "model.keras"))
    return summary(args, data, model, algo, step_losses.losses, start_digests, processes, process, replicas)


if __name__ == "__main__":
    sys.exit(main())
