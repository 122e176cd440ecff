"""The research harness of ft_keras: what the experiments of the FreeTickets comparison use
around the sparse-training core.

* `data`: data sets as ``tf.data`` pipelines and numpy arrays (Fashion-MNIST, CIFAR, ...);
* `models`: the reference architectures (LeNet-300-100, small CNNs, ResNets);
* `metrics` (numpy) and `keras_metrics` (streaming Keras metrics): accuracy, NLL, ECE, Brier,
  diversity, out-of-distribution detection;
* `corruptions`: corrupted test sets;
* `evaluation`: the evaluation suite of an ensemble;
* `recipes`: every method of the comparison as one function (`ftk.train_edst`, ...);
* `compiling`: how the recipes compile their models (`make_compile_fn`, ...);
* `training_cost`: the training cost of the runs the recipes make.

The core (``ft_keras.layers``, ``masks``, ``sparsify``, ``training``, ``free_tickets``,
``tickets``, ``ensemble``, ``export``, ...) never imports this package
(tests/test_import_graph.py checks it). ``import ft_keras`` loads these modules on first use, as
``ftk.data``, ``ftk.recipes`` etc.
"""
