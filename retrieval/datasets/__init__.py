"""The field's standard benchmarks: what they are (``registry``), how to download and unpack
them (``fetch``), and how to read their ground-truth formats into the project's gt.json
(``formats``)."""
