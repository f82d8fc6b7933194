"""An ``Authentication-Results`` field naming our authserv-id behind a nested comment
(``(a (b)) mx.a.test; dkim=pass``, RFC 5322 §3.2.2 comments nest) was not recognised as ours
and reached the mailbox beside the real one: a forgery RFC 8601 §5 says to remove."""

from __future__ import annotations

from postroom.auth import results


def test_a_nested_comment_before_our_authserv_id_is_skipped() -> None:
    forged = [
        b"Authentication-Results: (a (b)) mx.a.test; dkim=pass\r\n",
        b"Authentication-Results: (a (b (c)) d)\r\n\t(e) MX.A.TEST; dkim=pass\r\n",
        b"Authentication-Results: (a \\) b) mx.a.test; dkim=pass\r\n",
    ]
    kept = b"Authentication-Results: (mx.a.test) other.test; dkim=pass\r\n"
    msg = b"".join(forged) + kept + b"Subject: x\r\n\r\nbody\r\n"
    assert results.strip_ours(msg, "mx.a.test") == kept + b"Subject: x\r\n\r\nbody\r\n"
