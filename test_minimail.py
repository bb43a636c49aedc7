"""Tests for minimail: real servers on port 0, real clients, real files."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import poplib
import shutil
import signal
import smtplib
import socket
import ssl
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
                                "--domain", "example.test", "--smtp", "127.0.0.1:0",
                                "--pop3", "127.0.0.1:0", *args],
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


# --- POP3 ------------------------------------------------------------------------------

class RawPOP3(Raw):
    """A raw-socket POP3 client: status lines, and multi-line bodies exactly as sent."""

    def __init__(self, port, host="127.0.0.1"):
        super().__init__(port, host, greeting=False)
        self.greeting = self.status()

    def status(self):
        return self.read_line().rstrip(b"\r\n")

    def command(self, line):
        self.send(line + b"\r\n")
        return self.status()

    def body(self):
        """The rest of a multi-line reply, as sent: CRLF lines, still byte-stuffed."""
        lines = []
        while True:
            line = self.read_line()
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line)

    def login(self, user=b"u@example.test", password=b"pw"):
        assert self.command(b"USER " + user).startswith(b"+OK")
        status = self.command(b"PASS " + password)
        assert status.startswith(b"+OK"), status


@pytest.fixture
def pop(make_server):
    return make_server(pop3=("127.0.0.1", 0))


ALICE = (("alice@example.test", "secret"),)


def pop_client(app, user="u@example.test", password="pw"):
    client = poplib.POP3("127.0.0.1", app.pop3_port, timeout=5)
    client.user(user)
    client.pass_(password)
    return client


def put_message(app, mailbox, name, content, folder="new"):
    """Store a file as another program would (no size tags unless the name has them)."""
    path = os.path.join(app.maildir.ensure(mailbox), folder, name)
    with open(path, "wb") as file:
        file.write(content)
    return path


def wire_form(content):
    """How RFC 1939 sends a stored message, computed independently of minimail:
    (octets counted by LIST, the bytes RETR sends before its final '.' line)."""
    lines = content.split(b"\n")
    rest = lines.pop()
    wire = [line + (b"\n" if line.endswith(b"\r") else b"\r\n") for line in lines]
    if rest:
        wire.append(rest + b"\r\n")
    return len(b"".join(wire)), b"".join(b"." + line if line.startswith(b".") else line
                                         for line in wire)


def box_files(app, mailbox="u@example.test"):
    """{folder: sorted names} of a mailbox's new/ and cur/."""
    root = app.maildir.path(mailbox)
    return {folder: sorted(os.listdir(os.path.join(root, folder))) for folder in ("new", "cur")}


def wait_for_login(app, user=b"u@example.test", password=b"pw"):
    """Log in as soon as the previous session has released the mailbox; return the client."""
    def attempt():
        client = RawPOP3(app.pop3_port)
        client.command(b"USER " + user)
        if client.command(b"PASS " + password).startswith(b"+OK"):
            return client
        client.close()
        return None
    client = wait_for(attempt)
    assert client is not None
    return client


def test_pop3_retrieves_what_smtp_delivered(pop):
    message = b"Subject: hello\r\n\r\n.leading dot\r\n\xc3\xa9t\xc3\xa9 8-bit\r\nend\r\n"
    with smtp_client(pop.smtp_port) as client:
        client.sendmail("a@sender.test", ["u@example.test"], message)
    stored = read_stored(pop, "u@example.test")
    message_id = minimail.message_id_of(os.path.basename(delivered(pop, "u@example.test")[0]))
    client = pop_client(pop)
    try:
        count, total = client.stat()
        _, listing, _ = client.list()
        response, lines, octets = client.retr(1)
        assert client.uidl(1).split() == [b"+OK", b"1", message_id.encode()]
        assert client.uidl()[1] == [b"1 " + message_id.encode()]
    finally:
        client.quit()
    assert (count, listing) == (1, [b"1 %d" % total])
    assert response == b"+OK %d octets" % total and octets == total
    assert b"\n".join(lines) + b"\n" == stored
    assert total == len(stored) + stored.count(b"\n")


@pytest.mark.parametrize("content", [
    b"Subject: x\n\n.one dot\n..two dots\n.\nlast\n",      # '.'-leading lines, bare LF
    b"Subject: x\r\n\r\n.crlf\r\nbody\r\n",                  # CRLF on disk
    b"Subject: x\n\nmixed\r\nends\nno final newline",
    b"Subject: \xff\xfe 8-bit\n\n\x00\x80\xe9\n",           # 8-bit and NUL bytes
    b"bare\rcr\r\n\rx\r",                                   # bare CR stays, a last CR too
    b"", b"\n", b".", b"\r\n.\r\n",
    b"x" * 65535 + b"\r\n.split CRLF at a read boundary\n" + b"y" * 70000 + b"\n.z",
    b"Subject: big\n\n" + b"".join(b".%d\n" % n for n in range(40000)),
])
def test_pop3_octets_match_the_bytes_retr_sends(pop, content):
    """RFC 1939 11: the octet count is the size with CRLF line ends before byte-stuffing."""
    put_message(pop, "u@example.test", "1700000000.foreign", content)
    octets, sent = wire_form(content)
    with RawPOP3(pop.pop3_port) as client:
        client.login()
        assert client.command(b"STAT") == b"+OK 1 %d" % octets
        assert client.command(b"LIST 1") == b"+OK 1 %d" % octets
        assert client.command(b"LIST") == b"+OK 1 messages"
        assert client.body() == b"1 %d\r\n" % octets
        assert client.command(b"RETR 1") == b"+OK %d octets" % octets
        assert client.body() == sent


def test_pop3_octets_of_tagged_smtp_copy_match_retr(pop):
    with Raw(pop.smtp_port) as client:
        transaction(client, rcpts=(b"u@example.test",))
        assert client.command(b"DATA")[0] == 354
        assert client.command(b"..dot\r\nbare\nlf\r\n\xe9\r\n.")[0] == 250
    name = os.path.basename(delivered(pop, "u@example.test")[0])
    assert ",S=" in name and ",W=" in name
    with open(delivered(pop, "u@example.test")[0], "rb") as file:
        octets, sent = wire_form(file.read())
    with RawPOP3(pop.pop3_port) as client:
        client.login()
        assert client.command(b"RETR 1") == b"+OK %d octets" % octets
        assert client.body() == sent
        assert client.command(b"STAT") == b"+OK 1 %d" % octets


def test_pop3_top_sends_headers_blank_line_and_n_lines(pop):
    put_message(pop, "u@example.test", "1.a", b"H1: a\nH2: b\n\nl1\n.l2\nl3\n")
    put_message(pop, "u@example.test", "2.b", b"H1: a\r\n\r\nbody\r\n")
    put_message(pop, "u@example.test", "3.c", b"Only: headers\nNo: body")
    with RawPOP3(pop.pop3_port) as client:
        client.login()
        assert client.command(b"TOP 1 0").startswith(b"+OK")
        assert client.body() == b"H1: a\r\nH2: b\r\n\r\n"
        assert client.command(b"TOP 1 2").startswith(b"+OK")
        assert client.body() == b"H1: a\r\nH2: b\r\n\r\nl1\r\n..l2\r\n"
        assert client.command(b"TOP 1 99").startswith(b"+OK")
        assert client.body() == b"H1: a\r\nH2: b\r\n\r\nl1\r\n..l2\r\nl3\r\n"
        assert client.command(b"TOP 2 0").startswith(b"+OK")
        assert client.body() == b"H1: a\r\n\r\n"
        assert client.command(b"TOP 3 0").startswith(b"+OK")
        assert client.body() == b"Only: headers\r\nNo: body\r\n"
        for bad in (b"TOP 1", b"TOP 1 x", b"TOP 9 0", b"TOP 1 -1"):
            assert client.command(bad).startswith(b"-ERR"), bad
        assert client.command(b"QUIT") == b"+OK Bye"
    assert box_files(pop)["cur"] == []          # TOP does not mark a message seen


def test_pop3_uidl_is_the_message_id_stable_across_restarts(tmp_path):
    config = base_config(tmp_path, pop3=("127.0.0.1", 0))
    long_id, odd_id = "x" * 80, "\u00e9t\u00e9 id"
    with running(config) as app:
        with smtp_client(app.smtp_port) as client:
            client.sendmail("a@sender.test", ["u@example.test"], b"x\r\n")
        smtp_id = minimail.message_id_of(os.path.basename(delivered(app, "u@example.test")[0]))
        put_message(app, "u@example.test", "0001.seen,S=2:2,S", b"x\n", folder="cur")
        put_message(app, "u@example.test", long_id, b"y\n")
        put_message(app, "u@example.test", odd_id, b"z\n")
        with RawPOP3(app.pop3_port) as client:
            client.login()
            assert client.command(b"UIDL").startswith(b"+OK")
            first = client.body()
            assert client.command(b"UIDL 2").startswith(b"+OK 2 ")
    with running(config) as app:
        with RawPOP3(app.pop3_port) as client:
            client.login()
            assert client.command(b"UIDL").startswith(b"+OK")
            assert client.body() == first
    uidls = [line.split(b" ")[1].decode() for line in first.splitlines()]
    assert uidls[:2] == ["0001.seen", smtp_id]
    for uidl in uidls[2:]:          # not valid unique-ids: replaced by a hash
        assert uidl not in (long_id, odd_id)
        assert 1 <= len(uidl) <= 70 and all(0x21 <= ord(c) <= 0x7e for c in uidl)
    assert len(set(uidls)) == 4


def test_pop3_mailbox_is_the_list_at_login(pop):
    put_message(pop, "u@example.test", "1.first", b"one\n")
    with RawPOP3(pop.pop3_port) as client:
        client.login()
        with smtp_client(pop.smtp_port) as sender:
            sender.sendmail("a@sender.test", ["u@example.test"], b"Subject: later\r\n\r\nx\r\n")
        assert client.command(b"STAT") == b"+OK 1 5"
        assert client.command(b"LIST 2") == b"-ERR No such message"
        assert client.command(b"QUIT") == b"+OK Bye"
    with RawPOP3(pop.pop3_port) as client:
        client.login()
        assert client.command(b"STAT").startswith(b"+OK 2 ")


def test_pop3_numbers_never_shift_after_dele(pop):
    for number in range(1, 4):
        put_message(pop, "u@example.test", "%d.msg" % number, b"message %d\n" % number)
    with RawPOP3(pop.pop3_port) as client:
        client.login()
        assert client.command(b"DELE 2") == b"+OK Message 2 deleted"
        assert client.command(b"LIST").startswith(b"+OK")
        assert client.body() == b"1 11\r\n3 11\r\n"
        assert client.command(b"UIDL").startswith(b"+OK")
        assert client.body() == b"1 1.msg\r\n3 3.msg\r\n"
        assert client.command(b"STAT") == b"+OK 2 22"
        for line in (b"RETR 2", b"DELE 2", b"LIST 2", b"UIDL 2", b"TOP 2 0"):
            assert client.command(line) == b"-ERR No such message", line
        assert client.command(b"RETR 3") == b"+OK 11 octets"
        assert client.body() == b"message 3\r\n"
        assert client.command(b"RSET").startswith(b"+OK")
        assert client.command(b"STAT") == b"+OK 3 33"
        assert client.command(b"LIST 2") == b"+OK 2 11"


def test_pop3_dele_applies_only_at_quit(pop):
    put_message(pop, "u@example.test", "1.msg", b"one\n")
    put_message(pop, "u@example.test", "2.msg", b"two\n", folder="cur")
    with RawPOP3(pop.pop3_port) as client:
        client.login()
        assert client.command(b"DELE 1").startswith(b"+OK")
        assert client.command(b"DELE 2").startswith(b"+OK")
        assert box_files(pop) == {"new": ["1.msg"], "cur": ["2.msg"]}
        assert client.command(b"QUIT") == b"+OK Bye"
    assert box_files(pop) == {"new": [], "cur": []}


@pytest.mark.parametrize("ending", ["drop", "timeout"])
def test_pop3_session_ended_without_quit_changes_nothing(make_server, ending):
    """RFC 1939 6: without QUIT there is no UPDATE state."""
    app = make_server(pop3=("127.0.0.1", 0), timeout=0.5 if ending == "timeout" else 5.0)
    put_message(app, "u@example.test", "1.msg", b"one\n")
    put_message(app, "u@example.test", "2.msg", b"two\n")
    client = RawPOP3(app.pop3_port)
    client.login()
    assert client.command(b"DELE 1").startswith(b"+OK")
    assert client.command(b"RETR 2").startswith(b"+OK")
    client.body()
    if ending == "timeout":
        assert client.status() == b"-ERR Disconnected for inactivity"
        assert client.closed()
    client.close()
    wait_for_login(app).close()         # the mailbox lock was released
    assert box_files(app) == {"new": ["1.msg", "2.msg"], "cur": []}


def test_pop3_retrieved_messages_marked_seen_at_quit(pop):
    put_message(pop, "u@example.test", "1.msg,S=4", b"one\n")
    put_message(pop, "u@example.test", "2.msg", b"two\n")
    put_message(pop, "u@example.test", "3.msg:2,F", b"three\n", folder="cur")
    client = pop_client(pop)
    client.retr(1)
    client.retr(3)
    client.top(2, 0)
    client.quit()
    assert box_files(pop) == {"new": ["2.msg"], "cur": ["1.msg,S=4:2,S", "3.msg:2,FS"]}


def test_pop3_second_session_gets_in_use(make_server):
    app = make_server(pop3=("127.0.0.1", 0), users=ALICE)
    with RawPOP3(app.pop3_port) as first, RawPOP3(app.pop3_port) as second:
        first.login(b"alice@example.test", b"secret")
        assert second.command(b"USER alice@example.test").startswith(b"+OK")
        assert second.command(b"PASS secret").startswith(b"-ERR [IN-USE] ")
        plain = base64.b64encode(b"\x00alice@example.test\x00secret")
        assert second.command(b"AUTH PLAIN " + plain).startswith(b"-ERR [IN-USE] ")
        assert first.command(b"QUIT") == b"+OK Bye"
        assert wait_for(lambda: second.command(b"AUTH PLAIN " + plain).startswith(b"+OK"))
        assert second.command(b"STAT") == b"+OK 0 0"


def test_pop3_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    """SPEC 5: a kernel lock, so a killed process never leaves the mailbox locked."""
    process, lines = start_cli(tmp_path, "-q")
    holder = None
    try:
        port = int([line for line in lines if " pop3 listening on " in line][0].rsplit(":", 1)[1])
        holder = RawPOP3(port)
        holder.login()
        config = base_config(tmp_path, maildir=str(tmp_path / "md"), pop3=("127.0.0.1", 0))
        with running(config) as app:
            with RawPOP3(app.pop3_port) as client:
                assert client.command(b"USER u@example.test").startswith(b"+OK")
                assert client.command(b"PASS pw").startswith(b"-ERR [IN-USE] ")
                process.kill()
                process.wait(20)
                assert client.command(b"USER u@example.test").startswith(b"+OK")
                assert client.command(b"PASS pw").startswith(b"+OK")
    finally:
        if holder is not None:
            holder.close()
        process.kill()
        process.communicate(timeout=20)


def test_pop3_message_moved_or_removed_by_another_client(pop):
    for number in range(1, 4):
        put_message(pop, "u@example.test", "%d.msg" % number, b"message %d\n" % number)
    with RawPOP3(pop.pop3_port) as client:
        client.login()
        first, second, third = pop.maildir.messages("u@example.test")
        pop.maildir.set_flags(first, "S")       # as the web page marks a message read
        pop.maildir.set_flags(second, "F")
        os.unlink(third.path)
        assert client.command(b"RETR 1") == b"+OK 11 octets"
        assert client.body() == b"message 1\r\n"
        assert client.command(b"RETR 3").startswith(b"-ERR")
        assert client.command(b"DELE 2").startswith(b"+OK")
        assert client.command(b"QUIT") == b"+OK Bye"
    assert box_files(pop) == {"new": [], "cur": ["1.msg:2,S"]}


def test_pop3_unreadable_entry_is_left_out(pop):
    put_message(pop, "u@example.test", "1.msg", b"one\n")
    os.mkdir(os.path.join(pop.maildir.path("u@example.test"), "new", "2.not-a-file"))
    with RawPOP3(pop.pop3_port) as client:
        client.login()
        assert client.command(b"STAT") == b"+OK 1 5"


def test_pop3_auth_plain_with_and_without_initial_response(make_server):
    app = make_server(pop3=("127.0.0.1", 0), users=ALICE)
    plain = base64.b64encode(b"\x00Alice@Example.TEST\x00secret")
    with RawPOP3(app.pop3_port) as client:
        assert client.command(b"AUTH") == b"+OK Mechanisms follow"
        assert client.body() == b"PLAIN\r\n"
        assert client.command(b"AUTH PLAIN " + plain).startswith(b"+OK")
        assert client.command(b"STAT") == b"+OK 0 0"
        assert client.command(b"QUIT") == b"+OK Bye"
    with RawPOP3(app.pop3_port) as client:
        assert client.command(b"AUTH PLAIN") == b"+ "
        assert client.command(plain).startswith(b"+OK")
        assert client.command(b"USER alice@example.test") == b"-ERR Already logged in"


@pytest.mark.parametrize("exchange", [
    [b"AUTH PLAIN", b"*"], [b"AUTH PLAIN !!!notbase64"], [b"AUTH PLAIN", b"abc"],
    [b"AUTH PLAIN " + base64.b64encode(b"no-nul-bytes")], [b"AUTH LOGIN"], [b"AUTH CRAM-MD5"],
    [b"AUTH PLAIN", b"A" * 13000]])
def test_pop3_auth_bad_exchanges(make_server, exchange):
    app = make_server(pop3=("127.0.0.1", 0), users=ALICE)
    with RawPOP3(app.pop3_port) as client:
        for line in exchange:
            reply = client.command(line)
        assert reply.startswith(b"-ERR ") and not reply.startswith(b"-ERR [AUTH]"), reply
        assert client.command(b"CAPA").startswith(b"+OK")
        client.body()
        assert client.command(b"AUTH PLAIN " + base64.b64encode(
            b"\x00alice@example.test\x00secret")).startswith(b"+OK")


def test_pop3_wrong_passwords_delayed_then_closed(make_server):
    app = make_server(pop3=("127.0.0.1", 0), users=ALICE, auth_failure_delay=0.2)
    put_message(app, "bob@example.test", "1.msg", b"x\n")
    with RawPOP3(app.pop3_port) as client:
        start = time.monotonic()
        assert client.command(b"USER alice@example.test").startswith(b"+OK")
        assert client.command(b"PASS wrong").startswith(b"-ERR [AUTH] ")
        assert time.monotonic() - start >= 0.2
        assert client.command(b"USER bob@example.test").startswith(b"+OK")    # no account
        assert client.command(b"PASS secret").startswith(b"-ERR [AUTH] ")
        plain = base64.b64encode(b"bob@example.test\x00alice@example.test\x00secret")
        assert client.command(b"AUTH PLAIN " + plain).startswith(b"-ERR [AUTH] ")
        assert client.command(b"PASS secret") == b"-ERR Send USER first"
        assert client.command(b"USER alice@example.test").startswith(b"+OK")
        assert client.command(b"PASS wrong").startswith(b"-ERR [AUTH] ")
        assert client.closed()


def test_pop3_dev_sink_opens_any_mailbox_on_loopback(pop):
    put_message(pop, "someone@elsewhere.test", "1.msg", b"x\n")
    with RawPOP3(pop.pop3_port) as client:
        assert client.command(b"USER SomeOne@Elsewhere.test").startswith(b"+OK")
        assert client.command(b"PASS anything at all").startswith(b"+OK")
        assert client.command(b"STAT") == b"+OK 1 3"
    for user in (b"not-an-address", b"../x@example.test", b".hidden@example.test", b"\xff@x.test"):
        with RawPOP3(pop.pop3_port) as client:
            assert client.command(b"USER " + user).startswith(b"+OK")
            assert client.command(b"PASS pw").startswith(b"-ERR [AUTH] "), user
    assert sorted(os.listdir(pop.maildir.root)) == ["someone@elsewhere.test"]


def test_pop3_plaintext_login_refused_off_loopback(make_server):
    app = make_server(pop3=("127.0.0.1", 0), users=ALICE, loopback_networks=())
    with RawPOP3(app.pop3_port) as client:
        assert client.command(b"CAPA").startswith(b"+OK")
        capabilities = client.body().split(b"\r\n")
        assert b"USER" not in capabilities and not any(c.startswith(b"SASL") for c in capabilities)
        assert b"STLS" not in capabilities          # no certificate given
        for line in (b"USER alice@example.test", b"PASS secret",
                     b"AUTH PLAIN " + base64.b64encode(b"\x00alice@example.test\x00secret")):
            assert client.command(line) == b"-ERR [AUTH] use STLS"


@pytest.fixture
def pop_tls(make_server, tls_files):
    cert, key = tls_files
    return make_server(pop3=("127.0.0.1", 0), tls_cert=cert, tls_key=key, users=ALICE,
                       loopback_networks=())


def test_pop3_stls_then_login(pop_tls):
    with RawPOP3(pop_tls.pop3_port) as client:
        assert client.command(b"CAPA").startswith(b"+OK")
        assert b"STLS\r\n" in client.body()
        assert client.command(b"STLS").startswith(b"+OK")
        client.sock = client_tls_context().wrap_socket(client.sock)
        assert client.command(b"CAPA").startswith(b"+OK")
        capabilities = client.body().split(b"\r\n")
        assert b"USER" in capabilities and b"SASL PLAIN" in capabilities
        assert b"STLS" not in capabilities
        assert client.command(b"STLS").startswith(b"-ERR")
        client.login(b"alice@example.test", b"secret")
        assert client.command(b"STAT") == b"+OK 0 0"


def test_pop3_stls_discards_plaintext_and_resets_session(make_server, tls_files):
    """RFC 2595 4: pipelined plaintext is discarded; nothing from before TLS is kept."""
    cert, key = tls_files
    app = make_server(pop3=("127.0.0.1", 0), tls_cert=cert, tls_key=key, users=ALICE)
    with RawPOP3(app.pop3_port) as client:
        assert client.command(b"USER alice@example.test").startswith(b"+OK")
        client.send(b"STLS\r\nUSER alice@example.test\r\n")
        assert client.status().startswith(b"+OK")
        client.sock = client_tls_context().wrap_socket(client.sock)
        assert client.command(b"PASS secret") == b"-ERR Send USER first"
        client.login(b"alice@example.test", b"secret")
        assert client.command(b"STLS").startswith(b"-ERR")


def test_pop3_tls_handshake_garbage_closes_quietly(pop_tls):
    with RawPOP3(pop_tls.pop3_port) as client:
        assert client.command(b"STLS").startswith(b"+OK")
        client.send(b"this is not a TLS client hello\r\n" * 10)
        assert client.closed()
    with RawPOP3(pop_tls.pop3_port) as client:
        assert client.command(b"CAPA").startswith(b"+OK")


def test_pop3_passwords_masked_in_debug_log(make_server, caplog):
    caplog.set_level(logging.DEBUG, logger="minimail")
    app = make_server(pop3=("127.0.0.1", 0), users=ALICE)
    with RawPOP3(app.pop3_port) as client:
        client.login(b"alice@example.test", b"secret")
        assert client.command(b"QUIT") == b"+OK Bye"
    with RawPOP3(app.pop3_port) as client:
        assert client.command(b"AUTH PLAIN") == b"+ "
        assert client.command(base64.b64encode(b"\x00alice@example.test\x00secret")).startswith(
            b"+OK")
    assert wait_for(lambda: "p2 << b'AUTH PLAIN'" in caplog.text)
    assert "PASS ****" in caplog.text and "secret" not in caplog.text
    assert base64.b64encode(b"\x00alice@example.test\x00secret").decode() not in caplog.text


def test_pop3_capa_lists_capabilities(pop):
    with RawPOP3(pop.pop3_port) as client:
        assert client.greeting.startswith(b"+OK ")
        assert client.command(b"CAPA").startswith(b"+OK")
        capabilities = client.body().split(b"\r\n")[:-1]
    assert capabilities == [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING",
                            b"USER", b"SASL PLAIN", b"IMPLEMENTATION minimail"]


def test_pop3_pipelined_commands_answered_in_order(pop):
    put_message(pop, "u@example.test", "1.msg", b".x\n")
    with RawPOP3(pop.pop3_port) as client:
        client.send(b"USER u@example.test\r\nPASS pw\r\nSTAT\r\nLIST\r\nRETR 1\r\nUIDL 1\r\n"
                    b"NOOP\r\nQUIT\r\n")
        assert [client.status() for _ in range(4)] == [
            b"+OK Send PASS", b"+OK Logged in, 1 messages", b"+OK 1 4", b"+OK 1 messages"]
        assert client.body() == b"1 4\r\n"
        assert client.status() == b"+OK 4 octets"
        assert client.body() == b"..x\r\n"
        assert [client.status() for _ in range(3)] == [b"+OK 1 1.msg", b"+OK", b"+OK Bye"]
        assert client.closed()


def test_pop3_commands_need_their_state(pop):
    with RawPOP3(pop.pop3_port) as client:
        for line in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 0", b"UIDL",
                     b"STLS", b"PASS pw", b"USER", b"BOGUS", b"RETR\x001", "NÖOP".encode(),
                     b"pop___class__", b""):
            assert client.command(line).startswith(b"-ERR "), line
        client.login()
        for line in (b"USER u@example.test", b"PASS pw", b"AUTH PLAIN", b"RETR x", b"RETR 0",
                     b"LIST 1 2", b"DELE 99999999999"):
            assert client.command(line).startswith(b"-ERR "), line
        assert client.command(b"NOOP") == b"+OK"


def test_pop3_quit_before_login_closes(pop):
    with RawPOP3(pop.pop3_port) as client:
        assert client.command(b"QUIT") == b"+OK Bye"
        assert client.closed()


@pytest.mark.parametrize("length, runs", [(510, True), (511, False)])
def test_pop3_command_line_limit(pop, length, runs):
    """SPEC 5: 512 octets with CRLF; a longer line gets one -ERR and is not run."""
    with RawPOP3(pop.pop3_port) as client:
        reply = client.command(b"QUIT" + b" " * (length - 4))
        if runs:
            assert reply == b"+OK Bye" and client.closed()
        else:
            assert reply == b"-ERR Line too long"
            assert client.command(b"CAPA").startswith(b"+OK")


def test_pop3_overlong_line_is_bounded_and_never_run(pop):
    with RawPOP3(pop.pop3_port) as client:
        client.send(b"QUIT " + b"x" * 100000 + b"\r\nCAPA\r\n")
        assert client.status() == b"-ERR Line too long"
        assert client.status().startswith(b"+OK Capability")


def test_pop3_connection_cap(make_server):
    app = make_server(pop3=("127.0.0.1", 0), max_connections=1)
    with RawPOP3(app.pop3_port) as first:
        with Raw(app.pop3_port, greeting=False) as second:
            assert second.read_line().startswith(b"-ERR [SYS/TEMP] ")
            assert second.closed()
        assert first.command(b"CAPA").startswith(b"+OK")


def test_pop3_list_reads_no_message_bodies_once_sizes_are_known(pop):
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs Linux /proc/self/io to count bytes read")
    body = b"line of text\n" * 20000               # 260 kB each, no size tags
    for number in range(20):
        put_message(pop, "u@example.test", "%d.untagged" % number, body)

    def bytes_read():
        with open("/proc/self/io") as file:
            return int(file.readline().split()[1])     # rchar

    def session():
        client = pop_client(pop)
        client.stat()
        client.list()
        client.uidl()
        client.quit()

    before = bytes_read()
    session()
    first = bytes_read() - before
    before = bytes_read()
    session()
    second = bytes_read() - before
    assert first >= 20 * len(body)              # the first session counted line ends
    assert second < len(body)                   # later ones stat() the files, nothing more


def test_pop3_remembered_listing_follows_every_change(pop):
    """A listing reused while new/ and cur/ are unchanged still sees every change made."""
    put_message(pop, "u@example.test", "1.msg", b"one\n")
    put_message(pop, "u@example.test", "2.msg", b"two\n")
    folders = [os.path.join(pop.maildir.path("u@example.test"), sub) for sub in ("new", "cur")]

    def settle():                               # as if the last change were a minute ago
        for folder in folders:
            os.utime(folder, (time.time() - 60, time.time() - 60))

    def uidls():
        client = pop_client(pop)
        try:
            return [line.split()[1] for line in client.uidl()[1]]
        finally:
            client.quit()

    settle()
    assert uidls() == [b"1.msg", b"2.msg"]
    assert pop.maildir.listings.get("u@example.test") is not None     # remembered
    with smtp_client(pop.smtp_port) as client:
        client.sendmail("a@sender.test", ["u@example.test"], b"x\r\n")
    assert len(uidls()) == 3
    settle()
    uidls()
    first, second = pop.maildir.messages("u@example.test")[:2]
    pop.maildir.set_flags(first, "S")
    os.unlink(second.path)
    client = pop_client(pop)
    assert [line.split()[1] for line in client.uidl()[1]][0] == b"1.msg"
    assert client.stat()[0] == 2
    client.retr(1)
    client.quit()


def test_app_refuses_non_loopback_pop3_without_accounts(tmp_path):
    app = minimail.App(base_config(tmp_path, pop3=("0.0.0.0", 0)))
    with pytest.raises(minimail.ConfigError, match="pop3 .*needs accounts"):
        app.start()
    result = run_cli("--maildir", str(tmp_path), "--smtp", "off", "--pop3", "0.0.0.0:0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "needs accounts" in result.stderr
    app = minimail.App(base_config(tmp_path, pop3=("0.0.0.0", 0), users=ALICE))
    app.start()
    app.stop()


def test_cli_pop3_option_and_startup_line(tmp_path):
    result = run_cli("--help")
    assert "--pop3 ADDR" in result.stdout and "127.0.0.1:1110" in result.stdout
    process, lines = start_cli(tmp_path, "-q", "--smtp", "off")
    try:
        assert [line.split(" on ")[0] for line in lines] == [
            "minimail: pop3 listening", "minimail: mail stored in %s\n" % (tmp_path / "md")]
        port = int(lines[0].rsplit(":", 1)[1])
        assert port != 0
        with RawPOP3(port) as client:
            client.login()
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=20)[1]
    assert process.returncode == 0 and rest == ""
    process, lines = start_cli(tmp_path, "-q", "--pop3", "off")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=20)
    assert not any(" pop3 listening" in line for line in lines)


@pytest.mark.skipif(not shutil.which("mpop"), reason="mpop not installed (Debian package mpop)")
def test_pop3_mpop_from_readme(tmp_path, pop):
    with smtp_client(pop.smtp_port) as client:
        client.sendmail("a@sender.test", ["me@example.test"], b"Subject: mpop\r\n\r\n.dot\r\nx\r\n")
    inbox = tmp_path / "Mail"
    for sub in ("tmp", "new", "cur"):
        (inbox / sub).mkdir(parents=True)
    result = subprocess.run(
        ["mpop", "--host=127.0.0.1", "--port=%d" % pop.pop3_port, "--tls=off", "--auth=user",
         "--user=me@example.test", "--passwordeval=echo any", "--delivery=maildir,%s" % inbox,
         "--uidls-file=%s" % (tmp_path / "uidls")],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=dict(os.environ, HOME=str(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    fetched = os.listdir(inbox / "new")
    assert len(fetched) == 1
    assert (inbox / "new" / fetched[0]).read_bytes().endswith(b"Subject: mpop\n\n.dot\nx\n")
    assert box_files(pop, "me@example.test") == {"new": [], "cur": []}     # mpop deleted it


@pytest.mark.skipif(not shutil.which("fetchmail"),
                    reason="fetchmail not installed (Debian package fetchmail)")
def test_pop3_fetchmail_from_readme(tmp_path, pop):
    with smtp_client(pop.smtp_port) as client:
        client.sendmail("a@sender.test", ["me@example.test"], b"Subject: fm\r\n\r\nhello\r\n")
    rcfile = tmp_path / "fetchmailrc"
    rcfile.write_text('poll 127.0.0.1 protocol pop3 port %d user "me@example.test" password "any"'
                      " sslproto '' keep mda \"cat > %s/fetched.eml\"\n" % (pop.pop3_port, tmp_path))
    rcfile.chmod(0o600)
    result = subprocess.run(["fetchmail", "-f", str(rcfile), "--nosyslog", "--pidfile",
                             str(tmp_path / "fetchmail.pid")],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, HOME=str(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "fetched.eml").read_bytes().endswith(b"Subject: fm\n\nhello\n")
    assert box_files(pop, "me@example.test")["cur"] != []      # kept, and marked seen
