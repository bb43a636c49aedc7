"""Tests for minimail: real servers on port 0, real clients, real files."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import select
import shutil
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest

import minimail

HERE = os.path.dirname(os.path.abspath(__file__))
MINIMAIL = os.path.join(HERE, "minimail.py")


# --- Helpers and fixtures -------------------------------------------------------

def wait_for(predicate, timeout=10.0, interval=0.01):
    """Poll predicate until it is true or the deadline passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def base_config(tmp_path, **overrides):
    fields = dict(domains=("example.test",), maildir=str(tmp_path / "maildir"),
                  smtp=("127.0.0.1", 0), hostname="mx.example.test", auth_failure_delay=0.01,
                  timeout=5.0)
    fields.update(overrides)
    return minimail.Config(**fields)


@contextlib.contextmanager
def running(config):
    app = minimail.App(config)
    app.start()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture
def make_server(tmp_path):
    """Start servers with Config overrides; all are stopped at teardown."""
    apps = []

    def start(**overrides):
        app = minimail.App(base_config(tmp_path, **overrides))
        app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


@pytest.fixture
def mail(make_server):
    return make_server()


def smtp_client(port, **kwargs):
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=5, **kwargs)


def delivered(app, mailbox):
    """Full paths of the files in a mailbox's new/ folder."""
    folder = os.path.join(app.maildir.root, mailbox, "new")
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder))


def read_stored(app, mailbox):
    files = delivered(app, mailbox)
    assert len(files) == 1, files
    with open(files[0], "rb") as file:
        return file.read()


def body_of(stored):
    """The message as received: the stored file without minimail's three trace headers."""
    lines = stored.split(b"\n")
    assert lines[0].startswith(b"Return-Path: ") and lines[1].startswith(b"Delivered-To: ")
    index = 3
    while lines[index].startswith(b"\t"):
        index += 1
    return b"\n".join(lines[index:])


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


class Raw:
    """A raw-socket SMTP/POP3 client for what smtplib cannot send."""

    def __init__(self, port, host="127.0.0.1", greeting=True):
        self.sock = socket.create_connection((host, port), timeout=5)
        self.buf = b""
        if greeting:
            self.greeting = self.read_reply()

    def send(self, data):
        self.sock.sendall(data)

    def read_line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed with %r pending" % self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def read_reply(self):
        """(code, [lines]) of one possibly multi-line SMTP reply."""
        lines = []
        while True:
            line = self.read_line()
            lines.append(line.rstrip(b"\r\n").decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def code(self):
        return self.read_reply()[0]

    def command(self, line):
        self.send(line + b"\r\n")
        return self.read_reply()

    def closed(self):
        """True when the server has closed the connection (after any pending data)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def transaction(client, sender=b"a@sender.test", rcpts=(b"user@example.test",)):
    assert client.command(b"EHLO client.test")[0] == 250
    assert client.command(b"MAIL FROM:<" + sender + b">")[0] == 250
    for rcpt in rcpts:
        assert client.command(b"RCPT TO:<" + rcpt + b">")[0] == 250


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate and key made with the openssl command."""
    if not shutil.which("openssl"):
        pytest.skip("openssl command not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.example.test", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def client_tls_context():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- Config and helpers ---------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("1025", ("127.0.0.1", 1025)), ("0.0.0.0:25", ("0.0.0.0", 25)),
    ("[::1]:2525", ("::1", 2525)), ("localhost:0", ("localhost", 0)), ("off", None)])
def test_config_parse_addr(text, expected):
    assert minimail.parse_addr(text) == expected


@pytest.mark.parametrize("text", ["", "host:", ":25", "[::1]", "x:99999", "a:b"])
def test_config_parse_addr_rejects(text):
    with pytest.raises(ValueError):
        minimail.parse_addr(text)


@pytest.mark.parametrize("text, seconds", [
    ("300", 300), ("300s", 300), ("0.5s", 0.5), ("5m", 300), ("2h", 7200), ("5d", 432000),
    ("1.5d", 129600)])
def test_config_parse_time(text, seconds):
    assert minimail.parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5x", "-1", "nan", "inf"])
def test_config_parse_time_rejects(text):
    with pytest.raises(ValueError):
        minimail.parse_time(text)


def test_config_users_file(tmp_path):
    path = tmp_path / "users"
    path.write_text("# accounts\n\nAlice@Example.TEST:se:cret\n  bob@example.test:pw  \n")
    assert minimail.read_users_file(str(path)) == [
        ("alice@example.test", "se:cret"), ("bob@example.test", "pw")]
    path.write_text("nobody-without-password\n")
    with pytest.raises(ValueError, match="line 1"):
        minimail.read_users_file(str(path))


@pytest.mark.parametrize("address, folder", [
    ("User@Example.TEST", "user@example.test"),
    ('"john doe"@example.test', "john doe@example.test"),
    ('"a\\"b"@example.test', 'a"b@example.test'),
    ("Ünïcode@Bücher.example", "ünïcode@xn--bcher-kva.example"),
])
def test_address_mailbox_name(address, folder):
    assert minimail.mailbox_name(address) == folder


@pytest.mark.parametrize("folder, safe", [
    ("user@example.test", True), ("a/b@example.test", False), ("a\\b@example.test", False),
    (".hidden@example.test", False), ("..@example.test", False), (".@example.test", False),
    ("a\x01b@example.test", False), ("x" * 250 + "@example.test", False),
    ("a.b@example.test", True)])
def test_address_safe_folder(folder, safe):
    assert minimail.is_safe_folder(folder) is safe


def test_message_ids_unique_across_threads():
    ids = minimail.MessageIds("host/with:odd,chars")
    seen = []

    def make():
        seen.extend(ids.new() for _ in range(2000))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 8000
    assert all("/" not in mid and ":" not in mid and "," not in mid for mid in seen)
    assert minimail.message_id_of(seen[0] + ",S=12:2,S") == seen[0]


def test_rfc5322_date_has_numeric_zone():
    date = minimail.rfc5322_date(0)
    assert date.split()[-1][0] in "+-" and len(date.split()[-1]) == 5
    assert date.split()[3] in ("1969", "1970")


# --- SMTP: the normal path --------------------------------------------------------

def test_smtp_delivers_to_maildir(mail):
    message = b"From: a@sender.test\r\nTo: user@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"
    with smtp_client(mail.smtp_port) as client:
        client.sendmail("a@sender.test", ["User@Example.test"], message)
    stored = read_stored(mail, "user@example.test")
    lines = stored.split(b"\n")
    assert lines[0] == b"Return-Path: <a@sender.test>"
    assert lines[1] == b"Delivered-To: user@example.test"
    assert lines[2].startswith(b"Received: from client.test ([127.0.0.1])")
    assert b"by mx.example.test (minimail) with ESMTP id " in stored
    assert b"for <user@example.test>;" in stored
    assert body_of(stored) == message.replace(b"\r\n", b"\n")
    assert b"\r" not in stored
    assert os.listdir(os.path.join(mail.maildir.root, "user@example.test", "tmp")) == []


def test_smtp_file_name_carries_id_and_sizes(mail):
    with smtp_client(mail.smtp_port) as client:
        client.ehlo()
        client.mail("a@sender.test")
        client.rcpt("user@example.test")
        code, text = client.data(b"Subject: x\r\n\r\nline\r\n")
    assert code == 250
    path = delivered(mail, "user@example.test")[0]
    name = os.path.basename(path)
    message_id = minimail.message_id_of(name)
    assert text.decode().endswith(message_id)
    with open(path, "rb") as file:
        data = file.read()
    assert name == "%s,S=%d,W=%d" % (message_id, len(data), len(data) + data.count(b"\n"))
    assert ("id %s" % message_id).encode() in data


def test_smtp_multiple_recipients_one_copy_each(mail):
    with smtp_client(mail.smtp_port) as client:
        refused = client.sendmail("a@sender.test", ["one@example.test", "two@example.test",
                                                    "ONE@example.test"], b"Subject: x\r\n\r\nbody\r\n")
    assert refused == {}
    one, two = read_stored(mail, "one@example.test"), read_stored(mail, "two@example.test")
    assert b"Delivered-To: one@example.test\n" in one and b"for <one@example.test>" in one
    assert b"Delivered-To: two@example.test\n" in two and b"for <two@example.test>" in two
    assert body_of(one) == body_of(two) == b"Subject: x\n\nbody\n"
    assert (minimail.message_id_of(os.path.basename(delivered(mail, "one@example.test")[0]))
            == minimail.message_id_of(os.path.basename(delivered(mail, "two@example.test")[0])))


def test_smtp_null_sender_and_postmaster(mail):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"EHLO client.test")[0] == 250
        assert client.command(b"MAIL FROM:<>")[0] == 250
        assert client.command(b"RCPT TO:<Postmaster>")[0] == 250
        assert client.command(b"DATA")[0] == 354
        assert client.command(b"Subject: bounce\r\n\r\nx\r\n.")[0] == 250
    assert read_stored(mail, "postmaster@example.test").startswith(b"Return-Path: <>\n")


def test_smtp_dot_stuffing_removed(mail):
    with Raw(mail.smtp_port) as client:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        client.send(b"..first\r\nmiddle\r\n..\r\n...three\r\n.x\r\n.\r\n")
        assert client.code() == 250
    assert body_of(read_stored(mail, "user@example.test")) == b".first\nmiddle\n.\n..three\nx\n"


def test_smtp_empty_message(mail):
    with Raw(mail.smtp_port) as client:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        assert client.command(b".")[0] == 250
    assert body_of(read_stored(mail, "user@example.test")) == b""


def test_smtp_pipelining(mail):
    with Raw(mail.smtp_port) as client:
        client.send(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.test>\r\n"
                    b"RCPT TO:<y@other.test>\r\nRCPT TO:<z@example.test>\r\nDATA\r\n")
        assert [client.code() for _ in range(6)] == [250, 250, 250, 554, 250, 354]
        client.send(b"Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<b@sender.test>\r\n"
                    b"RCPT TO:<x@example.test>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n")
        assert [client.code() for _ in range(5)] == [250, 250, 250, 354, 250]
        assert client.code() == 221
    assert len(delivered(mail, "x@example.test")) == 2
    assert len(delivered(mail, "z@example.test")) == 1


def test_smtp_ehlo_lists_extensions(mail):
    with smtp_client(mail.smtp_port) as client:
        code, _ = client.ehlo()
        assert code == 250
        for name in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes",
                     "chunking", "auth"):
            assert client.has_extn(name), name
        assert client.esmtp_features["size"] == str(26214400)
        assert "PLAIN" in client.esmtp_features["auth"] and "LOGIN" in client.esmtp_features["auth"]
        assert not client.has_extn("starttls")


def test_smtp_enhanced_status_codes_on_every_reply(mail):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"EHLO client.test")[0] == 250
        for line in (b"NOOP", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<u@example.test>", b"RSET",
                     b"VRFY u", b"EXPN list", b"BOGUS", b"RCPT TO:<u@example.test>",
                     b"MAIL FROM:bad address here", b"HELP"):
            code, lines = client.command(line)
            for text in lines:
                status = text[4:].split(" ")[0]
                assert status.count(".") == 2 and status[0] == str(code)[0], (line, text)
        assert client.command(b"DATA")[0] == 503
        assert client.command(b"QUIT") == (221, ["221 2.0.0 Bye"])


def test_smtp_helo_and_other_verbs(mail):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"MAIL FROM:<a@sender.test>")[0] == 503
        assert client.command(b"HELO")[0] == 501
        assert client.command(b"HELO client.test") == (250, ["250 mx.example.test Hello client.test"])
        assert client.command(b"NOOP")[0] == 250
        assert client.command(b"VRFY someone")[0] == 252
        assert client.command(b"HELP")[0] == 214
        assert client.command(b"MAIL FROM:<a@sender.test>")[0] == 250
        assert client.command(b"MAIL FROM:<a@sender.test>")[0] == 503
        assert client.command(b"RSET")[0] == 250
        assert client.command(b"RCPT TO:<u@example.test>")[0] == 503
        assert client.command(b"DATA")[0] == 503
        assert client.command(b"QUIT")[0] == 221
        assert client.closed()


def test_smtp_helo_session_uses_smtp_protocol_name(mail):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"HELO client.test")[0] == 250
        assert client.command(b"MAIL FROM:<a@sender.test>")[0] == 250
        assert client.command(b"RCPT TO:<u@example.test>")[0] == 250
        assert client.command(b"DATA")[0] == 354
        assert client.command(b"x\r\n.")[0] == 250
    assert b" with SMTP id " in read_stored(mail, "u@example.test")


def test_smtp_help_comes_from_docstrings(mail):
    with Raw(mail.smtp_port) as client:
        code, lines = client.command(b"HELP")
    assert code == 214
    text = "\n".join(lines)
    for verb in ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY",
                 "AUTH", "STARTTLS"):
        assert "2.0.0 " + verb in text


# --- SMTP: recipient policy ---------------------------------------------------------

def test_smtp_relay_denied_for_other_domains(mail):
    with Raw(mail.smtp_port) as client:
        transaction(client, rcpts=())
        assert client.command(b"RCPT TO:<someone@elsewhere.test>")[:1] == (554,)
        assert client.command(b"RCPT TO:<someone@elsewhere.test>")[1][0].startswith("554 5.7.1")
        assert client.command(b"DATA")[0] == 554
    assert all_files(mail.maildir.root) == []


def test_smtp_catch_all_stores_every_domain(make_server):
    app = make_server(catch_all=True)
    with smtp_client(app.smtp_port) as client:
        client.sendmail("a@sender.test", ["Someone@Elsewhere.TEST"], b"Subject: c\r\n\r\nx\r\n")
    assert b"Delivered-To: someone@elsewhere.test" in read_stored(app, "someone@elsewhere.test")


def test_smtp_accounts_restrict_local_recipients(make_server):
    app = make_server(users=(("alice@example.test", "pw"),))
    with Raw(app.smtp_port) as client:
        transaction(client, rcpts=())
        assert client.command(b"RCPT TO:<alice@example.test>")[0] == 250
        reply = client.command(b"RCPT TO:<bob@example.test>")
        assert reply[0] == 550 and reply[1][0].startswith("550 5.1.1")
        assert client.command(b"RCPT TO:<postmaster@example.test>")[0] == 250
        assert client.command(b"RCPT TO:<Postmaster>")[0] == 250


def test_smtp_accounts_with_catch_all_accept_anyone(make_server):
    app = make_server(users=(("alice@example.test", "pw"),), catch_all=True)
    with Raw(app.smtp_port) as client:
        transaction(client, rcpts=(b"bob@example.test", b"x@elsewhere.test"))


@pytest.mark.parametrize("address", [
    b"../etc@example.test", b"a/b@example.test", b'"a\\\\b"@example.test', b".hidden@example.test",
    b'"."@example.test', b'".."@example.test', b'"a\\\x01b"@example.test',
    b"x" * 250 + b"@example.test"])
def test_smtp_unsafe_mailbox_name_refused(mail, address):
    with Raw(mail.smtp_port) as client:
        transaction(client, rcpts=())
        code, lines = client.command(b"RCPT TO:<" + address + b">")
        assert (code, lines[0][4:9]) == (553, "5.1.3")
    assert all_files(mail.maildir.root) == []


@pytest.mark.parametrize("line", [
    b"RCPT TO:<no-at-sign>", b"RCPT TO:<a@>", b"RCPT TO:<@example.test>", b"RCPT TO:<a@b..c>",
    b"RCPT TO:<a b@example.test>", b"RCPT TO:<>", b"RCPT TO:<a@example.test", b"RCPT TO:"])
def test_smtp_bad_recipient_syntax(mail, line):
    with Raw(mail.smtp_port) as client:
        transaction(client, rcpts=())
        code, lines = client.command(line)
        assert code == 501 and lines[0][4:7] == "5.1", lines


def test_smtp_recipient_limit(mail):
    with Raw(mail.smtp_port) as client:
        transaction(client, rcpts=())
        client.send(b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(1001)))
        codes = [client.code() for _ in range(1001)]
        assert codes[:1000] == [250] * 1000
        assert client.read_reply is not None and codes[1000] == 452


def test_smtp_recipient_limit_status(mail):
    with Raw(mail.smtp_port) as client:
        transaction(client, rcpts=())
        client.send(b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(1000)))
        for _ in range(1000):
            client.read_reply()
        assert client.command(b"RCPT TO:<last@example.test>")[1][0].startswith("452 4.5.3")


def test_smtp_source_route_ignored_and_lenient_forms(mail):
    with Raw(mail.smtp_port) as client:
        transaction(client, rcpts=())
        assert client.command(b"RCPT TO:<@relay.test:r1@example.test>")[0] == 250
        assert client.command(b"RCPT TO: <r2@example.test>")[0] == 250
        assert client.command(b"RCPT TO:r3@example.test")[0] == 250
        assert client.command(b"DATA")[0] == 354
        assert client.command(b"x\r\n.")[0] == 250
    for name in ("r1", "r2", "r3"):
        assert len(delivered(mail, name + "@example.test")) == 1


def test_smtp_smtputf8_address(mail):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"EHLO client.test")[0] == 250
        reply = client.command("MAIL FROM:<jöran@sender.test>".encode())
        assert reply[0] == 553 and "5.6.7" in reply[1][0]
        assert client.command("MAIL FROM:<jöran@sender.test> SMTPUTF8".encode())[0] == 250
        assert client.command("RCPT TO:<Ünïcode@Example.test>".encode())[0] == 250
        assert client.command(b"DATA")[0] == 354
        assert client.command("Subject: ü\r\n\r\nüñí\r\n.".encode())[0] == 250
    stored = read_stored(mail, "ünïcode@example.test")
    assert "Return-Path: <jöran@sender.test>".encode() in stored
    assert body_of(stored) == "Subject: ü\n\nüñí\n".encode()


def test_smtp_idn_domain_is_local_in_a_label_form(make_server):
    app = make_server(domains=("bücher.example",))
    assert app.config.local_domains == {"xn--bcher-kva.example"}
    with Raw(app.smtp_port) as client:
        assert client.command(b"EHLO client.test")[0] == 250
        assert client.command(b"MAIL FROM:<a@sender.test> SMTPUTF8")[0] == 250
        assert client.command("RCPT TO:<x@Bücher.example>".encode())[0] == 250
        assert client.command(b"RCPT TO:<y@XN--BCHER-KVA.example>")[0] == 250


@pytest.mark.parametrize("params, code", [
    (b" SIZE=100", 250), (b" BODY=8BITMIME", 250), (b" BODY=7BIT", 250), (b" AUTH=<>", 250),
    (b" SIZE=abc", 501), (b" BODY=BINARYMIME", 501), (b" RET=HDRS", 555), (b" SMTPUTF8=yes", 555)])
def test_smtp_mail_parameters(mail, params, code):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"EHLO client.test")[0] == 250
        assert client.command(b"MAIL FROM:<a@sender.test>" + params)[0] == code


def test_smtp_received_header_names_one_recipient(mail):
    with smtp_client(mail.smtp_port) as client:
        client.sendmail("a@sender.test", ["u@example.test", "v@example.test"], b"x\r\n")
    stored = read_stored(mail, "u@example.test")
    assert b"for <u@example.test>" in stored and b"v@example.test" not in stored


# --- SMTP: sizes and limits --------------------------------------------------------------

def test_smtp_declared_size_over_limit_refused_at_mail(make_server):
    app = make_server(max_size=1000)
    with Raw(app.smtp_port) as client:
        assert client.command(b"EHLO client.test")[1][2] == "250-SIZE 1000"
        code, lines = client.command(b"MAIL FROM:<a@sender.test> SIZE=1001")
        assert (code, lines[0][4:9]) == (552, "5.3.4")
        assert client.command(b"MAIL FROM:<a@sender.test> SIZE=1000")[0] == 250


def test_smtp_actual_size_over_limit_refused_after_data(make_server):
    app = make_server(max_size=1000)
    with Raw(app.smtp_port) as client:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        client.send(b"x" * 500 + b"\r\n" + b"y" * 600 + b"\r\n.\r\n")
        code, lines = client.read_reply()
        assert (code, lines[0][4:9]) == (552, "5.3.4")
        assert client.command(b"NOOP")[0] == 250        # the session goes on
        transaction(client, rcpts=())
        assert client.command(b"RCPT TO:<user@example.test>")[0] == 250
        assert client.command(b"DATA")[0] == 354
        assert client.command(b"x" * 900 + b"\r\n.")[0] == 250
    assert len(delivered(app, "user@example.test")) == 1
    assert os.listdir(os.path.join(app.maildir.root, "user@example.test", "tmp")) == []


def test_smtp_long_line_stored_intact(mail):
    line = b"".join(b"%07d" % i for i in range(150_000))      # 1 MB, no line break
    with Raw(mail.smtp_port) as client:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        client.send(b"Subject: long\r\n\r\n" + line + b"\r\nend\r\n.\r\n")
        assert client.code() == 250
    assert body_of(read_stored(mail, "user@example.test")) == b"Subject: long\n\n" + line + b"\nend\n"


def test_smtp_nul_and_8bit_bytes_stored_intact(mail):
    body = b"Subject: bin\r\n\r\nnul\x00byte \xff\xfe invalid utf-8 \xc3\x28\r\n"
    with Raw(mail.smtp_port) as client:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        client.send(body + b".\r\n")
        assert client.code() == 250
    assert body_of(read_stored(mail, "user@example.test")) == body.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("length, code", [(510, 250), (511, 500)])
def test_smtp_command_line_limit(mail, length, code):
    line = b"NOOP " + b"x" * (length - 5)
    with Raw(mail.smtp_port) as client:
        assert len(line) + 2 in (512, 513)
        reply = client.command(line)
        assert reply[0] == code
        assert client.command(b"NOOP")[0] == 250


def test_smtp_overlong_line_is_never_run(mail):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"EHLO client.test")[0] == 250
        # The tail of the overlong line looks like a command: it must not run.
        client.send(b"X" * 20000 + b" QUIT\r\nNOOP\r\n")
        code, lines = client.read_reply()
        assert (code, lines[0][4:9]) == (500, "5.5.2")
        assert client.code() == 250
        client.send(b"MAIL FROM:<" + b"a" * 1100 + b"@sender.test>\r\n")
        assert client.code() == 500
        long_sender = b"a" * 250 + b"@" + b".".join([b"d" * 60] * 4) + b".test"
        assert 512 < len(b"MAIL FROM:<%s>\r\n" % long_sender) <= 1024
        assert client.command(b"MAIL FROM:<" + long_sender + b">")[0] == 250


def test_smtp_overlong_line_without_newline_is_bounded(mail):
    with Raw(mail.smtp_port) as client:
        client.send(b"A" * 200_000)
        client.send(b"\r\nNOOP\r\n")
        assert client.code() == 500
        assert client.code() == 250


@pytest.mark.parametrize("line", [b"NO\x00OP", b"\xff\xfe", "NÖOP".encode(), b"smtp___class__",
                                  b"EHLO \xff\xfe", b"NOOP\rQUIT", b""])
def test_smtp_junk_commands_get_errors(mail, line):
    with Raw(mail.smtp_port) as client:
        code = client.command(line)[0]
        assert 500 <= code < 502
        assert client.command(b"NOOP")[0] == 250


def test_smtp_too_many_errors_close(mail):
    with Raw(mail.smtp_port) as client:
        client.send(b"BOGUS\r\n" * 25)
        codes = [client.code() for _ in range(minimail.SMTP_MAX_ERRORS)]
        assert codes[:-1] == [500] * (minimail.SMTP_MAX_ERRORS - 1) and codes[-1] == 421
        assert client.closed()


def test_smtp_mail_loop_refused(mail):
    headers = b"".join(b"Received: from hop%d by x; Sat, 1 Jan 2022 00:00:00 +0000\r\n" % i
                       for i in range(51))
    with Raw(mail.smtp_port) as client:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        client.send(headers + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
        code, lines = client.read_reply()
        assert (code, lines[0][4:9]) == (554, "5.4.6")
        # 50 are fine, and a Received: in the body does not count.
        transaction(client, rcpts=(b"user@example.test",)) if False else None
        assert client.command(b"MAIL FROM:<a@sender.test>")[0] == 250
        assert client.command(b"RCPT TO:<user@example.test>")[0] == 250
        assert client.command(b"DATA")[0] == 354
        client.send(headers[headers.index(b"\n") + 1:] + b"\r\nReceived: in body\r\n.\r\n")
        assert client.code() == 250
    assert len(delivered(mail, "user@example.test")) == 1


def test_smtp_idle_timeout(make_server):
    app = make_server(timeout=0.3)
    with Raw(app.smtp_port) as client:
        code, lines = client.read_reply()
        assert (code, lines[0][4:9]) == (421, "4.4.2")
        assert client.closed()


def test_smtp_slow_line_times_out(make_server):
    app = make_server(timeout=0.5)
    with Raw(app.smtp_port) as client:
        start = time.monotonic()
        for _ in range(12):                 # a byte each 0.1 s never completes a line
            try:
                client.send(b"N")
            except OSError:
                break
            time.sleep(0.1)
        assert client.code() == 421
        assert time.monotonic() - start < 3


def test_smtp_timeout_inside_data_stores_nothing(make_server):
    app = make_server(timeout=0.3)
    with Raw(app.smtp_port) as client:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        client.send(b"Subject: partial\r\n\r\nhalf a message")
        assert client.code() == 421
    assert delivered(app, "user@example.test") == []
    assert wait_for(lambda: os.listdir(os.path.join(app.maildir.root, "user@example.test", "tmp")) == [])


def test_smtp_client_vanishing_mid_data_stores_nothing(mail):
    client = Raw(mail.smtp_port)
    transaction(client)
    assert client.command(b"DATA")[0] == 354
    client.send(b"Subject: partial\r\n\r\nhalf\r\n")
    client.close()
    tmp = os.path.join(mail.maildir.root, "user@example.test", "tmp")
    assert wait_for(lambda: os.path.isdir(tmp) and os.listdir(tmp) == [])
    assert delivered(mail, "user@example.test") == []


def test_smtp_connection_cap(make_server):
    app = make_server(max_connections=2)
    first, second = Raw(app.smtp_port), Raw(app.smtp_port)
    with first, second, Raw(app.smtp_port, greeting=False) as third:
        code, lines = third.read_reply()
        assert (code, lines[0][4:9]) == (421, "4.7.0")
        assert third.closed()
        assert first.command(b"NOOP")[0] == 250
    with Raw(app.smtp_port) as again:   # slots come back when clients leave
        assert wait_for(lambda: again.command(b"NOOP")[0] == 250)


# --- SMTP: smuggling and line ends --------------------------------------------------

SMUGGLING = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r",
             b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]


@pytest.mark.parametrize("ending", SMUGGLING)
def test_smtp_smuggling_never_ends_data(mail, ending):
    smuggled = b"MAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nspoof\r\n"
    with Raw(mail.smtp_port) as client:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        client.send(b"Subject: first\r\n\r\nbody" + ending + smuggled + b".\r\n")
        assert client.code() == 250
        assert client.command(b"NOOP")[0] == 250     # nothing else was answered
    assert delivered(mail, "victim@example.test") == []
    stored = body_of(read_stored(mail, "user@example.test"))
    assert b"MAIL FROM:<evil@sender.test>\n" in stored
    assert b"\r" not in stored


@pytest.mark.parametrize("sent, stored", [
    (b"a\nb\r\n", b"a\nb\n"), (b"a\rb\r\n", b"a\nb\n"), (b"a\r\r\nb\r\n", b"a\n\nb\n"),
    (b"a\n\n.\r\n", None)])
def test_smtp_bare_cr_and_lf_normalised(mail, sent, stored):
    with Raw(mail.smtp_port) as client:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        client.send(b"Subject: n\r\n\r\n" + sent + (b".\r\n" if stored is not None else b"\r\n.\r\n"))
        assert client.code() == 250
    body = body_of(read_stored(mail, "user@example.test"))
    assert b"\r" not in body
    if stored is not None:
        assert body == b"Subject: n\n\n" + stored


def test_smtp_terminator_split_across_packets(mail):
    with Raw(mail.smtp_port) as client:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        for piece in (b"Subject: s\r\n\r\nline\r", b"\n", b".", b".x\r\n", b"\r\n.", b"\r", b"\n"):
            client.send(piece)
            time.sleep(0.02)
        assert client.code() == 250
    assert body_of(read_stored(mail, "user@example.test")) == b"Subject: s\n\nline\n.x\n\n"


# --- SMTP: BDAT (RFC 3030) ----------------------------------------------------------

def test_smtp_bdat_chunks(mail):
    with Raw(mail.smtp_port) as client:
        transaction(client)
        client.send(b"BDAT 20\r\nSubject: b\r\n\r\nline1\r")
        assert client.read_reply() == (250, ["250 2.0.0 20 octets received"])
        client.send(b"BDAT 13 LAST\r\n\n.not stuffed")
        assert client.code() == 250
        assert client.command(b"NOOP")[0] == 250
    assert body_of(read_stored(mail, "user@example.test")) == b"Subject: b\n\nline1\n.not stuffed\n"


def test_smtp_bdat_zero_last_and_pipelined(mail):
    with Raw(mail.smtp_port) as client:
        client.send(b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.test>\r\n"
                    b"BDAT 6\r\nx\r\ny\r\nBDAT 0 LAST\r\nQUIT\r\n")
        assert [client.code() for _ in range(6)] == [250, 250, 250, 250, 250, 221]
    assert body_of(read_stored(mail, "user@example.test")) == b"x\ny\n"


def test_smtp_bdat_and_data_do_not_mix(mail):
    with Raw(mail.smtp_port) as client:
        transaction(client)
        client.send(b"BDAT 3\r\nabc")
        assert client.code() == 250
        assert client.command(b"DATA")[0] == 503
        assert client.command(b"RSET")[0] == 250
    assert delivered(mail, "user@example.test") == []
    assert os.listdir(os.path.join(mail.maildir.root, "user@example.test", "tmp")) == []


def test_smtp_bdat_without_transaction_skips_chunk(mail):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        client.send(b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\n")
        assert client.code() == 503
        assert client.command(b"NOOP")[0] == 250        # the chunk was not run


def test_smtp_bdat_over_size_limit(make_server):
    app = make_server(max_size=100)
    with Raw(app.smtp_port) as client:
        transaction(client)
        client.send(b"BDAT 60\r\n" + b"a" * 60)
        assert client.code() == 250
        client.send(b"BDAT 60\r\n" + b"b" * 60)
        code, lines = client.read_reply()
        assert (code, lines[0][4:9]) == (552, "5.3.4")
        client.send(b"BDAT 5 LAST\r\nccccc")
        assert client.code() == 552
        assert client.command(b"NOOP")[0] == 250
    assert delivered(app, "user@example.test") == []


def test_smtp_bdat_bad_syntax_closes(mail):
    with Raw(mail.smtp_port) as client:
        transaction(client)
        assert client.command(b"BDAT x")[0] == 501
        assert client.closed()


# --- SMTP: AUTH ---------------------------------------------------------------------

def b64(data):
    return base64.b64encode(data)


def test_smtp_auth_plain_and_login(make_server):
    app = make_server(users=(("alice@example.test", "secret"),))
    with smtp_client(app.smtp_port) as client:
        client.login("alice@example.test", "secret")          # smtplib prefers PLAIN... or LOGIN
    with Raw(app.smtp_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        assert client.command(b"AUTH LOGIN")[1] == ["334 VXNlcm5hbWU6"]
        assert client.command(b64(b"Alice@Example.test"))[1] == ["334 UGFzc3dvcmQ6"]
        assert client.command(b64(b"secret"))[1][0].startswith("235 2.7.0")
    with Raw(app.smtp_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        assert client.command(b"AUTH PLAIN")[1] == ["334 "]
        assert client.command(b64(b"\x00alice@example.test\x00secret"))[0] == 235
        assert client.command(b"AUTH PLAIN")[0] == 503          # already authenticated


def test_smtp_auth_received_header_esmtpa(make_server):
    app = make_server(users=(("alice@example.test", "secret"),))
    with smtp_client(app.smtp_port) as client:
        client.login("alice@example.test", "secret")
        client.sendmail("alice@example.test", ["alice@example.test"], b"x\r\n")
    assert b" with ESMTPA id " in read_stored(app, "alice@example.test")


def test_smtp_auth_failures_delay_then_close(make_server):
    app = make_server(users=(("alice@example.test", "secret"),), auth_failure_delay=0.2)
    with Raw(app.smtp_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        start = time.monotonic()
        code, lines = client.command(b"AUTH PLAIN " + b64(b"\x00alice@example.test\x00wrong"))
        assert (code, lines[0][4:9]) == (535, "5.7.8")
        assert time.monotonic() - start >= 0.2
        assert client.command(b"AUTH PLAIN " + b64(b"\x00nobody@example.test\x00secret"))[0] == 535
        code, lines = client.command(b"AUTH PLAIN " + b64(b"\x00alice@example.test\x00wrong"))
        assert (code, lines[0][4:9]) == (421, "4.7.0")
        assert client.closed()


@pytest.mark.parametrize("exchange, code", [
    ([b"AUTH PLAIN", b"*"], 501), ([b"AUTH PLAIN !!!notbase64"], 501), ([b"AUTH PLAIN", b"abc"], 501),
    ([b"AUTH PLAIN " + b64(b"no-nul-bytes")], 501), ([b"AUTH CRAM-MD5"], 504),
    ([b"AUTH LOGIN", b"*"], 501), ([b"AUTH LOGIN " + b64(b"alice@example.test"), b"*"], 501),
    ([b"AUTH PLAIN " + b64(b"bob@example.test\x00alice@example.test\x00secret")], 535)])
def test_smtp_auth_bad_exchanges(make_server, exchange, code):
    app = make_server(users=(("alice@example.test", "secret"),))
    with Raw(app.smtp_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        for line in exchange:
            reply = client.command(line)
        assert reply[0] == code
        assert client.command(b"NOOP")[0] == 250


def test_smtp_auth_response_line_limit(make_server):
    app = make_server(users=(("alice@example.test", "secret"),))
    with Raw(app.smtp_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        assert client.command(b"AUTH PLAIN")[0] == 334
        assert client.command(b"A" * 13000)[0] == 500
        assert client.command(b"AUTH PLAIN " + b64(b"\x00alice@example.test\x00secret"))[0] == 235


def test_smtp_auth_dev_sink_accepts_anything_but_grants_no_relay(mail):
    with smtp_client(mail.smtp_port) as client:
        client.login("whoever", "whatever")
        client.mail("a@sender.test")
        assert client.rcpt("x@example.test")[0] == 250
        assert client.rcpt("x@elsewhere.test")[0] == 554


def test_smtp_auth_needs_tls_off_loopback(make_server):
    app = make_server(loopback_networks=())       # 127.0.0.1 now counts as a remote client
    with Raw(app.smtp_port) as client:
        code, lines = client.command(b"EHLO c")
        assert not any("AUTH" in line for line in lines)
        code, lines = client.command(b"AUTH PLAIN " + b64(b"\x00a@example.test\x00b"))
        assert (code, lines[0][4:10]) == (538, "5.7.11")


def test_smtp_submission_requires_auth(make_server):
    app = make_server(submission=("127.0.0.1", 0), users=(("alice@example.test", "secret"),))
    with Raw(app.submission_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        code, lines = client.command(b"MAIL FROM:<alice@example.test>")
        assert (code, lines[0][4:9]) == (530, "5.7.0")
        assert client.command(b"AUTH PLAIN " + b64(b"\x00alice@example.test\x00secret"))[0] == 235
        assert client.command(b"MAIL FROM:<alice@example.test>")[0] == 250
    with Raw(app.smtp_port) as client:           # the plain listener does not insist
        assert client.command(b"EHLO c")[0] == 250
        assert client.command(b"MAIL FROM:<alice@example.test>")[0] == 250


# --- SMTP: STARTTLS -----------------------------------------------------------------------

@pytest.fixture
def tls_server(make_server, tls_files):
    cert, key = tls_files
    return make_server(tls_cert=cert, tls_key=key, users=(("alice@example.test", "secret"),),
                       loopback_networks=())


def test_smtp_starttls_then_auth_and_deliver(tls_server):
    with smtp_client(tls_server.smtp_port) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=client_tls_context())
        client.ehlo()
        assert not client.has_extn("starttls") and client.has_extn("auth")
        client.login("alice@example.test", "secret")
        client.sendmail("alice@example.test", ["alice@example.test"], b"Subject: tls\r\n\r\nx\r\n")
    assert b" with ESMTPSA id " in read_stored(tls_server, "alice@example.test")


def test_smtp_starttls_discards_pipelined_plaintext(tls_server):
    with Raw(tls_server.smtp_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        client.send(b"STARTTLS\r\nMAIL FROM:<inject@sender.test>\r\n")
        assert client.read_line().startswith(b"220 2.0.0")
        client.sock = client_tls_context().wrap_socket(client.sock)
        assert client.command(b"MAIL FROM:<a@sender.test>")[0] == 503   # session was reset
        assert client.command(b"EHLO c")[0] == 250
        assert client.command(b"MAIL FROM:<a@sender.test>")[0] == 250
        assert client.command(b"STARTTLS")[0] == 503


def test_smtp_starttls_resets_session(tls_server):
    with Raw(tls_server.smtp_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        assert client.command(b"MAIL FROM:<a@sender.test>")[0] == 250
        assert client.command(b"STARTTLS")[0] == 220
        client.sock = client_tls_context().wrap_socket(client.sock)
        assert client.command(b"RCPT TO:<alice@example.test>")[0] == 503


def test_smtp_starttls_not_offered_without_cert(mail):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        assert client.command(b"STARTTLS")[0] == 502


def test_smtp_tls_handshake_garbage_closes_quietly(tls_server):
    with Raw(tls_server.smtp_port) as client:
        assert client.command(b"STARTTLS")[0] == 220
        client.send(b"this is not a TLS client hello\r\n" * 10)
        assert client.closed()
    with Raw(tls_server.smtp_port) as client:
        assert client.command(b"NOOP")[0] == 250


# --- SMTP: concurrency and durability --------------------------------------------------

def test_smtp_concurrent_senders_store_every_message_once(mail):
    errors = []

    def sender(thread_number):
        try:
            for number in range(50):
                with smtp_client(mail.smtp_port) as client:
                    client.sendmail("a@sender.test", ["load@example.test"],
                                    b"Subject: t%d-%d\r\n\r\nbody\r\n" % (thread_number, number))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    files = delivered(mail, "load@example.test")
    assert len(files) == 1000
    subjects = set()
    for path in files:
        with open(path, "rb") as file:
            subjects.add(body_of(file.read()).split(b"\n")[0])
    assert len(subjects) == 1000


def test_smtp_two_processes_share_a_maildir(tmp_path):
    first = minimail.App(base_config(tmp_path))
    second = minimail.App(base_config(tmp_path))
    first.start()
    second.start()
    try:
        for app in (first, second) * 5:
            with smtp_client(app.smtp_port) as client:
                client.sendmail("a@sender.test", ["u@example.test"], b"x\r\n")
    finally:
        first.stop()
        second.stop()
    assert len(set(minimail.message_id_of(os.path.basename(p)) for p in delivered(first, "u@example.test"))) == 10


def test_smtp_storage_failure_is_a_temporary_error(mail):
    os.makedirs(os.path.join(mail.maildir.root, "blocked@example.test"))
    with open(os.path.join(mail.maildir.root, "blocked@example.test", "tmp"), "w") as file:
        file.write("not a folder")
    with Raw(mail.smtp_port) as client:
        transaction(client, rcpts=(b"blocked@example.test",))
        code, lines = client.command(b"DATA")
        assert (code, lines[0][4:9]) == (451, "4.3.0")
        assert client.command(b"NOOP")[0] == 250


# --- App and command line ------------------------------------------------------------

def test_app_refuses_non_loopback_submission_without_accounts(tmp_path):
    app = minimail.App(base_config(tmp_path, submission=("0.0.0.0", 0)))
    with pytest.raises(minimail.ConfigError, match="needs accounts"):
        app.start()


def test_app_port_in_use(tmp_path, mail):
    app = minimail.App(base_config(tmp_path, smtp=("127.0.0.1", mail.smtp_port)))
    with pytest.raises(minimail.ConfigError, match="cannot listen"):
        app.start()


def test_app_ipv6_listener(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        app = minimail.App(base_config(tmp_path, smtp=("::1", 0)))
        app.start()
    except minimail.ConfigError as exc:
        pytest.skip("no IPv6 loopback here: %s" % exc)
    try:
        with smtplib.SMTP("::1", app.smtp_port, local_hostname="c", timeout=5) as client:
            client.sendmail("a@sender.test", ["v6@example.test"], b"x\r\n")
        assert b"([IPv6:::1])" in read_stored(app, "v6@example.test")
    finally:
        app.stop()


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, MINIMAIL, *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_cli_help_lists_options_with_defaults():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--domain", "--maildir", "--smtp", "--submission", "--hostname", "--user",
                   "--users", "--relay-from", "--catch-all", "--tls-cert", "--tls-key",
                   "--max-size", "--max-connections", "--timeout", "-q", "-v"):
        assert option in result.stdout
    assert "127.0.0.1:1025" in result.stdout and "26214400" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized"), (["--smtp", "nonsense:port"], "--smtp"),
    (["--timeout", "soon"], "--timeout"), (["--user", "nopassword"], "--user"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem", "--smtp", "0"], "certificate"),
    (["--submission", "0.0.0.0:0", "--smtp", "off"], "needs accounts"),
    (["--users", "/nonexistent/users"], "users file"),
    (["--domain", "bad_domain!"], "domain"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, args, message):
    result = run_cli("--maildir", str(tmp_path), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def start_cli(tmp_path, *args):
    """Start minimail as a process; return it and its startup lines (ports read from them)."""
    process = subprocess.Popen([sys.executable, MINIMAIL, "--maildir", str(tmp_path / "md"),
                                "--domain", "example.test", "--smtp", "127.0.0.1:0", *args],
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    lines = []
    while True:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("minimail: mail stored in"):
            break
    return process, lines


def test_cli_serves_and_stops_cleanly_on_sigterm(tmp_path):
    process, lines = start_cli(tmp_path)
    try:
        assert lines[-1] == "minimail: mail stored in %s\n" % (tmp_path / "md")
        smtp_line = [line for line in lines if line.startswith("minimail: smtp listening on ")][0]
        port = int(smtp_line.rsplit(":", 1)[1])
        assert port != 0
        with smtp_client(port) as client:
            client.sendmail("a@sender.test", ["cli@example.test"], b"Subject: cli\r\n\r\nx\r\n")
        assert len(os.listdir(tmp_path / "md" / "cli@example.test" / "new")) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=20)[1]
    assert process.returncode == 0
    assert "Traceback" not in rest
    assert "accept id=" in rest


def test_cli_sigint_mid_data_leaves_nothing_half_written(tmp_path):
    process, lines = start_cli(tmp_path, "-q")
    port = int([line for line in lines if " smtp listening on " in line][0].rsplit(":", 1)[1])
    client = Raw(port)
    try:
        transaction(client)
        assert client.command(b"DATA")[0] == 354
        client.send(b"Subject: cut\r\n\r\n" + b"x" * 100000)
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=20)[1]
    finally:
        client.close()
    assert process.returncode == 0 and "Traceback" not in rest
    assert not os.path.exists(tmp_path / "md" / "user@example.test" / "new") or \
        os.listdir(tmp_path / "md" / "user@example.test" / "new") == []
    assert os.listdir(tmp_path / "md" / "user@example.test" / "tmp") == []


def test_cli_quiet_still_prints_startup_lines(tmp_path):
    process, lines = start_cli(tmp_path, "-q")
    try:
        assert any(line.startswith("minimail: smtp listening on 127.0.0.1:") for line in lines)
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=20)[1]
    assert rest == "" and process.returncode == 0


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed (Debian package swaks)")
def test_cli_swaks_from_readme(tmp_path):
    process, lines = start_cli(tmp_path, "-q")
    port = int([line for line in lines if " smtp listening on " in line][0].rsplit(":", 1)[1])
    try:
        result = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % port, "--to", "a@example.test",
                                 "--from", "me@sender.test"], capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(os.listdir(tmp_path / "md" / "a@example.test" / "new")) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)


# --- Maildir reading -----------------------------------------------------------------

def test_maildir_lists_finds_and_flags(mail):
    with smtp_client(mail.smtp_port) as client:
        client.sendmail("a@sender.test", ["u@example.test"], b"Subject: 1\r\n\r\nx\r\n")
        client.sendmail("a@sender.test", ["u@example.test"], b"Subject: 2\r\n\r\ny\r\n")
    maildir = mail.maildir
    assert maildir.mailboxes() == ["u@example.test"]
    first, second = maildir.messages("u@example.test")
    assert first.folder == "new" and first.flags == ""
    moved = maildir.set_flags(first, "SF")
    assert moved.folder == "cur" and moved.flags == "FS" and moved.name.endswith(":2,FS")
    assert maildir.find("u@example.test", first.id).path == moved.path
    assert maildir.find("u@example.test", "no-such-id") is None
    with open(moved.path, "rb") as file:
        data = file.read()
    assert moved.wire_size() == len(data) + data.count(b"\n")


@pytest.mark.parametrize("content", [
    b"a\nb\n", b"a\r\nb\r\n", b"no final newline", b"mixed\r\nlf\nlast", b"", b"\n"])
def test_maildir_wire_size_of_foreign_files(tmp_path, content):
    box = tmp_path / "x@example.test"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    (box / "new" / "123.foreign").write_bytes(content)
    (box / "new" / ("124.lying,S=%d,W=99" % (len(content) + 1))).write_bytes(content)
    maildir = minimail.Maildir(str(tmp_path))
    lines = content.replace(b"\r\n", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    wire = b"".join(line + b"\r\n" for line in lines)
    for message in maildir.messages("x@example.test"):
        assert message.wire_size() == len(wire), message.name


# --- DNS -----------------------------------------------------------------------------

# The fake DNS server's own encoder and decoder (uncompressed names), independent of
# minimail's wire functions.
T_A, T_CNAME, T_SOA, T_MX, T_AAAA, T_OPT = 1, 5, 6, 15, 28, 41


def wire_name(name):
    labels = [label for label in name.encode("ascii").split(b".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def rr(name, rtype, rdata, ttl=300):
    return wire_name(name) + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def mx_rr(name, preference, exchange, ttl=300):
    return rr(name, T_MX, struct.pack("!H", preference) + wire_name(exchange), ttl)


def a_rr(name, address, ttl=300):
    family, rtype = (socket.AF_INET6, T_AAAA) if ":" in address else (socket.AF_INET, T_A)
    return rr(name, rtype, socket.inet_pton(family, address), ttl)


def cname_rr(name, target, ttl=300):
    return rr(name, T_CNAME, wire_name(target), ttl)


def soa_rr(zone, ttl=60, minimum=60):
    rdata = wire_name("ns." + zone) + wire_name("admin." + zone) + struct.pack(
        "!5I", 1, 3600, 600, 86400, minimum)
    return rr(zone, T_SOA, rdata, ttl)


def name_and_type(data, offset):
    """The uncompressed name at offset (case kept) and the type after it."""
    labels = []
    while data[offset]:
        labels.append(data[offset + 1:offset + 1 + data[offset]].decode("ascii"))
        offset += 1 + data[offset]
    return ".".join(labels), struct.unpack_from("!H", data, offset + 1)[0]


def record_key(record):
    """(lowercase name, type) of an encoded record."""
    name, rtype = name_and_type(record, 0)
    return name.lower(), rtype


@dataclasses.dataclass
class Query:
    id: int
    name: str               # as sent (case kept)
    qtype: int
    client: tuple
    transport: str          # "udp" or "tcp"


def parse_query(data, client=None, transport="udp"):
    return Query(struct.unpack_from("!H", data)[0], *name_and_type(data, 12), client, transport)


def dns_reply(query, answers=(), authority=(), additional=(), rcode=0, tc=False, qid=None,
              question=None, flags=0x8180):
    """A response to query (QR RD RA set by default), echoing its question unless told."""
    name, qtype = question or (query.name, query.qtype)
    header = struct.pack("!6H", query.id if qid is None else qid,
                         flags | rcode | (0x0200 if tc else 0),
                         1, len(answers), len(authority), len(additional))
    return (header + wire_name(name) + struct.pack("!HH", qtype, 1)
            + b"".join(answers) + b"".join(authority) + b"".join(additional))


def recv_exactly(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class FakeDNS:
    """A DNS server on a loopback port 0, UDP and TCP on the same port.

    It answers from `records` (NXDOMAIN or NODATA with `soa` in the authority section
    otherwise), unless `handler` is set: handler(query) returns the messages to send,
    none for silence. TCP messages get their length prefix unless `frame_tcp` is off.
    """

    def __init__(self, host="127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(50):         # the same port number for UDP and TCP
            self.udp = socket.socket(family, socket.SOCK_DGRAM)
            self.udp.bind((host, 0))
            self.tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                self.tcp.bind((host, self.udp.getsockname()[1]))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(8)
        self.udp.settimeout(5)          # select() says when they are ready; never a long wait
        self.tcp.settimeout(5)
        self.address = (host, self.udp.getsockname()[1])
        self.records = []
        self.soa = soa_rr("test")
        self.handler = None
        self.frame_tcp = True
        self.queries = []
        self.errors = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve)
        self.thread.start()

    def add(self, *records):
        self.records.extend(records)

    def asked(self, transport=None):
        """(name, type) of every query so far, optionally of one transport."""
        return [(query.name.lower(), query.qtype) for query in self.queries
                if transport in (None, query.transport)]

    def answer(self, query):
        name = query.name.lower()
        here = [(record_key(record)[1], record) for record in self.records
                if record_key(record)[0] == name]
        if not here:
            return [dns_reply(query, authority=[self.soa] if self.soa else [], rcode=3)]
        found = [record for rtype, record in here if rtype == query.qtype] or \
                [record for rtype, record in here if rtype == T_CNAME]
        return [dns_reply(query, found, authority=[] if found or not self.soa else [self.soa])]

    def serve(self):
        while not self.stopping.is_set():
            readable = select.select([self.udp, self.tcp], [], [], 0.05)[0]
            try:
                if self.udp in readable:
                    data, client = self.udp.recvfrom(65535)
                    for out in self.respond(parse_query(data, client, "udp")):
                        self.udp.sendto(out, client)
                if self.tcp in readable:
                    self.serve_tcp()
            except Exception as exc:            # reported at teardown
                self.errors.append(exc)

    def serve_tcp(self):
        conn, client = self.tcp.accept()
        with conn:
            conn.settimeout(5)
            length = struct.unpack("!H", recv_exactly(conn, 2))[0]
            query = parse_query(recv_exactly(conn, length), client, "tcp")
            for out in self.respond(query):
                conn.sendall(struct.pack("!H", len(out)) + out if self.frame_tcp else out)

    def respond(self, query):
        self.queries.append(query)
        return (self.handler or self.answer)(query)

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        self.udp.close()
        self.tcp.close()


@pytest.fixture
def make_dns():
    servers = []

    def start(host="127.0.0.1"):
        server = FakeDNS(host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    assert not [error for server in servers for error in server.errors]


@pytest.fixture
def fake_dns(make_dns):
    return make_dns()


def resolver_for(*servers, **overrides):
    """A Resolver asking the given FakeDNS servers (or (host, port) pairs) and nothing else."""
    fields = dict(dns=tuple(getattr(server, "address", server) for server in servers),
                  dns_timeout=2.0, dns_attempts=1, resolv_conf="/nonexistent/resolv.conf")
    fields.update(overrides)
    return minimail.Resolver(minimail.Config(**fields))


def hosts_of(hosts):
    return [(host.preference, host.host, host.addresses) for host in hosts]


def standard_zone(server):
    """example.test: MX 10 mx1 (IPv4 and IPv6), 20 mx2 (IPv4); plain.test: only an address."""
    server.add(mx_rr("example.test", 20, "mx2.example.test"),
               mx_rr("example.test", 10, "mx1.example.test"),
               a_rr("mx1.example.test", "192.0.2.1"), a_rr("mx1.example.test", "2001:db8:0:0::1"),
               a_rr("mx2.example.test", "192.0.2.2"), a_rr("plain.test", "192.0.2.9"))


# The wire format.

def test_dns_build_query_wire_format():
    data = minimail.build_query("xn--bcher-kva.example", T_MX, 0x1234)
    query = parse_query(data)
    flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!5H", data, 2)
    assert (query.id, query.name, query.qtype) == (0x1234, "xn--bcher-kva.example", T_MX)
    assert flags == 0x0100 and (qdcount, ancount, nscount, arcount) == (1, 0, 0, 1)
    # RFC 6891 6.1.2: OPT at the root, CLASS is the UDP payload size.
    assert data.endswith(wire_name("xn--bcher-kva.example") + struct.pack("!HH", T_MX, 1)
                         + b"\0" + struct.pack("!HHIH", T_OPT, 1232, 0, 0))


@pytest.mark.parametrize("name", ["a..b", "x" * 64 + ".test", ".".join(["x" * 60] * 5)])
def test_dns_build_query_refuses_impossible_names(name):
    with pytest.raises(ValueError):
        minimail.build_query(name, T_A, 1)


def test_dns_parse_response_follows_compression_and_lowercases():
    header = struct.pack("!6H", 7, 0x8180, 1, 2, 0, 0)
    question = wire_name("Example.TEST") + struct.pack("!HH", T_MX, 1)
    rdata = struct.pack("!H", 10) + b"\x03MX1\xc0\x0c"                 # mx1 + pointer to 12
    answers = (b"\xc0\x0c" + struct.pack("!HHIH", T_MX, 1, 300, len(rdata)) + rdata
               + b"\xc0\x0c" + struct.pack("!HHIH", 99, 1, 0x80000000, 2) + b"ab")
    message = minimail.parse_response(header + question + answers)
    assert message.id == 7 and message.rcode == 0 and not message.truncated
    assert message.question == (("example.test", T_MX, 1),)
    mx, other = message.answers
    assert (mx.name, mx.rtype, mx.ttl) == ("example.test", T_MX, 300)
    assert mx.data == (10, "mx1.example.test")
    assert other.data == b"ab" and other.ttl == 0       # RFC 2181 8: top bit set means 0


def test_dns_parse_response_escapes_odd_labels():
    """RFC 1035 5.1: a dot, backslash or unprintable octet inside a label is written \\DDD."""
    data = struct.pack("!6H", 1, 0x8180, 1, 0, 0, 0) + b"\x03a.b\x04X y\\\x03COM\x00\x00\x01\x00\x01"
    assert minimail.parse_response(data).question == (("a\\046b.x\\032y\\092.com", T_A, 1),)


def test_dns_addresses_print_alike_on_every_python():
    reply = dns_reply(parse_query(minimail.build_query("h.test", T_AAAA, 3)),
                      [a_rr("h.test", "::ffff:192.0.2.1"), a_rr("h.test", "2001:DB8:0::1")])
    assert [record.data for record in minimail.parse_response(reply).answers] == [
        "::ffff:192.0.2.1", "2001:db8::1"]


def test_dns_parse_truncated_response_keeps_header_and_question():
    data = dns_reply(parse_query(minimail.build_query("example.test", T_MX, 9)), tc=True)
    data = data[:4] + struct.pack("!H", 1) + struct.pack("!H", 5) + data[8:]   # 5 answers, none sent
    message = minimail.parse_response(data)
    assert message.truncated and message.answers == () and message.question[0][0] == "example.test"


def _header(qd=1, an=0, ns=0, ar=0, qid=0):
    return struct.pack("!6H", qid, 0x8180, qd, an, ns, ar)


_QUESTION = wire_name("example.test") + struct.pack("!HH", T_MX, 1)
MALFORMED = {
    "short header": b"\x00\x00\x81\x80\x00\x01",
    "question past the end": _header() + b"\x07example",
    "question type cut": _header() + wire_name("example.test") + b"\x00",
    "pointer to itself": _header() + b"\xc0\x0c" + struct.pack("!HH", T_MX, 1),
    "pointer loop through a label": _header() + b"\x01a\xc0\x0c" + struct.pack("!HH", T_MX, 1),
    "forward pointer": _header() + b"\xc0\x12" + struct.pack("!HH", T_MX, 1) + wire_name("x"),
    "pointer past the end": _header() + b"\xc0",
    "label over 63": _header() + b"\x40" + b"a" * 64 + b"\0" + struct.pack("!HH", T_MX, 1),
    "extended label type": _header() + b"\x81a\0" + struct.pack("!HH", T_MX, 1),
    "name over 255": _header() + b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\0"
                     + struct.pack("!HH", T_MX, 1),
    "record cut": _header(an=1) + _QUESTION + b"\xc0\x0c\x00\x0f\x00",
    "rdlength past the end": _header(an=1) + _QUESTION + b"\xc0\x0c"
                             + struct.pack("!HHIH", T_A, 1, 60, 100) + b"\x01\x02\x03\x04",
    "TXT rdlength past the end": _header(an=1) + _QUESTION + b"\xc0\x0c"
                                 + struct.pack("!HHIH", 16, 1, 60, 100) + b"\x03abc",
    "A of 5 octets": _header(an=1) + _QUESTION + b"\xc0\x0c"
                     + struct.pack("!HHIH", T_A, 1, 60, 5) + b"\x01\x02\x03\x04\x05",
    "MX name past rdlength": _header(an=1) + _QUESTION + b"\xc0\x0c"
                             + struct.pack("!HHIH", T_MX, 1, 60, 4) + b"\x00\x0a"
                             + wire_name("mx1.test"),
    "MX too short": _header(an=1) + _QUESTION + b"\xc0\x0c"
                    + struct.pack("!HHIH", T_MX, 1, 60, 1) + b"\x00",
    "SOA too short": _header(ns=1) + _QUESTION + b"\xc0\x0c"
                     + struct.pack("!HHIH", T_SOA, 1, 60, 4) + b"\x00\x00\x00\x00",
    "fewer records than counted": _header(an=2) + _QUESTION + mx_rr("example.test", 10, "mx.test"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_dns_parse_response_rejects_malformed(case):
    with pytest.raises(minimail.DNSFormatError):
        minimail.parse_response(MALFORMED[case])


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_dns_malformed_reply_is_a_quick_temporary_failure(fake_dns, case):
    fake_dns.handler = lambda query: [struct.pack("!H", query.id) + MALFORMED[case][2:]]
    started = time.monotonic()
    with pytest.raises(minimail.TempFail, match="malformed"):
        resolver_for(fake_dns, dns_timeout=5.0).resolve_mx("example.test")
    assert time.monotonic() - started < 2.5


# Delivery semantics (RFC 5321 5.1, RFC 7505, SPEC 6).

def test_dns_mx_hosts_with_addresses(fake_dns):
    standard_zone(fake_dns)
    hosts = resolver_for(fake_dns).resolve_mx("Example.TEST.")
    assert hosts_of(hosts) == [(10, "mx1.example.test", ["192.0.2.1", "2001:db8::1"]),
                               (20, "mx2.example.test", ["192.0.2.2"])]
    assert fake_dns.asked() == [("example.test", T_MX), ("mx1.example.test", T_A),
                                ("mx1.example.test", T_AAAA), ("mx2.example.test", T_A),
                                ("mx2.example.test", T_AAAA)]


def test_dns_mx_sorted_by_preference_equal_ones_shuffled(fake_dns):
    fake_dns.add(mx_rr("example.test", 20, "z.test"), mx_rr("example.test", 10, "a.test"),
                 mx_rr("example.test", 10, "b.test"), mx_rr("example.test", 10, "c.test"),
                 mx_rr("example.test", 5, "first.test"))
    resolver = resolver_for(fake_dns)
    orders = set()
    for _ in range(60):
        hosts = resolver.resolve_mx("example.test", addresses=False)
        assert [host.preference for host in hosts] == [5, 10, 10, 10, 20]
        assert hosts[0].host == "first.test" and hosts[-1].host == "z.test"
        orders.add(tuple(host.host for host in hosts[1:4]))
    assert len(orders) > 1
    assert all(sorted(order) == ["a.test", "b.test", "c.test"] for order in orders)
    assert fake_dns.asked() == [("example.test", T_MX)]         # shuffled after the cache


def test_dns_implicit_mx_is_the_domain_itself(fake_dns):
    standard_zone(fake_dns)
    hosts = resolver_for(fake_dns).resolve_mx("plain.test")
    assert hosts_of(hosts) == [(0, "plain.test", ["192.0.2.9"])]


def test_dns_null_mx_is_permanent(fake_dns):
    fake_dns.add(mx_rr("example.test", 0, ""), a_rr("example.test", "192.0.2.1"))
    with pytest.raises(minimail.PermFail, match="null MX") as failure:
        resolver_for(fake_dns).resolve_mx("example.test")
    assert failure.value.status == "5.1.10"                 # RFC 7505 4.2


def test_dns_nxdomain_is_permanent(fake_dns):
    with pytest.raises(minimail.PermFail, match="NXDOMAIN"):
        resolver_for(fake_dns).resolve_mx("nowhere.test")


def test_dns_nodata_without_address_is_permanent(fake_dns):
    fake_dns.add(rr("empty.test", 16, b"\x02hi"))          # only a TXT record
    with pytest.raises(minimail.PermFail, match="no MX and no address"):
        resolver_for(fake_dns).resolve_mx("empty.test")


@pytest.mark.parametrize("rcode, name", [(2, "SERVFAIL"), (5, "REFUSED"), (4, "NOTIMP")])
def test_dns_server_errors_are_temporary(fake_dns, rcode, name):
    fake_dns.handler = lambda query: [dns_reply(query, rcode=rcode)]
    with pytest.raises(minimail.TempFail, match=name):
        resolver_for(fake_dns).resolve_mx("example.test")


def test_dns_servfail_then_next_server(make_dns):
    failing, good = make_dns(), make_dns()
    failing.handler = lambda query: [dns_reply(query, rcode=2)]
    standard_zone(good)
    hosts = resolver_for(failing, good).resolve_mx("example.test")
    assert [host.host for host in hosts] == ["mx1.example.test", "mx2.example.test"]
    assert failing.asked()[0] == ("example.test", T_MX)


def test_dns_timeout_then_next_server(make_dns):
    silent, good = make_dns(), make_dns()
    silent.handler = lambda query: []
    standard_zone(good)
    started = time.monotonic()
    hosts = resolver_for(silent, good, dns_timeout=0.3).resolve_mx("example.test", addresses=False)
    assert [host.host for host in hosts] == ["mx1.example.test", "mx2.example.test"]
    assert silent.asked() == [("example.test", T_MX)] and time.monotonic() - started >= 0.3


def test_dns_timeout_everywhere_is_temporary_and_bounded(make_dns):
    first, second = make_dns(), make_dns()
    first.handler = second.handler = lambda query: []
    started = time.monotonic()
    with pytest.raises(minimail.TempFail, match="timed out"):
        resolver_for(first, second, dns_timeout=0.2, dns_attempts=2).resolve_mx("example.test")
    assert 0.8 <= time.monotonic() - started < 3
    assert len(first.queries) == len(second.queries) == 2      # attempts: rounds over servers


def test_dns_unreachable_server_fails_over_at_once(fake_dns):
    standard_zone(fake_dns)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.settimeout(5)
    closed.bind(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()                  # nothing listens there: ICMP port unreachable
    started = time.monotonic()
    hosts = resolver_for(address, fake_dns, dns_timeout=5.0).resolve_mx("example.test")
    assert hosts[0].host == "mx1.example.test" and time.monotonic() - started < 2.5


def test_dns_truncated_reply_retried_over_tcp(fake_dns):
    standard_zone(fake_dns)

    def handler(query):
        if query.transport == "udp" and query.qtype == T_MX:
            return [dns_reply(query, [mx_rr("example.test", 99, "partial.test")], tc=True)]
        return fake_dns.answer(query)

    fake_dns.handler = handler
    hosts = resolver_for(fake_dns).resolve_mx("example.test")
    assert [host.host for host in hosts] == ["mx1.example.test", "mx2.example.test"]
    assert fake_dns.asked("tcp") == [("example.test", T_MX)]


@pytest.mark.parametrize("tcp_reply", [
    struct.pack("!H", 1000) + b"\x00" * 10,          # shorter than its length prefix, then closed
    b"\x01",                                         # half a length prefix
])
def test_dns_bad_tcp_reply_is_temporary(fake_dns, tcp_reply):
    def handler(query):
        if query.transport == "udp":
            return [dns_reply(query, tc=True)]
        return [tcp_reply]

    fake_dns.handler = handler
    fake_dns.frame_tcp = False
    with pytest.raises(minimail.TempFail, match="TCP"):
        resolver_for(fake_dns).resolve_mx("example.test")


def test_dns_silent_tcp_server_times_out(fake_dns):
    release = threading.Event()

    def handler(query):
        if query.transport == "udp":
            return [dns_reply(query, tc=True)]
        release.wait(5)              # hold the connection open without answering
        return []

    fake_dns.handler = handler
    started = time.monotonic()
    try:
        with pytest.raises(minimail.TempFail, match="timed out"):
            resolver_for(fake_dns, dns_timeout=0.3).resolve_mx("example.test")
    finally:
        release.set()
    assert time.monotonic() - started < 2


def test_dns_cname_followed_within_the_answer(fake_dns):
    fake_dns.handler = lambda query: [dns_reply(query, [
        cname_rr("alias.test", "real.test"), mx_rr("real.test", 10, "mx.real.test")])]
    hosts = resolver_for(fake_dns).resolve_mx("alias.test", addresses=False)
    assert hosts_of(hosts) == [(10, "mx.real.test", [])]
    assert fake_dns.asked() == [("alias.test", T_MX)]


def test_dns_cname_target_asked_when_not_answered(fake_dns):
    fake_dns.add(cname_rr("alias.test", "real.test"), mx_rr("real.test", 10, "mx.real.test"),
                 cname_rr("mx.real.test", "host.real.test"), a_rr("host.real.test", "192.0.2.7"))
    hosts = resolver_for(fake_dns).resolve_mx("alias.test")
    assert hosts_of(hosts) == [(10, "mx.real.test", ["192.0.2.7"])]
    assert fake_dns.asked()[:2] == [("alias.test", T_MX), ("real.test", T_MX)]


def test_dns_cname_loop_is_bounded(fake_dns):
    fake_dns.add(cname_rr("a.test", "b.test"), cname_rr("b.test", "a.test"))
    with pytest.raises(minimail.TempFail, match="CNAME"):
        resolver_for(fake_dns).resolve_mx("a.test")
    assert len(fake_dns.queries) <= 10


def test_dns_idn_goes_out_as_punycode(fake_dns):
    fake_dns.add(mx_rr("xn--bcher-kva.example", 10, "MX.XN--BCHER-KVA.Example"))
    hosts = resolver_for(fake_dns).resolve_mx("Bücher.example", addresses=False)
    assert hosts_of(hosts) == [(10, "mx.xn--bcher-kva.example", [])]
    assert fake_dns.queries[0].name == "xn--bcher-kva.example"


def test_dns_names_compare_case_insensitively(fake_dns):
    fake_dns.handler = lambda query: [dns_reply(
        query, [mx_rr("EXAMPLE.test", 10, "Mx1.Example.Test")], question=("ExAmPlE.TeSt", T_MX))]
    hosts = resolver_for(fake_dns).resolve_mx("example.test", addresses=False)
    assert [host.host for host in hosts] == ["mx1.example.test"]


def test_dns_bad_exchange_names_are_skipped(fake_dns):
    fake_dns.add(mx_rr("example.test", 5, "bad_name.test"), mx_rr("example.test", 10, "good.test"))
    hosts = resolver_for(fake_dns).resolve_mx("example.test", addresses=False)
    assert [host.host for host in hosts] == ["good.test"]


def test_dns_host_without_address_kept_with_empty_list(fake_dns):
    fake_dns.add(mx_rr("example.test", 10, "gone.test"), mx_rr("example.test", 20, "mx.test"),
                 a_rr("mx.test", "192.0.2.5"))
    hosts = resolver_for(fake_dns).resolve_mx("example.test")
    assert hosts_of(hosts) == [(10, "gone.test", []), (20, "mx.test", ["192.0.2.5"])]
    assert ("gone.test", T_AAAA) not in fake_dns.asked()        # no AAAA after NXDOMAIN for A


def test_dns_no_host_with_an_address_fails(fake_dns):
    """RFC 5321 5.1: MX records none of which is usable are an error."""
    fake_dns.add(mx_rr("example.test", 10, "gone.test"), mx_rr("broken.test", 10, "flaky.test"),
                 rr("nomx.test", 16, b"\x02hi"))
    resolver = resolver_for(fake_dns, dns_timeout=0.2)
    with pytest.raises(minimail.PermFail, match="no MX host") as failure:
        resolver.resolve_mx("example.test")
    assert failure.value.status == "5.4.4"                  # RFC 3463: unable to route
    fake_dns.handler = lambda query: (fake_dns.answer(query) if query.qtype == T_MX
                                      else [dns_reply(query, rcode=2)])
    with pytest.raises(minimail.TempFail, match="SERVFAIL"):
        resolver.resolve_mx("broken.test")
    with pytest.raises(minimail.TempFail, match="SERVFAIL"):     # an implicit MX alike
        resolver.resolve_mx("nomx.test")


def test_dns_delivery_resolves_ten_mx_hosts_at_most(fake_dns):
    for number in range(15):
        fake_dns.add(mx_rr("many.test", number, "mx%d.test" % number),
                     a_rr("mx%d.test" % number, "192.0.2.%d" % number))
    resolver = resolver_for(fake_dns)
    assert len(resolver.resolve_mx("many.test", addresses=False)) == 15
    hosts = resolver.resolve_mx("many.test")
    assert hosts_of(hosts) == [(number, "mx%d.test" % number, ["192.0.2.%d" % number])
                               for number in range(10)]
    assert len(fake_dns.queries) == 1 + 2 * 10


def test_dns_additional_addresses_only_for_exchanges(fake_dns):
    standard_zone(fake_dns)

    def handler(query):
        if query.qtype != T_MX:
            return fake_dns.answer(query)
        return [dns_reply(query, [mx_rr("example.test", 10, "mx1.example.test"),
                                  mx_rr("example.test", 20, "mx2.example.test")],
                          additional=[a_rr("mx1.example.test", "2001:db8::99"),
                                      a_rr("MX1.example.test", "192.0.2.99"),
                                      a_rr("evil.test", "203.0.113.1"),
                                      a_rr("mx2.example.test.evil.test", "203.0.113.2")])]

    fake_dns.handler = handler
    hosts = resolver_for(fake_dns).resolve_mx("example.test")
    assert hosts_of(hosts) == [(10, "mx1.example.test", ["192.0.2.99", "2001:db8::99"]),
                               (20, "mx2.example.test", ["192.0.2.2"])]
    assert ("mx1.example.test", T_A) not in fake_dns.asked()
    assert ("mx2.example.test", T_A) in fake_dns.asked()


def test_dns_ipv6_nameserver(make_dns):
    try:
        server = make_dns("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    standard_zone(server)
    hosts = resolver_for(server).resolve_mx("example.test")
    assert hosts[0].addresses == ["192.0.2.1", "2001:db8::1"]


# Anti-spoofing (RFC 5452 9).

def _other_source(query, data):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(data, query.client)


SPOOFS = {
    "wrong id": lambda query, answer: dns_reply(query, answer, qid=query.id ^ 0x5555),
    "wrong name": lambda query, answer: dns_reply(query, answer, question=("evil.test", query.qtype)),
    "wrong type": lambda query, answer: dns_reply(query, answer, question=(query.name, T_A)),
    "not a response": lambda query, answer: dns_reply(query, answer, flags=0x0100),
    "wrong source": lambda query, answer: _other_source(query, dns_reply(query, answer)),
}


@pytest.mark.parametrize("kind", sorted(SPOOFS))
def test_dns_spoofed_replies_ignored(fake_dns, kind):
    evil = [mx_rr("example.test", 1, "evil.test")]
    real = [mx_rr("example.test", 10, "mx.example.test")]

    def handler(query):
        spoof = SPOOFS[kind](query, evil)
        return [spoof] * 3 + [dns_reply(query, real)] if spoof else [dns_reply(query, real)]

    fake_dns.handler = handler
    hosts = resolver_for(fake_dns).resolve_mx("example.test", addresses=False)
    assert [host.host for host in hosts] == ["mx.example.test"]
    fake_dns.handler = lambda query: [spoof for spoof in [SPOOFS[kind](query, evil)] if spoof]
    with pytest.raises(minimail.TempFail, match="timed out"):
        resolver_for(fake_dns, dns_timeout=0.2).resolve_mx("other.test", addresses=False)


def test_dns_query_ids_and_source_ports_vary(fake_dns):
    fake_dns.add(*[a_rr("h%d.test" % number, "192.0.2.%d" % number) for number in range(10)])
    resolver = resolver_for(fake_dns)
    for number in range(10):
        assert resolver.lookup("h%d.test" % number, T_A).records == ("192.0.2.%d" % number,)
    assert len({query.id for query in fake_dns.queries}) >= 9
    assert len({query.client[1] for query in fake_dns.queries}) >= 9


# The cache (TTL, RFC 2308 negative caching, bounded size, threads).

def test_dns_cache_answers_repeated_lookups(fake_dns):
    standard_zone(fake_dns)
    resolver = resolver_for(fake_dns)
    first = hosts_of(resolver.resolve_mx("example.test"))
    count = len(fake_dns.queries)
    assert hosts_of(resolver.resolve_mx("example.test")) == first
    assert len(fake_dns.queries) == count


def test_dns_cache_honours_ttl(fake_dns):
    fake_dns.add(mx_rr("zero.test", 10, "mx.zero.test", ttl=0),
                 mx_rr("short.test", 10, "mx.test", ttl=1))
    resolver = resolver_for(fake_dns)
    for _ in range(2):
        resolver.resolve_mx("zero.test", addresses=False)
    assert fake_dns.asked().count(("zero.test", T_MX)) == 2     # TTL 0: never cached
    resolver.resolve_mx("short.test", addresses=False)
    resolver.resolve_mx("short.test", addresses=False)
    assert fake_dns.asked().count(("short.test", T_MX)) == 1
    assert wait_for(lambda: resolver.resolve_mx("short.test", addresses=False)
                    and fake_dns.asked().count(("short.test", T_MX)) == 2, timeout=5)


def test_dns_negative_answers_cached_by_soa(fake_dns):
    """RFC 2308 5: negative answers are cached for the SOA's TTL, and not without an SOA."""
    fake_dns.add(a_rr("plain.test", "192.0.2.9"))
    resolver = resolver_for(fake_dns)
    for _ in range(2):
        with pytest.raises(minimail.PermFail):
            resolver.resolve_mx("nowhere.test")
        resolver.resolve_mx("plain.test")                   # NODATA for MX and AAAA
    assert fake_dns.asked().count(("nowhere.test", T_MX)) == 1
    assert fake_dns.asked().count(("plain.test", T_MX)) == 1
    assert fake_dns.asked().count(("plain.test", T_AAAA)) == 1
    fake_dns.soa = None
    for _ in range(2):
        with pytest.raises(minimail.PermFail):
            resolver.resolve_mx("gone.test")
    assert fake_dns.asked().count(("gone.test", T_MX)) == 2


def test_dns_cache_is_bounded(fake_dns):
    fake_dns.add(*[a_rr("h%d.test" % number, "192.0.2.%d" % number) for number in range(3)])
    resolver = resolver_for(fake_dns, dns_cache_size=2)
    for number in (0, 1, 2, 2, 1):
        resolver.lookup("h%d.test" % number, T_A)
    assert len(resolver.cache) == 2
    assert [name for name, _ in fake_dns.asked()] == ["h0.test", "h1.test", "h2.test"]
    resolver.lookup("h0.test", T_A)                          # evicted: asked again
    assert len(fake_dns.queries) == 4 and len(resolver.cache) == 2


def test_dns_resolver_shared_by_threads(fake_dns):
    standard_zone(fake_dns)
    fake_dns.add(*[mx_rr("d%d.test" % number, 10, "mx1.example.test") for number in range(8)])
    resolver = resolver_for(fake_dns)
    results = {}

    def resolve(number):
        results[number] = hosts_of(resolver.resolve_mx("d%d.test" % number))

    threads = [threading.Thread(target=resolve, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {number: [(10, "mx1.example.test", ["192.0.2.1", "2001:db8::1"])]
                       for number in range(8)}


# Configuration: resolv.conf, --dns.

def test_dns_resolv_conf_parsing(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("# comment\n; comment\nsearch example.test\nnameserver not-an-ip\n"
                    "nameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver fe80::1%lo\n"
                    "nameserver 192.0.2.54\noptions ndots:2 timeout:3 attempts:4\n")
    assert minimail.read_resolv_conf(str(path)) == (
        (("192.0.2.53", 53), ("2001:db8::53", 53), ("fe80::1%lo", 53)), 3.0, 4)
    path.write_text("options timeout:99 attempts:9\n")         # glibc's caps; no server: local
    assert minimail.read_resolv_conf(str(path)) == ((("127.0.0.1", 53),), 30.0, 5)
    assert minimail.read_resolv_conf(str(tmp_path / "missing")) == ((("127.0.0.1", 53),), 5.0, 2)


def test_dns_settings_from_config_or_resolv_conf(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.53\noptions timeout:3 attempts:4\n")
    config = minimail.Config(resolv_conf=str(path))
    resolver = minimail.Resolver(config)
    assert resolver.settings() == ((("192.0.2.53", 53),), 3.0, 4)
    path.write_text("nameserver 192.0.2.99\n")
    os.utime(str(path), ns=(1, 1))                            # a changed file is read again
    assert resolver.settings() == ((("192.0.2.99", 53),), 5.0, 2)
    resolver = minimail.Resolver(dataclasses.replace(config, dns_timeout=0.5, dns_attempts=1))
    assert resolver.settings() == ((("192.0.2.99", 53),), 0.5, 1)
    resolver = minimail.Resolver(dataclasses.replace(config, dns=(("192.0.2.1", 5353),)))
    assert resolver.settings() == ((("192.0.2.1", 5353),), 5.0, 2)


@pytest.mark.parametrize("text, server", [
    ("192.0.2.1", ("192.0.2.1", 53)), ("192.0.2.1:5353", ("192.0.2.1", 5353)),
    ("[2001:db8::1]:5353", ("2001:db8::1", 5353)), ("[::1]", ("::1", 53)), ("::1", ("::1", 53)),
    ("2001:db8::1", ("2001:db8::1", 53))])
def test_dns_parse_nameserver(text, server):
    assert minimail.parse_nameserver(text) == server


@pytest.mark.parametrize("text", ["", "ns.example.test", "192.0.2.1:0", "192.0.2.1:x", "[::1",
                                  "[::1]:99999", "off", "192.0.2.1:53:53x"])
def test_dns_parse_nameserver_rejects(text):
    with pytest.raises(ValueError):
        minimail.parse_nameserver(text)


def test_dns_option_of_serve(tmp_path):
    args = minimail.build_parser().parse_args(["--dns", "192.0.2.1", "--dns", "[::1]:5353"])
    config = minimail.config_from_args(args)
    assert config.dns == (("192.0.2.1", 53), ("::1", 5353))
    assert minimail.App(config).resolver.settings()[0] == config.dns
    result = run_cli("--help")
    assert "--dns HOST[:PORT]" in result.stdout and "/etc/resolv.conf" in result.stdout


def test_dns_module_level_resolve_mx(fake_dns):
    standard_zone(fake_dns)
    config = minimail.Config(dns=(fake_dns.address,), dns_timeout=2.0, dns_attempts=1)
    assert hosts_of(minimail.resolve_mx("example.test", config))[1] == (
        20, "mx2.example.test", ["192.0.2.2"])


# The mx command (SPEC 2).

def run_mx(server, *args):
    return run_cli("mx", *args, "--dns", "%s:%d" % server.address)


def test_dns_mx_command_prints_delivery_order(fake_dns):
    standard_zone(fake_dns)
    fake_dns.add(mx_rr("noaddr.test", 10, "Gone.Example.TEST"))
    result = run_mx(fake_dns, "example.test")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "10 mx1.example.test\n20 mx2.example.test\n", "")
    result = run_mx(fake_dns, "plain.test")                 # implicit MX
    assert (result.returncode, result.stdout) == (0, "0 plain.test\n")
    result = run_mx(fake_dns, "noaddr.test")                # printed without an address
    assert (result.returncode, result.stdout) == (0, "10 gone.example.test\n")
    assert ("gone.example.test", T_A) not in fake_dns.asked()


@pytest.mark.parametrize("domain, code, message", [
    ("nowhere.test", 1, "NXDOMAIN"), ("null.test", 1, "null MX"), ("empty.test", 1, "no MX"),
    ("servfail.test", 75, "SERVFAIL"), ("bad_domain!", 2, "domain")])
def test_dns_mx_command_failures(fake_dns, domain, code, message):
    fake_dns.add(mx_rr("null.test", 0, ""), rr("empty.test", 16, b"\x02hi"))

    def handler(query):
        if query.name == "servfail.test":
            return [dns_reply(query, rcode=2)]
        return fake_dns.answer(query)

    fake_dns.handler = handler
    result = run_mx(fake_dns, domain)
    assert result.returncode == code and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("minimail: ")
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "DOMAIN"), (["example.test", "--dns", "ns.example.test"], "--dns"),
    (["example.test", "--bogus"], "unrecognized")])
def test_dns_mx_command_usage_errors(args, message):
    result = run_cli("mx", *args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert message in result.stderr and "Traceback" not in result.stderr


DNSMASQ = "/usr/sbin/dnsmasq"


@pytest.mark.skipif(not os.access(DNSMASQ, os.X_OK),
                    reason="dnsmasq not installed (Debian package dnsmasq-base)")
def test_dns_through_real_dnsmasq(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(5)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--pid-file=", "--listen-address=127.0.0.1", "--bind-interfaces", "--port=%d" % port,
            "--log-facility=-", "--local=/example.test/",
            "--mx-host=example.test,mx1.example.test,10", "--mx-host=example.test,mx2.example.test,5",
            "--mx-host=null.example.test,.,0",
            "--host-record=mx1.example.test,192.0.2.1,2001:db8::1",
            "--host-record=mx2.example.test,192.0.2.2", "--host-record=plain.example.test,192.0.2.9"]
    if os.geteuid() == 0:
        args.append("--user=root")
    with open(str(tmp_path / "dnsmasq.log"), "wb") as log_file:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=log_file)
    try:
        resolver = resolver_for(("127.0.0.1", port), dns_timeout=0.5)

        def answers():
            try:
                return resolver.resolve_mx("example.test")
            except minimail.TempFail:
                return process.poll() is not None      # stop waiting if dnsmasq died

        hosts = wait_for(answers, timeout=10)
        assert process.poll() is None, (tmp_path / "dnsmasq.log").read_text()
        assert hosts_of(hosts) == [(5, "mx2.example.test", ["192.0.2.2"]),
                                   (10, "mx1.example.test", ["192.0.2.1", "2001:db8::1"])]
        assert hosts_of(resolver.resolve_mx("plain.example.test")) == [
            (0, "plain.example.test", ["192.0.2.9"])]
        with pytest.raises(minimail.PermFail, match="NXDOMAIN"):
            resolver.resolve_mx("nowhere.example.test")
        result = run_cli("mx", "example.test", "--dns", "127.0.0.1:%d" % port)
        assert (result.returncode, result.stdout) == (0, "5 mx2.example.test\n10 mx1.example.test\n")
        result = run_cli("mx", "null.example.test", "--dns", "127.0.0.1:%d" % port)
        assert result.returncode == 1 and "null MX" in result.stderr
    finally:
        process.terminate()
        process.wait(10)
