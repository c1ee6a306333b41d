"""``python -m pipelines.cli ...``, and the file Dataproc pyspark jobs run: ``retrieval``."""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
