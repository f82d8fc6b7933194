"""Found by a probe with a store of 1,200 users in 10 domains. A domain taken out of
``domains`` (and SIGHUP) was no longer served, yet its users still logged in (SMTP AUTH
PLAIN and SCRAM, POP3) and could relay mail anywhere; and `user del`, `user passwd` and
`alias del` of its accounts said "not one of the local domains" for ever, so they could not
be removed without putting the domain back."""

from __future__ import annotations

import poplib

import pytest

from tests.conftest import ServerFactory, insecure
from tests.integration.test_cluster import login_ok
from tests.regress.test_certificate_reload import reload


def _pop_login(host: str, port: int, user: str, password: str) -> bool:
    pop = poplib.POP3(host, port, timeout=20)
    try:
        pop.stls(context=insecure())
        pop.user(user)
        pop.pass_(password)
        return True
    except poplib.error_proto:
        return False
    finally:
        pop.close()


def test_users_of_a_retired_domain_log_in_no_more_and_can_be_deleted(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(domains=["a.test", "b.test"], services=("submission", "pop3"))
    srv.add_user("ann@a.test", "ann-pw")
    srv.add_user("bob@b.test", "bob-pw")
    srv.cli("alias", "add", "team@b.test", "bob@b.test")
    pop = srv.ports["pop3"]
    assert login_ok(srv, "bob@b.test", "bob-pw")
    srv.config.write_text(srv.config.read_text().replace('"a.test", "b.test"', '"a.test"'))
    reload(srv, 1)
    assert not login_ok(srv, "bob@b.test", "bob-pw")
    assert not _pop_login(srv.host, pop, "bob@b.test", "bob-pw")
    assert login_ok(srv, "ann@a.test", "ann-pw")
    assert _pop_login(srv.host, pop, "ann@a.test", "ann-pw")
    srv.cli("user", "passwd", "bob@b.test", "--password-stdin", "--allow-short", stdin="new\n")
    assert (
        "removed bob@b.test from alias team@b.test" in srv.cli("user", "del", "bob@b.test").stdout
    )
    assert srv.cli("user", "list").stdout.split() == ["ann@a.test"]
    for argv in (("user", "del", "nobody@b.test"), ("alias", "del", "team@b.test")):
        p = srv.cli(*argv, check=False)
        assert p.returncode == 1 and "no such" in p.stderr, (argv, p.stderr)
    p = srv.cli(
        "user", "add", "carl@b.test", "--password-stdin", stdin="long-password\n", check=False
    )
    assert p.returncode == 1 and "not one of the local domains" in p.stderr


@pytest.mark.parametrize("text", ["team@b.test", "@b.test"])
def test_aliases_of_a_retired_domain_can_be_deleted(
    server_factory: ServerFactory, text: str
) -> None:
    srv = server_factory(domains=["a.test", "b.test"], services=("smtp",))
    srv.add_user("ann@a.test")
    srv.cli("alias", "add", text, "ann@a.test")
    srv.config.write_text(srv.config.read_text().replace('"a.test", "b.test"', '"a.test"'))
    srv.cli("alias", "del", text)
    assert srv.cli("alias", "list").stdout == ""
