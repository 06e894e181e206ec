"""Host names to ASCII the browsers' way (UTS #46 non-transitional), a pure function."""

from __future__ import annotations

import pytest

from worker.host_names import ascii_host


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Example.COM", "example.com"),
        ("faß.de", "xn--fa-hia.de"),  # IDNA 2003: fass.de
        ("βόλος.com", "xn--nxasmm1c.com"),  # the UTS #46 conformance example for final sigma
        ("ＡＢＣ.com", "abc.com"),
        ("ex\u3002ample.com", "ex.ample.com"),  # an ideographic full stop separates labels
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("my_host.example", "my_host.example"),
    ],
)
def test_names_map_as_browsers_map_them(host: str, expected: str) -> None:
    assert ascii_host(host) == expected


@pytest.mark.parametrize(
    ("host", "needle"),
    [
        ("a..b", "empty"),
        ("x" * 64 + ".com", "over 63"),
        ("ü" * 60 + ".de", "over 63"),  # short in Unicode, over 63 once punycoded
        (".".join(["abcdefgh"] * 29), "over 253"),
        ("a\u00adb\ufffd.com", "not allowed"),  # U+FFFD is disallowed by UTS #46
    ],
)
def test_names_dns_cannot_carry_are_refused(host: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ascii_host(host)
