"""TensorBoard logging of mask updates: the one module that calls ``tf.summary``.

Imported lazily by the callbacks (only when ``log_dir`` is given), so the
callbacks themselves import no TensorFlow.
"""

from __future__ import annotations


class UpdateWriter:
    """Writes per-weight sparsity and connections moved at each mask update under ``log_dir``."""

    def __init__(self, log_dir):
        import tensorflow as tf

        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(log_dir))

    def write(self, step, rows):
        """``rows``: the callback's update rows (dicts with layer, weight, sparsity, n_moved)."""
        if not rows:
            return
        tf = self._tf
        with self._writer.as_default(step=int(step)):
            for row in rows:
                tag = f"{row['layer']}/{row['weight']}"
                tf.summary.scalar(f"sparsity/{tag}", row["sparsity"])
                tf.summary.scalar(f"moved/{tag}", row["n_moved"])
        self._writer.flush()

    def close(self):
        self._writer.close()
