"""Host names as DNS and the Host header carry them: UTS #46 processing, as browsers do.

Python's ``"idna"`` codec implements IDNA 2003, which maps the deviation characters away:
``faß.de`` becomes ``fass.de`` and ``ς`` becomes ``σ``. Browsers follow the WHATWG URL standard
(UTS #46, non-transitional) and visit ``xn--fa-hia.de``, another registrant's domain, so a post
that names ``faß.de`` would be fetched from a host its author never meant. This module maps
non-ASCII names the browsers' way; ASCII names only have their case folded (``my_host`` and
other names DNS serves but IDNA 2008 refuses stay as they are).
"""

from __future__ import annotations

import idna

MAX_LABEL = 63  # octets, RFC 1035
MAX_NAME = 253  # octets, without the root's trailing dot


def ascii_host(host: str) -> str:
    """``host`` (no trailing dot) in lower-case ASCII; ValueError naming why it has none."""
    if host.isascii():
        mapped = host.lower()
    else:
        try:  # UTS #46 mapping: case folding, width folding, NFC; refuses disallowed characters
            mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(str(exc)) from None
    labels = []
    for label in mapped.split("."):
        if not label.isascii():
            label = "xn--" + label.encode("punycode").decode("ascii")
        if not label or len(label) > MAX_LABEL:
            raise ValueError(f"label empty or over {MAX_LABEL} characters in {host!r}")
        labels.append(label)
    name = ".".join(labels)
    if len(name) > MAX_NAME:
        raise ValueError(f"host name over {MAX_NAME} characters")
    return name
