"""Evaluation protocols: how one benchmark's ground truth becomes what a query is scored on.

The Revisited Oxford/Paris protocols (Radenović et al., CVPR 2018; ``example_evaluate.py`` in
filipradenovic/revisitop) derive three setups from each query's easy / hard / junk lists:

- Easy:   positives = easy;         junk = junk + hard
- Medium: positives = easy + hard;  junk = junk
- Hard:   positives = hard;         junk = junk + easy

and report mAP (junk removed from the ranking) and mP@k with revisitop's own definition
(``metrics.revisitop_precision_at_k``). Queries with no positives in a setup are left out of
its means, as there.

``default`` is the benchmark as its gt.json states it.
"""

from __future__ import annotations

from dataclasses import replace

from retrieval.evaluation.ground_truth import Benchmark, Query

REVISITED_SETUPS = ("easy", "medium", "hard")
DEFAULT = "default"


def expand(names: str | None) -> list[str]:
    """A comma-separated ``--protocol`` value as a list of canonical protocol names.

    ``roxford`` / ``rparis`` / ``revisited`` mean all three setups; ``roxford-hard`` is
    ``revisited-hard`` (the dataset prefix only documents which set it is meant for).
    """
    if not names:
        return [DEFAULT]
    out: list[str] = []
    for raw in names.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        family, _, setup = name.partition("-")
        if name == DEFAULT:
            out.append(DEFAULT)
        elif family in ("roxford", "rparis", "revisited", "roxford5k", "rparis6k"):
            if not setup:
                out += [f"revisited-{s}" for s in REVISITED_SETUPS]
            elif setup in REVISITED_SETUPS:
                out.append(f"revisited-{setup}")
            else:
                raise ValueError(f"unknown Revisited setup {setup!r} (easy, medium or hard)")
        else:
            raise ValueError(
                f"unknown protocol {raw.strip()!r}: default, roxford|rparis[-easy|-medium|-hard]"
            )
    return list(dict.fromkeys(out))


def label(protocol: str) -> str:
    """Short label for a result row: "E", "M", "H" for the Revisited setups."""
    if protocol.startswith("revisited-"):
        return protocol.removeprefix("revisited-")[0].upper()
    return protocol


def apply(benchmark: Benchmark, protocol: str) -> Benchmark:
    """The benchmark with each query's positives and junk as ``protocol`` defines them."""
    if protocol == DEFAULT:
        return benchmark
    setup = protocol.removeprefix("revisited-")
    if not protocol.startswith("revisited-") or setup not in REVISITED_SETUPS:
        raise ValueError(f"unknown protocol {protocol!r}")
    missing = [q.id for q in benchmark.queries if q.easy is None or q.hard is None]
    if missing:
        raise ValueError(
            f"protocol {protocol!r} needs Revisited ground truth (per-query 'easy' and 'hard' "
            f"lists, as `retrieval datasets fetch roxford5k` writes); benchmark "
            f"{benchmark.name!r} has none for {len(missing)} queries, e.g. {missing[0]!r}"
        )
    queries = [_revisited_query(q, setup) for q in benchmark.queries]
    return replace(benchmark, queries=queries, protocol=protocol)


def _revisited_query(query: Query, setup: str) -> Query:
    easy, hard = query.easy or frozenset(), query.hard or frozenset()
    # query.junk is the original junk list: Medium's junk, before any easy/hard moves in.
    if setup == "easy":
        positives, junk = easy, query.junk | hard
    elif setup == "medium":
        positives, junk = easy | hard, query.junk
    else:
        positives, junk = hard, query.junk | easy
    return replace(query, positives=positives, junk=junk)
