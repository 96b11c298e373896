"""Webhook target checks (optiscope_server.alerting.targets) against real sockets on 127.0.0.1: which
addresses are refused, that the checked address is the one connected to, that redirects are not
followed, that a silent receiver times out, and that HTTPS verifies the URL's hostname."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time

import pytest

from optiscope_server.alerting.targets import TargetRefused, post, resolve

from conftest import need_tool


def reason(url: str, **kw) -> str:
    with pytest.raises(TargetRefused) as e:
        resolve(url, **kw)
    return e.value.reason


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "[::1]",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "[fe80::1]",
        "0.0.0.0",
        "[::]",
        "[::ffff:127.0.0.1]",
        "[::ffff:10.0.0.1]",
        "224.0.0.1",
        "[ff02::1]",
        "255.255.255.255",
        "240.0.0.1",
        "[fc00::1]",
        "localhost",
        "2130706433",
        "0x7f.1",  # other spellings of 127.0.0.1 the resolver accepts
        "[64:ff9b::7f00:1]",
        "[2002:a01:203::]",  # NAT64 of 127.0.0.1, 6to4 of 10.1.2.3
    ],
)
def test_internal_addresses_are_refused(host):
    assert reason(f"http://{host}:8080/hook") == "internal_address"


@pytest.mark.parametrize("host", ["169.254.169.254", "[fd00:ec2::254]", "100.100.100.200", "[::ffff:169.254.169.254]"])
def test_metadata_addresses_are_refused_even_when_internal_is_allowed(host):
    assert reason(f"http://{host}/latest/meta-data/") == "metadata"
    assert reason(f"http://{host}/latest/meta-data/", allow_internal=True) == "metadata"


@pytest.mark.parametrize("host", ["metadata.google.internal", "METADATA.Google.Internal.", "metadata"])
def test_metadata_names_are_refused_before_resolving(host):
    # these do not resolve here; refused by name, not as unresolvable
    assert reason(f"http://{host}/computeMetadata/v1/", allow_internal=True) == "metadata"


@pytest.mark.parametrize(
    "host", ["8.8.8.8", "93.184.215.14", "[2606:4700:4700::1111]", "[::ffff:8.8.8.8]", "[64:ff9b::808:808]"]
)
def test_public_addresses_are_accepted(host):
    t = resolve(f"https://{host}/hook?x=1")  # resolve only: nothing is sent
    assert (t.scheme, t.port, t.path) == ("https", 443, "/hook?x=1")
    assert len(t.addresses) == 1


def test_allow_internal_allows_loopback():
    t = resolve("http://127.0.0.1:9/x", allow_internal=True)
    assert (t.host, t.port, t.addresses) == ("127.0.0.1", 9, ["127.0.0.1"])


@pytest.mark.parametrize(
    "url,why",
    [
        ("file:///etc/passwd", "bad_scheme"),
        ("ftp://8.8.8.8/", "bad_scheme"),
        ("gopher://8.8.8.8:70/_x", "bad_scheme"),
        ("8.8.8.8/hook", "bad_scheme"),
        ("http:///hook", "no_host"),
        ("http://:80/hook", "no_host"),
        ("http://nonexistent.invalid/hook", "unresolvable"),
        ("http://8.8.8.8:99999/", "bad_port"),
        ("http://8.8.8.8:http/", "bad_port"),
        ("http://user:pw@8.8.8.8/", "userinfo"),
        ("http://8.8.8.8@127.0.0.1/", "userinfo"),
    ],
)
def test_malformed_targets_are_refused_with_a_reason(url, why):
    assert reason(url, allow_internal=True) == why


def test_refusal_message_names_host_and_address():
    with pytest.raises(TargetRefused, match=r"'localhost' resolves to (127\.0\.0\.1|::1)"):
        resolve("http://localhost/")


# --- sending, against real local servers ----------------------------------------------------
# (http_receiver: conftest's factory of tests/http_receiver.py servers on 127.0.0.1, closed after each test)


@pytest.fixture
def listener():
    """A bare listening socket: it tells whether anything connected, and never answers."""
    s = socket.create_server(("127.0.0.1", 0))
    s.settimeout(0.3)
    yield s
    s.close()


def nothing_connected(s: socket.socket) -> bool:
    try:
        s.accept()[0].close()
    except TimeoutError:
        return True
    return False


def test_post_delivers_body_and_headers(http_receiver):
    r = http_receiver(status=202)
    status, err = post(
        f"http://127.0.0.1:{r.port}/hook?a=1",
        b'{"x": 1}',
        {"Content-Type": "application/json", "X-Sig": "abc"},
        timeout=5,
        allow_internal=True,
    )
    assert (status, err) == (202, None)
    [req] = r.requests
    assert req.method == "POST" and req.path == "/hook?a=1" and req.body == b'{"x": 1}'
    assert req.headers["host"] == f"127.0.0.1:{r.port}"
    assert req.headers["x-sig"] == "abc" and req.headers["content-type"] == "application/json"


def test_post_by_name_sends_the_name_as_host(http_receiver):
    r = http_receiver(status=204)
    assert post(f"http://localhost:{r.port}/h", b"", {}, timeout=5, allow_internal=True) == (204, None)
    assert r.requests[0].headers["host"] == f"localhost:{r.port}"


def test_post_to_internal_target_sends_nothing(listener):
    port = listener.getsockname()[1]
    status, err = post(f"http://127.0.0.1:{port}/hook", b"{}", {}, timeout=5)
    assert status is None and err.startswith("internal_address: ")
    assert nothing_connected(listener)


def test_post_refusal_starts_with_reason():
    status, err = post("file:///etc/passwd", b"", {}, timeout=1)
    assert status is None and err.startswith("bad_scheme: ")


def test_redirect_is_returned_not_followed(http_receiver, listener):
    second = listener.getsockname()[1]
    r = http_receiver(status=302, reply_headers={"Location": f"http://127.0.0.1:{second}/elsewhere"})
    assert post(f"http://127.0.0.1:{r.port}/hook", b"{}", {}, timeout=5, allow_internal=True) == (302, None)
    assert len(r.requests) == 1
    assert nothing_connected(listener)


def test_silent_receiver_times_out(listener):
    port = listener.getsockname()[1]  # the kernel completes the connection; nobody ever answers
    t0 = time.monotonic()
    status, err = post(f"http://127.0.0.1:{port}/hook", b"{}", {}, timeout=0.5, allow_internal=True)
    elapsed = time.monotonic() - t0
    assert status is None and err.startswith("timeout: "), err
    assert 0.4 < elapsed < 2.0


def test_endless_answer_is_cut_off(listener):
    # a receiver that answers 200 and then keeps sending the body one byte at a time (for 5 s,
    # so that a client without the bound fails this test instead of hanging it)
    port, stop = listener.getsockname()[1], threading.Event()
    give_up = time.monotonic() + 5

    def drip():
        listener.settimeout(5)
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            while not stop.wait(0.02) and time.monotonic() < give_up:
                try:
                    conn.sendall(b"x")
                except OSError:
                    return

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        assert post(f"http://127.0.0.1:{port}/", b"{}", {}, timeout=0.5, allow_internal=True) == (200, None)
        assert time.monotonic() - t0 < 2.0
    finally:
        stop.set()
        t.join(5)


def test_header_injection_is_refused(http_receiver):
    r = http_receiver(status=204)
    status, err = post(
        f"http://127.0.0.1:{r.port}/", b"", {"X-A": "1\r\nX-Injected: 2"}, timeout=5, allow_internal=True
    )
    assert status is None and err.startswith("bad_request: ")
    assert r.requests == []


@pytest.fixture
def fake_names(monkeypatch):
    """Names under .test answer what the test says, call by call; other names resolve for real.
    Used only for what a real resolver here cannot be made to do: answer a name with several
    chosen addresses, or change its answer between two lookups (DNS rebinding)."""
    real = socket.getaddrinfo
    answers: dict[str, list[list[str]]] = {}
    lookups: list[str] = []

    def getaddrinfo(host, port, *args, **kw):
        if not (isinstance(host, str) and host.endswith(".test")):
            return real(host, port, *args, **kw)
        lookups.append(host)
        queue = answers[host]
        ips = queue.pop(0) if len(queue) > 1 else queue[0]
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, lookups


def test_any_internal_address_refuses_the_name(fake_names):
    answers, _ = fake_names
    answers["mixed.test"] = [["8.8.8.8", "10.0.0.5"]]
    with pytest.raises(TargetRefused, match=r"'mixed.test' resolves to 10\.0\.0\.5") as e:
        resolve("https://mixed.test/hook")
    assert e.value.reason == "internal_address"


def test_connection_goes_to_the_checked_address(http_receiver, fake_names):
    r = http_receiver(status=204)
    answers, lookups = fake_names
    # checked: 127.0.0.1; any later lookup: TEST-NET-1, which never answers
    answers["rebind.test"] = [["127.0.0.1"], ["192.0.2.1"]]
    assert post(f"http://rebind.test:{r.port}/h", b"x", {}, timeout=2, allow_internal=True) == (204, None)
    assert lookups == ["rebind.test"]
    assert r.requests[0].headers["host"] == f"rebind.test:{r.port}"


def test_next_checked_address_is_tried_when_one_refuses(http_receiver, fake_names):
    r = http_receiver(status=204)  # listens on 127.0.0.1 only, so 127.0.0.2 refuses the connection
    answers, _ = fake_names
    answers["two.test"] = [["127.0.0.2", "127.0.0.1"]]
    assert post(f"http://two.test:{r.port}/h", b"x", {}, timeout=2, allow_internal=True) == (204, None)
    assert len(r.requests) == 1


# --- HTTPS: the certificate is checked against the URL's hostname ------------------------------


@pytest.fixture
def tls_receiver(http_receiver, tmp_path):
    openssl = need_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return http_receiver(status=204, tls=ctx), cert


def test_https_refuses_an_untrusted_certificate(tls_receiver):
    r, _ = tls_receiver
    status, err = post(f"https://localhost:{r.port}/h", b"{}", {}, timeout=5, allow_internal=True)
    assert status is None and err.startswith("tls: ") and "CERTIFICATE_VERIFY_FAILED" in err, err
    assert r.requests == []


def test_https_verifies_the_hostname_not_the_address(tls_receiver, monkeypatch):
    r, cert = tls_receiver
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust this one certificate, read per context
    # connected to 127.0.0.1, verified as "localhost": accepted
    assert post(f"https://localhost:{r.port}/h", b"{}", {}, timeout=5, allow_internal=True) == (204, None)
    # the same server by address: the certificate names only localhost, so refused
    status, err = post(f"https://127.0.0.1:{r.port}/h", b"{}", {}, timeout=5, allow_internal=True)
    assert status is None and err.startswith("tls: ") and "mismatch" in err.lower(), err
    assert len(r.requests) == 1
