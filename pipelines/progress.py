"""A progress bar for work done in other processes: it counts committed shard manifests."""

from __future__ import annotations

import threading
from types import TracebackType

from tqdm import tqdm

from retrieval import storage
from retrieval.shard_manifests import MANIFEST_SUFFIX


class ShardProgress:
    """``with ShardProgress(output, total, "extract"):`` shows committed shards while work runs."""

    def __init__(
        self, output: str, total: int, desc: str, *, already: int = 0, interval_s: float = 1.0
    ):
        self._output, self._total, self._already = output, total, already
        self._bar = tqdm(total=total, desc=desc, unit="shard", initial=already, leave=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,), daemon=True)

    def _count(self) -> int:
        try:
            return len(storage.list_files(self._output, suffixes=[MANIFEST_SUFFIX]))
        except FileNotFoundError:
            return 0

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._bar.n = min(self._total, self._count())
            self._bar.refresh()

    def __enter__(self) -> ShardProgress:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._bar.n = min(self._total, self._count())
        self._bar.close()
