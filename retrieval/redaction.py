"""Keeping secrets out of logs, error rows, reports and recorded settings.

URIs can carry credentials (``https://user:password@host/...``) or signatures
(``...?X-Amz-Signature=...``, ``X-Goog-Credential``, SAS ``sig=``); pipeline options can carry
keys and tokens (``--aws_secret_access_key=...``). Everything the project writes for people to
read goes through :func:`redact` (or :func:`redact_args` for option lists) first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"

# scheme://user:password@host -> scheme://***@host (also a bare user or token before '@').
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@?#]+)@")
# Query parameters that sign or authorise a request.
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|signature|sig|token|access_token|id_token|api[_-]?key|key|"
    r"awsaccesskeyid|password|secret|client_secret|code)=)(?P<value>[^&#\s\"']*)",
    re.IGNORECASE,
)
# Option or setting names whose values are secrets.
_SECRET_NAME = re.compile(
    r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key|private[_-]?key|"
    r"\bkey\b|_key\b|signature|auth)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with URI credentials and signing query parameters replaced by ``***``."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", text)
    return _SECRET_PARAM.sub(lambda m: m["key"] + MASK, text)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_args(args: Iterable[str]) -> list[str]:
    """Command-line options with secret-looking values masked.

    ``--aws_secret_access_key=abc`` -> ``--aws_secret_access_key=***``; in the two-token form
    (``--service_account_key_file PATH``... any secret-named flag) the value after it is masked.
    """
    out: list[str] = []
    mask_next = False
    for arg in args:
        if mask_next and not arg.startswith("--"):
            out.append(MASK)
            mask_next = False
            continue
        mask_next = False
        if arg.startswith("-"):
            name, eq, _ = arg.partition("=")
            if is_secret_name(name):
                if eq:
                    out.append(f"{name}={MASK}")
                else:
                    out.append(arg)
                    mask_next = True
                continue
        out.append(redact(arg))
    return out
