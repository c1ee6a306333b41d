"""Runner-agnostic core of the CBIR pipeline (see DESIGN.md)."""

import os

# faiss (and the OpenBLAS inside its wheel) runs on OpenMP. By default a waiting OpenMP thread
# spins: on a machine whose cores other processes share (a laptop, a shared VM, a worker running
# several tasks), a spinning thread waits for one that is descheduled, in every one of the many
# small parallel regions of k-means / PQ training. Measured on a shared 2-core machine: OPQ
# training 235 s with spinning threads, 29 s with sleeping ones (benchmarks/codebook_training.py,
# README). It must be set before libgomp loads, i.e. before faiss is first imported; a value
# the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# TensorFlow logs a few lines at import before it reads TF_CPP_MIN_LOG_LEVEL; hold them to it in
# every process that imports TensorFlow through this package (see native_logs.py).
from retrieval.native_logs import filter_tensorflow_import

filter_tensorflow_import()
