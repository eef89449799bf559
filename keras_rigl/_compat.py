"""Every private Keras API keras_rigl uses, in one place, each with why no public API serves.

Tested against the oldest and the newest Keras that ``setup.py`` allows
(see README, "Keras versions"). When Keras changes one of these, this module
is the only one to mend.
"""

from __future__ import annotations

import contextlib

import keras


def is_graph_model(model):
    """True for Sequential and functional models (the ones ``clone_model`` can rebuild).

    Why private: Keras exports no ``Functional`` class; a subclassed model
    and a functional one are both plain ``keras.Model`` instances publicly.
    """
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


@contextlib.contextmanager
def unlocked_state(layer):
    """Let ``layer`` create variables after Keras locked its state (a deferred build).

    Why private: Keras locks a layer's tracker once it is built and offers no
    public way to add a weight afterwards; ``Masked`` builds masks for layers
    (MultiHeadAttention) that only build on their first call.
    """
    tracker = layer._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if was_locked:
            layer._lock_state()


def call_accepts(layer, argument):
    """Whether ``layer.call`` takes ``argument`` ("training" or "mask").

    Why private: Keras computes this once per layer (``_call_has_training_arg``
    / ``_call_has_mask_arg``), following its own rules for ``**kwargs``; the
    public ``call_signature_parameters`` lists names only.
    """
    return bool(getattr(layer, f"_call_has_{argument}_arg"))


def optimizer_variable_index(optimizer, variable):
    """Position of ``variable`` in the optimizer's per-variable slot lists, or None.

    Why private: Keras optimizers keep slots in lists aligned with their
    trainable variables and expose no public "slot of this variable" lookup.
    """
    try:
        return optimizer._get_variable_index(variable)
    except (KeyError, AttributeError):
        return None


def optimizer_trainable_variables(optimizer):
    """The optimizer's own list of the variables it updates (the alignment of its slot lists).

    Why private: the public ``optimizer.variables`` lists the slots themselves,
    not the model variables they belong to.
    """
    return list(optimizer._trainable_variables)


def build_input_shapes(layer):
    """``{argument: shape}`` a layer was built with (empty when unknown).

    Why private: ``get_build_config()`` holds it publicly but only for layers
    built through ``__call__``; EinsumDense inside MultiHeadAttention is built
    directly, and only ``_build_shapes_dict`` records its shape.
    """
    return dict(getattr(layer, "_build_shapes_dict", None) or {})


def inbound_nodes(operation):
    """The call nodes of ``operation`` in a functional graph.

    Why private: Keras 3 exposes no public walk of a functional graph; the
    XNNPACK rewrite must re-call each operation with its recorded arguments.
    """
    return list(operation._inbound_nodes)


def fill_in_arguments(node, tensor_map):
    """``(args, kwargs)`` of a functional-graph node's call, its tensors replaced via ``tensor_map``.

    ``tensor_map`` maps ``id(tensor)`` to the replacement. Why private: Keras 3
    keeps a node's recorded call arguments in ``node.arguments`` and exposes
    no public way to re-call an operation with them; the XNNPACK rewrite
    rebuilds a graph operation by operation.
    """
    return node.arguments.fill_in(tensor_map)


def graph_model(model):
    """The functional model a Sequential wraps (the model itself otherwise).

    Why private: a built ``keras.Sequential`` keeps its graph in
    ``_functional``; walking ``operations`` / inbound nodes needs that graph,
    and Keras offers no public accessor.
    """
    if isinstance(model, keras.Sequential) and getattr(model, "_functional", None) is not None:
        return model._functional
    return model


def optimizer_slot_lists(optimizer):
    """``[(attribute name, list)]``: the optimizer's per-variable state lists, aligned with its variables.

    Why private: Keras optimizers keep each kind of per-variable state in a
    list attribute aligned with ``optimizer_trainable_variables`` (public for
    ``SGD.momentums``, private for ``Adam._momentums``, ``Adagrad._accumulators``,
    the ``use_ema`` average ``_model_variables_moving_average``...); the public
    ``optimizer.variables`` is one flat list that says nothing about which
    model variable a slot belongs to. Any list of the right length whose
    entries are all variables (or None) is taken, so optimizers with the same
    layout work without being listed here.
    """
    n = len(optimizer_trainable_variables(optimizer))
    found = []
    for name, value in vars(optimizer).items():
        if name in ("_trainable_variables", "_variables", "_tracker") or not isinstance(value, (list, tuple)):
            continue
        if len(value) != n or not value or not all(isinstance(v, (keras.Variable, type(None))) for v in value):
            continue
        found.append((name, list(value)))
    return found


def current_train_function(model):
    """The step function ``model.fit`` calls for the next batch.

    Why private: Keras offers no public hook to run a different compiled step
    for chosen batches; its TensorFlow trainer looks ``model.train_function``
    up before every step, so a callback can swap one in for a batch.
    """
    return model.train_function


def set_train_function(model, function):
    """Make ``model.fit`` call ``function`` for the following steps (see :func:`current_train_function`)."""
    model.train_function = function


def new_train_function(model):
    """A second step function of ``model`` (traced on its first call), leaving the current one in place.

    Why private: ``make_train_function(force=True)`` is the only way Keras
    builds a step function, and it installs it as ``model.train_function``.
    """
    current = model.train_function
    model.make_train_function(force=True)
    function = model.train_function
    model.train_function = current
    return function


def model_without_state_sync(callback):
    """The callback's model, without the JAX trainer's state sync.

    Why private: on JAX, ``Callback.model`` (public) copies every variable of
    the running ``fit`` back into the model (``jax_state_sync``) and makes the
    next step gather them again: some hundreds of assignments per batch, and
    the step's asynchronous dispatch lost (measured: RigL ``fit`` 2.3x dense on
    an H100 for ResNet50, with one update per 100 steps). Per-batch bookkeeping
    that reads no variable uses ``callback._model``; the update steps, which
    read and write variables, go through ``callback.model``.
    """
    return getattr(callback, "_model", None) or callback.model
