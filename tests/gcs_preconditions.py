"""``gcp-storage-emulator`` with GCS's create-only-if-absent precondition.

The emulator accepts ``ifGenerationMatch=0`` on uploads but ignores it (it overwrites), while
GCS answers ``412 Precondition Failed`` when the object exists; that answer is what the leases
(``retrieval/leases.py``) rely on. This launcher adds exactly that check to the emulator's
upload handlers, then starts it as its own command line does (same arguments)::

    python tests/gcs_preconditions.py start --host 127.0.0.1 --port P --default-bucket B ...
"""

from __future__ import annotations

import sys
from http import HTTPStatus
from typing import Any

from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _object_name(request: Any) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data if isinstance(request.data, dict) else {}
    return (data.get("meta") or data).get("name")


def _with_precondition(upload: Any) -> Any:
    def checked(request: Any, response: Any, storage: Any) -> Any:
        wanted = request.query.get("ifGenerationMatch")
        if wanted and wanted[0] == "0":
            try:
                storage.get_file_obj(request.params["bucket_name"], _object_name(request))
            except NotFound:
                pass
            else:  # what GCS answers: the object exists, so generation 0 does not match
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json(
                    {
                        "error": {
                            "code": 412,
                            "message": "At least one of the pre-conditions you specified "
                            "did not hold.",
                            "errors": [{"reason": "conditionNotMet"}],
                        }
                    }
                )
                return None
        return upload(request, response, storage)

    return checked


# The upload handlers look these up as module globals on each request.
for _name in ("_media_upload", "_multipart_upload", "_create_resumable_upload"):
    setattr(objects, _name, _with_precondition(getattr(objects, _name)))

if __name__ == "__main__":
    main(sys.argv[1:])
