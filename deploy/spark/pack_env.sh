#!/usr/bin/env bash
# Pack the environment Spark executors run the project in (YARN, standalone, Dataproc):
# a virtualenv with the project's wheel and its pinned dependencies, packed with venv-pack.
#
#   deploy/spark/pack_env.sh [OUT.tar.gz]        (default dist/cbir-env.tar.gz)
#   gsutil cp dist/cbir-env.tar.gz gs://BUCKET/cbir/    # then [spark] env_archive = that URI
#
# Spark unpacks it as ./environment in every container (--archives ENV#environment) and runs
# ./environment/bin/python. A venv refers to the Python it was made from: build it on the same
# OS image and Python 3.11 as the cluster's nodes (e.g. in a Dataproc 2.3 node or its image).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-dist/cbir-env.tar.gz}
PYTHON=${PYTHON:-python3}
ENV_DIR=build/cbir-env

rm -rf "$ENV_DIR" && mkdir -p dist "$(dirname "$OUT")"
"$PYTHON" -m venv "$ENV_DIR"
"$ENV_DIR/bin/pip" install --quiet --upgrade pip wheel venv-pack
"$ENV_DIR/bin/pip" wheel --quiet --no-deps --wheel-dir dist .
"$ENV_DIR/bin/pip" install --quiet -c requirements/constraints.txt dist/cbir_retrieval-*.whl
"$ENV_DIR/bin/python" -c "import pipelines.runners.spark, pipelines.submit.driver, retrieval.descriptors.gem"
"$ENV_DIR/bin/venv-pack" --prefix "$ENV_DIR" --output "$OUT" --force
echo "packed: $OUT"
