"""Data: in-memory datasets (digits, Fashion-MNIST, text corpora), validation hold-outs,
and tf.data pipelines for tfds datasets with the reference's image transforms."""
