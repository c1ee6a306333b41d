"""``summary.json``: what a stage consumed and produced. The numbers must add up.

A summary records where a stage read and wrote (``input``, ``corpus``, folders): every string in
it is masked on the way (``retrieval.redaction``), so no stage has to remember to.
"""

from __future__ import annotations

from typing import Any

from retrieval import storage
from retrieval.manifests import utc_now
from retrieval.redaction import redact


class AccountingError(RuntimeError):
    """inputs != indexed + failed: something was lost or counted twice."""


def write_summary(
    directory: str,
    stage: str,
    *,
    inputs: int,
    indexed: int,
    failed: int,
    timings: dict[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    if inputs != indexed + failed:
        raise AccountingError(f"{stage}: {inputs} inputs but {indexed} indexed + {failed} failed")
    summary = {
        "stage": stage,
        "inputs": inputs,
        "indexed": indexed,
        "failed": failed,
        "timings": {k: round(v, 3) for k, v in (timings or {}).items()},
        **_masked(extra),
        "created": utc_now(),
    }
    storage.write_json(storage.join(directory, "summary.json"), summary)
    return summary


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def format_accounting(summary: dict[str, Any]) -> str:
    return (
        f"{summary['stage']}: {summary['inputs']} inputs = {summary['indexed']} indexed "
        f"+ {summary['failed']} failed"
    )
