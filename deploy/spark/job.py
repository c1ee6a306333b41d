"""The Spark driver program of `retrieval submit --runner spark`: the whole indexing job.

    spark-submit [options] deploy/spark/job.py --input URI --output URI [--queries URI] [--config F]

Runs extract -> train -> index -> merge (and extract for --queries) with `--runner spark` inside
the SparkSession spark-submit started: extraction and index builds on the executors, codebook
training and the merge on the driver. The project must be importable on the driver and the
executors (the packed environment or the container image, see deploy/spark/README.md).
"""

import sys

from pipelines.submit.driver import main

if __name__ == "__main__":
    sys.exit(main())
