"""Tests for minimail: real servers on port 0, real clients, real files."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import poplib
import re
import select
import shutil
import signal
import smtplib
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import minimail

HERE = os.path.dirname(os.path.abspath(__file__))
MINIMAIL = os.path.join(HERE, "minimail.py")


# --- Helpers and fixtures -------------------------------------------------------------

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
                  timeout=5.0, pop3_lock_wait=0.1)
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


def smtp_client(port, timeout=5, **kwargs):
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=timeout, **kwargs)


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


# --- Config and helpers ---------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("1025", ("127.0.0.1", 1025)), ("0.0.0.0:25", ("0.0.0.0", 25)),
    ("[::1]:2525", ("::1", 2525)), ("localhost:0", ("localhost", 0)), ("off", None)])
def test_config_parse_addr(text, expected):
    assert minimail.parse_addr(text) == expected


@pytest.mark.parametrize("text", ["", "host:", ":25", "[::1]", "x:99999", "a:b", "::1", "::1:25"])
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


# --- SMTP: the normal path ------------------------------------------------------------

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



@pytest.mark.parametrize("helo", [b"x%sy", b"fe80::1%eth0", b"100%%"])
def test_smtp_percent_signs_in_trace_values(make_server, helo):
    app = make_server(hostname="host%sname")
    with Raw(app.smtp_port) as client:
        assert client.command(b"EHLO " + helo)[0] == 250
        assert client.command(b"MAIL FROM:<a@sender.test>")[0] == 250
        assert client.command(b"RCPT TO:<u@example.test>")[0] == 250
        assert client.command(b"DATA")[0] == 354
        assert client.command(b"x\r\n.")[0] == 250
    stored = read_stored(app, "u@example.test")
    assert b"Received: from " + helo + b" ([127.0.0.1])\n\tby host%sname (minimail)" in stored


def test_smtp_control_characters_in_sender_refused(mail):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"EHLO c")[0] == 250
        code, lines = client.command(b'MAIL FROM:<"a\\\x1b[31mb"@sender.test>')
        assert (code, lines[0][4:9]) == (553, "5.1.7")


def test_smtp_storage_full_during_data_is_a_451_after_the_data(tmp_path):
    """A write error (here: the file size limit) is answered once the data has ended."""
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000)); "
              "sys.path.insert(0, %r); import minimail; sys.exit(minimail.main(sys.argv[1:]))" % HERE)
    process = subprocess.Popen([sys.executable, "-c", script, "--maildir", str(tmp_path / "md"),
                                "--domain", "example.test", "--smtp", "127.0.0.1:0", "--pop3", "off",
                                "--http", "off"], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        lines = [process.stderr.readline() for _ in range(2)]
        port = int([line for line in lines if " smtp listening on " in line][0].rsplit(":", 1)[1])
        with Raw(port) as client:
            transaction(client)
            assert client.command(b"DATA")[0] == 354
            client.send(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 400 + b".\r\n")
            code, lines = client.read_reply()
            assert (code, lines[0][4:9]) == (451, "4.3.0")
            assert client.command(b"NOOP")[0] == 250
        assert not os.listdir(tmp_path / "md" / "user@example.test" / "new")
        assert not os.listdir(tmp_path / "md" / "user@example.test" / "tmp")
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=20)[1]
    assert "Traceback" not in rest and "storing message failed" in rest


# --- SMTP: recipient policy -----------------------------------------------------------

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
    (b" SIZE=abc", 501), (b" SIZE", 501), (b" BODY", 501), (b" BODY=BINARYMIME", 501), (b" RET=HDRS", 555), (b" SMTPUTF8=yes", 555)])
def test_smtp_mail_parameters(mail, params, code):
    with Raw(mail.smtp_port) as client:
        assert client.command(b"EHLO client.test")[0] == 250
        assert client.command(b"MAIL FROM:<a@sender.test>" + params)[0] == code


def test_smtp_received_header_names_one_recipient(mail):
    with smtp_client(mail.smtp_port) as client:
        client.sendmail("a@sender.test", ["u@example.test", "v@example.test"], b"x\r\n")
    stored = read_stored(mail, "u@example.test")
    assert b"for <u@example.test>" in stored and b"v@example.test" not in stored


# --- SMTP: sizes and limits -----------------------------------------------------------

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


@pytest.mark.parametrize("line", [b"EHLO a\x1bb", b"NO\x00OP", b"\xff\xfe", "NÖOP".encode(), b"smtp___class__",
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
        assert client.command(b"MAIL FROM:<a@sender.test>")[0] == 250
        assert client.command(b"RCPT TO:<user@example.test>")[0] == 250
        assert client.command(b"DATA")[0] == 354
        client.send(headers[headers.index(b"\n") + 1:] + b"\r\nReceived: in body\r\n.\r\n")
        assert client.code() == 250
    assert len(delivered(mail, "user@example.test")) == 1


def test_smtp_loop_count_ends_at_a_blank_line_split_across_chunks(mail):
    received = b"Received: from hop by x; Sat, 1 Jan 2022 00:00:00 +0000\r\n" * 60
    with Raw(mail.smtp_port) as client:
        transaction(client)
        client.send(b"BDAT 12\r\nSubject: x\r\n")        # the header's blank line comes next
        assert client.code() == 250
        client.send(b"BDAT %d LAST\r\n\r\n%s" % (len(received) + 2, received))
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


def test_smtp_overlong_line_cannot_be_drip_fed_past_the_timeout(make_server):
    app = make_server(timeout=0.5)
    with Raw(app.smtp_port) as client:
        start = time.monotonic()
        client.send(b"NOOP\r\n" + b"x" * 20000)       # an over-long line read in with the NOOP
        assert client.code() == 250
        for _ in range(30):                 # then a byte each 0.1 s, never its LF
            try:
                client.send(b"x")
            except OSError:
                break
            time.sleep(0.1)
        assert client.code() == 421
        assert time.monotonic() - start < 2.5


def test_smtp_client_that_stops_reading_is_closed_quietly(make_server, caplog):
    caplog.set_level(logging.INFO, logger="minimail")
    app = make_server(timeout=0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # fills at once
    sock.connect(("127.0.0.1", app.smtp_port))

    def pipeline_without_reading():
        try:
            sock.sendall(b"NOOP\r\n" * 1000000)
        except OSError:
            pass
    threading.Thread(target=pipeline_without_reading, daemon=True).start()
    try:
        assert wait_for(lambda: "client stopped reading" in caplog.text)
    finally:
        sock.close()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


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
    # Slots come back when clients leave (once the server has seen them go).
    assert wait_for(lambda: not app.servers["smtp"].connections)
    with Raw(app.smtp_port) as again:
        assert again.command(b"NOOP")[0] == 250


# --- SMTP: smuggling and line ends ----------------------------------------------------

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


# --- SMTP: BDAT (RFC 3030) ------------------------------------------------------------

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


def test_smtp_bdat_large_chunk_then_pipelined_commands(mail):
    body = b"".join(b"line %06d\r\n" % i for i in range(20000))     # many socket reads
    with Raw(mail.smtp_port) as client:
        transaction(client)
        client.send(b"BDAT %d\r\n%sBDAT 0 LAST\r\nNOOP\r\n" % (len(body), body))
        assert [client.code() for _ in range(3)] == [250, 250, 250]
    assert body_of(read_stored(mail, "user@example.test")) == body.replace(b"\r\n", b"\n")


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


# --- SMTP: AUTH -----------------------------------------------------------------------

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


# --- SMTP: STARTTLS -------------------------------------------------------------------

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


# --- SMTP: concurrency and durability -------------------------------------------------

def test_smtp_concurrent_senders_store_every_message_once(mail):
    errors = []

    def sender(thread_number):
        try:
            for number in range(50):
                with smtp_client(mail.smtp_port, timeout=30) as client:    # a loaded CI box
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


def test_storage_start_removes_stale_tmp_files(make_server, tmp_path):
    def leave(directory, name, age_s):
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        with open(path, "wb") as file:
            file.write(b"half a message")
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path
    box = tmp_path / "maildir" / "user@example.test"
    os.makedirs(box / "new")
    stale, fresh = leave(box / "tmp", "crashed", 40 * 3600), leave(box / "tmp", "writing", 60)
    queue_tmp = tmp_path / "maildir" / ".queue" / "tmp"
    queue_stale, queue_fresh = leave(queue_tmp, "x.json", 40 * 3600), leave(queue_tmp, "y.eml", 60)
    make_server()
    assert not os.path.exists(stale) and os.path.exists(fresh)
    assert wait_for(lambda: not os.path.exists(queue_stale))       # the relay's first queue scan
    assert os.path.exists(queue_fresh)


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


# --- App and command line -------------------------------------------------------------

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
    (["--hostname", "mx.test\r\n250 evil"], "--hostname"), (["--hostname", "mx test"], "--hostname"),
    (["--hostname", "mx\x7f.test"], "--hostname"), (["--hostname", ""], "--hostname"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, args, message):
    result = run_cli("--maildir", str(tmp_path), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr



@pytest.mark.parametrize("layout", ["maildir is a file", ".queue is a file"])
def test_cli_queue_unreadable_is_one_line_exit_2(tmp_path, layout):
    maildir = tmp_path / "md"
    if layout == "maildir is a file":
        maildir.write_bytes(b"x")
    else:
        maildir.mkdir()
        (maildir / ".queue").write_bytes(b"x")
    result = run_cli("queue", "--maildir", str(maildir))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "queue" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def start_cli(tmp_path, *args):
    """Start minimail as a process; return it and its startup lines (ports read from them)."""
    process = subprocess.Popen([sys.executable, MINIMAIL, "--maildir", str(tmp_path / "md"),
                                "--domain", "example.test", "--smtp", "127.0.0.1:0",
                                "--pop3", "127.0.0.1:0", "--http", "127.0.0.1:0", *args],
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


# --- Maildir reading ------------------------------------------------------------------

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


def test_maildir_directory_sync_group_commit(tmp_path):
    syncer = minimail.DirectorySync()
    folder = str(tmp_path)
    errors = []

    def work():
        try:
            for _ in range(50):
                syncer.sync(folder)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and syncer.folders == {}
    with pytest.raises(OSError):
        syncer.sync(str(tmp_path / "missing"))
    assert syncer.folders == {}


# --- Relay ----------------------------------------------------------------------------

class FakeSMTP:
    """A scriptable SMTP server that records every message it accepts.

    Replies are queued per stage with will(): "MAIL", "RCPT <address>", "DATA" (the 354)
    and "END" (after the data); otherwise the server says 250. A reply may be a function,
    called when the reply is due, that returns the reply.
    """

    def __init__(self, host="127.0.0.1", port=0, features=("PIPELINING", "8BITMIME", "SMTPUTF8"),
                 tls_files=None, auth=None, ehlo=True, greeting="220 fake.test ESMTP"):
        self.features = list(features)
        self.tls_files = tls_files
        self.auth = auth                    # (user, password) required, or None
        self.ehlo = ehlo
        self.greeting = greeting
        self.replies = {}
        self.messages = []                  # dicts: sender, params, rcpts, data, tls, auth
        self.sessions = []                  # the command lines of every session
        self.changed = threading.Condition()
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                fake._serve(self.request)

        self.server = socketserver.ThreadingTCPServer((host, port), Handler, bind_and_activate=False)
        self.server.daemon_threads = True
        self.server.allow_reuse_address = True
        self.server.server_bind()
        self.server.server_activate()
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def will(self, stage, *replies):
        with self.changed:
            self.replies.setdefault(stage, []).extend(replies)

    def _reply(self, stage, default):
        with self.changed:
            queued = self.replies.get(stage)
            reply = queued.pop(0) if queued else default
        return reply() if callable(reply) else reply

    def wait_messages(self, count, timeout=10):
        with self.changed:
            self.changed.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def _serve(self, sock):
        session = {"sock": sock, "commands": [], "tls": False, "auth": None}
        with self.changed:
            self.sessions.append(session["commands"])
        try:
            sock.settimeout(10)
            self._converse(session)
        except (OSError, ValueError):
            pass
        finally:
            session["sock"].close()

    def _converse(self, session):
        reader = session["sock"].makefile("rb")

        def send(line):
            session["sock"].sendall(line.encode() + b"\r\n")

        send(self.greeting)
        envelope = None
        while True:
            line = reader.readline(100000)
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = text.split(" ")[0].upper()
            session["commands"].append(text)
            if verb == "EHLO" and self.ehlo:
                lines = ["fake.test"] + self.features
                if self.tls_files and not session["tls"]:
                    lines.append("STARTTLS")
                if self.auth:
                    lines.append("AUTH PLAIN LOGIN")
                send("\r\n".join("250-" + item for item in lines[:-1]) + "\r\n250 " + lines[-1])
            elif verb == "HELO":
                send("250 fake.test")
            elif verb == "STARTTLS" and self.tls_files:
                send("220 2.0.0 go ahead")
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(*self.tls_files)
                session["sock"] = context.wrap_socket(session["sock"], server_side=True)
                reader = session["sock"].makefile("rb")
                session["tls"] = True
            elif verb == "AUTH" and self.auth:
                _, user, password = base64.b64decode(text.split(" ")[2]).split(b"\0")
                session["auth"] = (user.decode(), password.decode())
                send("235 2.7.0 ok" if session["auth"] == tuple(self.auth) else "535 5.7.8 no")
            elif verb == "MAIL":
                reply = self._reply("MAIL", "250 2.1.0 ok")
                if reply.startswith("2"):
                    sender, _, params = text[10:].partition(">")
                    envelope = {"sender": sender.lstrip("<"), "params": params.split(),
                                "rcpts": [], "tls": session["tls"], "auth": session["auth"]}
                send(reply)
            elif verb == "RCPT":
                address = text[8:].strip("<>")
                reply = self._reply("RCPT " + address, "250 2.1.5 ok")
                if reply.startswith("2"):
                    envelope["rcpts"].append(address)
                send(reply)
            elif verb == "DATA":
                reply = self._reply("DATA", "354 go ahead")
                send(reply)
                if reply.startswith("354"):
                    lines = []
                    while True:
                        data_line = reader.readline(100000)
                        if data_line in (b".\r\n", b""):
                            break
                        lines.append(data_line[1:] if data_line.startswith(b".") else data_line)
                    reply = self._reply("END", "250 2.0.0 queued")
                    if reply.startswith("2"):
                        envelope["data"] = b"".join(lines)
                        with self.changed:
                            self.messages.append(envelope)
                            self.changed.notify_all()
                    send(reply)
            elif verb == "RSET":
                envelope = None
                send("250 2.0.0 ok")
            elif verb == "QUIT":
                send("221 2.0.0 bye")
                return
            else:
                send("502 5.5.2 not here")


@pytest.fixture
def fake_smtp():
    fakes = []

    def make(**kwargs):
        fake = FakeSMTP(**kwargs)
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.close()


@pytest.fixture
def raw_peer():
    """Port-0 listeners that run serve(connection, stop) on each connection, for peers that
    misbehave in ways FakeSMTP cannot. Returns the port."""
    peers = []

    def start(serve):
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.1)
        stop = threading.Event()

        def accept_loop():
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                except socket.timeout:
                    continue
                with connection:
                    connection.settimeout(10)
                    try:
                        serve(connection, stop)
                    except OSError:
                        pass

        thread = threading.Thread(target=accept_loop)
        thread.start()
        peers.append((listener, stop, thread))
        return listener.getsockname()[1]

    yield start
    for listener, stop, thread in peers:
        stop.set()
        thread.join(10)
        listener.close()


RELAY_USER = ("alice@example.test", "secret")


def relay_server(make_server, fake, **overrides):
    fields = dict(smarthost=("127.0.0.1", fake.port), users=(RELAY_USER,), retry_delay=0.05)
    fields.update(overrides)
    return make_server(**fields)


def send_authenticated(app, rcpts, message=b"Subject: relay\r\n\r\nhello\r\n",
                       sender="alice@example.test", **options):
    with smtp_client(app.smtp_port) as client:
        client.login(*RELAY_USER)
        return client.sendmail(sender, rcpts, message, **options)


def queue_empty(app):
    return app.queue.ids() == []


def test_relay_authenticated_client_relays_via_smarthost(make_server, fake_smtp):
    fake = fake_smtp()
    app = relay_server(make_server, fake)
    send_authenticated(app, ["bob@remote.test", "alice@example.test", "carol@remote.test"])
    message, = fake.wait_messages(1)
    assert message["sender"] == "alice@example.test"
    assert message["rcpts"] == ["bob@remote.test", "carol@remote.test"]
    assert message["data"].startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    assert b"\r\nSubject: relay\r\n\r\nhello\r\n" in message["data"]
    assert b"Return-Path" not in message["data"] and b"Delivered-To" not in message["data"]
    assert len(delivered(app, "alice@example.test")) == 1          # the local copy
    assert wait_for(lambda: queue_empty(app))
    assert len(fake.wait_messages(1)) == 1


def test_relay_from_network_may_relay_without_auth(make_server, fake_smtp):
    fake = fake_smtp()
    app = make_server(smarthost=("127.0.0.1", fake.port), relay_from=("127.0.0.0/8",))
    with smtp_client(app.smtp_port) as client:
        client.sendmail("x@sender.test", ["bob@remote.test"], b"Subject: r\r\n\r\nx\r\n")
    assert fake.wait_messages(1)[0]["rcpts"] == ["bob@remote.test"]


@pytest.mark.parametrize("overrides", [{}, {"relay_from": ("10.0.0.0/8",)}, {"submission": ("127.0.0.1", 0)}])
def test_relay_open_relay_refused(make_server, fake_smtp, overrides):
    fake = fake_smtp()
    app = make_server(smarthost=("127.0.0.1", fake.port), **overrides)
    ports = [app.smtp_port] + ([app.submission_port] if "submission" in overrides else [])
    for port in ports:
        with Raw(port) as client:
            assert client.command(b"EHLO client.test")[0] == 250
            if port != app.smtp_port:
                assert client.command(b"AUTH PLAIN " + b64(b"\0any\0thing"))[0] == 235
            assert client.command(b"MAIL FROM:<x@sender.test>")[0] == 250
            code, lines = client.command(b"RCPT TO:<victim@remote.test>")
            assert (code, lines[0][4:9]) == (554, "5.7.1")
    assert not os.path.exists(app.queue.folder) or app.queue.ids() == []
    assert fake.sessions == []


def test_relay_retries_after_temporary_failure(make_server, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT bob@remote.test", "451 4.3.0 greylisted, come back later")
    app = relay_server(make_server, fake, retry_delay=1.0)
    send_authenticated(app, ["bob@remote.test"])
    queue = app.queue
    assert wait_for(lambda: queue.ids() and "greylisted" in queue.load(queue.ids()[0]).recipients[0].last_error)
    message, = fake.wait_messages(1)
    assert message["rcpts"] == ["bob@remote.test"]
    assert wait_for(lambda: queue_empty(app))
    assert len(fake.sessions) == 2


def queue_lines(app):
    result = run_cli("queue", "--maildir", app.maildir.root)
    assert result.returncode == 0 and result.stderr == ""
    return result.stdout.splitlines()


def read_dsn(app, mailbox):
    import email
    import email.policy
    files = wait_for(lambda: delivered(app, mailbox))
    assert len(files) == 1
    with open(files[0], "rb") as file:
        return email.message_from_binary_file(file, policy=email.policy.default)


def dsn_fields(message):
    """The per-recipient field blocks of a delivery-status part."""
    part = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"][0]
    return [dict(block.items()) for block in part.get_payload()[1:]]


def test_relay_permanent_failure_bounces_with_dsn(make_server, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT bob@remote.test", "550 5.1.1 <bob@remote.test>: no such user")
    app = relay_server(make_server, fake)
    send_authenticated(app, ["bob@remote.test", "carol@remote.test"],
                       b"Subject: original subject\r\nX-Trace: 42\r\n\r\nbody\r\n")
    assert fake.wait_messages(1)[0]["rcpts"] == ["carol@remote.test"]
    dsn = read_dsn(app, "alice@example.test")
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["From"].addresses[0].username == "MAILER-DAEMON"
    assert read_stored(app, "alice@example.test").startswith(b"Return-Path: <>\n")
    fields, = dsn_fields(dsn)
    assert fields["Final-Recipient"] == "rfc822; bob@remote.test"
    assert fields["Action"] == "failed" and fields["Status"] == "5.1.1"
    assert fields["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    headers = [p for p in dsn.walk() if p.get_content_type() == "text/rfc822-headers"][0]
    original = headers.get_content() if hasattr(headers, "get_content") else headers.get_payload()
    assert "Subject: original subject" in str(original) and "X-Trace: 42" in str(original)
    assert wait_for(lambda: queue_empty(app))


def test_relay_control_characters_in_a_reply_stay_on_one_bounce_line(make_server, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT bob@remote.test", "550 5.1.1 no such user\r--X\rContent-Type: text/html\r\r<b>hi</b>")
    app = relay_server(make_server, fake)
    send_authenticated(app, ["bob@remote.test"])
    dsn = read_dsn(app, "alice@example.test")
    assert [part.get_content_type() for part in dsn.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    fields, = dsn_fields(dsn)
    assert fields["Status"] == "5.1.1"
    assert fields["Diagnostic-Code"].startswith("smtp; 550 5.1.1 no such user --X Content-Type:")
    assert fields["Diagnostic-Code"].endswith("<b>hi</b>")
    stored = read_stored(app, "alice@example.test")
    assert b"\r" not in stored
    assert [line for line in stored.split(b"\n") if line.startswith(b"Diagnostic-Code:")] == [
        b"Diagnostic-Code: smtp; 550 5.1.1 no such user --X Content-Type: text/html  <b>hi</b>"]


def test_relay_gives_up_after_queue_lifetime(make_server, fake_smtp):
    fake = fake_smtp()
    port = fake.port
    fake.close()                                    # nothing listens there any more
    app = make_server(smarthost=("127.0.0.1", port), users=(RELAY_USER,), retry_delay=0.05,
                      queue_lifetime=0.6)
    send_authenticated(app, ["bob@remote.test"])
    dsn = read_dsn(app, "alice@example.test")
    fields, = dsn_fields(dsn)
    assert fields["Status"] == "4.4.7" and fields["Action"] == "failed"
    assert "expired" in fields["Diagnostic-Code"]
    assert wait_for(lambda: queue_empty(app))


def test_relay_null_sender_is_never_bounced(make_server, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT bob@remote.test", "550 5.1.1 no such user")
    app = relay_server(make_server, fake)
    with smtp_client(app.smtp_port) as client:
        client.login(*RELAY_USER)
        client.sendmail("", ["bob@remote.test"], b"Subject: a bounce\r\n\r\nx\r\n")
    assert wait_for(lambda: queue_empty(app))
    assert [name for name in all_files(app.maildir.root) if not name.startswith(".queue/")] == []
    assert fake.messages == []


def test_relay_bounce_to_remote_sender_is_queued_from_null_sender(make_server, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT bob@remote.test", "550 5.1.1 no such user")
    app = relay_server(make_server, fake)
    send_authenticated(app, ["bob@remote.test"], sender="someone@elsewhere.test")
    bounce, = fake.wait_messages(1)
    assert bounce["sender"] == "" and bounce["rcpts"] == ["someone@elsewhere.test"]
    assert b"multipart/report" in bounce["data"] and b"Status: 5.1.1" in bounce["data"]
    assert wait_for(lambda: queue_empty(app))


def test_relay_smarthost_auth(make_server, fake_smtp):
    fake = fake_smtp(auth=("relayuser", "relaypass"))
    app = relay_server(make_server, fake, smarthost_auth=("relayuser", "relaypass"))
    send_authenticated(app, ["bob@remote.test"])
    assert fake.wait_messages(1)[0]["auth"] == ("relayuser", "relaypass")


def test_relay_smarthost_auth_failure_defers(make_server, fake_smtp):
    fake = fake_smtp(auth=("relayuser", "relaypass"))
    app = relay_server(make_server, fake, smarthost_auth=("relayuser", "wrong"), retry_delay=60)
    send_authenticated(app, ["bob@remote.test"])
    assert wait_for(lambda: any("authentication failed" in line for line in queue_lines(app)))
    assert fake.messages == []


def test_relay_smarthost_credentials_need_tls_off_loopback(make_server, fake_smtp):
    fake = fake_smtp(auth=("relayuser", "relaypass"))
    app = relay_server(make_server, fake, smarthost_auth=("relayuser", "relaypass"),
                       relay_from=("127.0.0.0/8",), loopback_networks=())
    with smtp_client(app.smtp_port) as client:
        client.sendmail("x@sender.test", ["bob@remote.test"], b"Subject: r\r\n\r\nx\r\n")
    message, = fake.wait_messages(1)
    assert message["auth"] is None
    assert not any(line.startswith("AUTH") for line in fake.sessions[0])


def test_relay_uses_starttls_when_offered(make_server, fake_smtp, tls_files):
    fake = fake_smtp(tls_files=tls_files, auth=("relayuser", "relaypass"))
    app = relay_server(make_server, fake, smarthost_auth=("relayuser", "relaypass"),
                       relay_from=("127.0.0.0/8",), loopback_networks=())
    with smtp_client(app.smtp_port) as client:
        client.sendmail("x@sender.test", ["bob@remote.test"], b"Subject: r\r\n\r\nx\r\n")
    message, = fake.wait_messages(1)
    assert message["tls"] is True and message["auth"] == ("relayuser", "relaypass")



def test_relay_smarthost_by_name_on_loopback_gets_credentials(make_server, fake_smtp):
    fake = fake_smtp(auth=("relayuser", "relaypass"))
    app = relay_server(make_server, fake, smarthost=("localhost", fake.port),
                       smarthost_auth=("relayuser", "relaypass"))
    send_authenticated(app, ["bob@remote.test"])
    assert fake.wait_messages(1)[0]["auth"] == ("relayuser", "relaypass")


def test_relay_to_an_address_literal(make_server, fake_smtp):
    fake = fake_smtp(host="127.0.0.2")
    app = make_server(users=(RELAY_USER,), mx_port=fake.port, retry_delay=0.05)
    send_authenticated(app, ["bob@[127.0.0.2]"])
    assert fake.wait_messages(1)[0]["rcpts"] == ["bob@[127.0.0.2]"]


def test_relay_bounce_that_cannot_be_stored_is_kept_and_retried(make_server, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT bob@remote.test", "550 5.1.1 no such user")
    app = relay_server(make_server, fake, retry_delay=0.3)
    box = os.path.join(app.maildir.root, "alice@example.test")
    os.makedirs(os.path.join(box, "new"))
    os.makedirs(os.path.join(box, "cur"))
    with open(os.path.join(box, "tmp"), "w") as file:       # the bounce cannot be written
        file.write("in the way")
    send_authenticated(app, ["bob@remote.test"])
    queue = app.queue
    assert wait_for(lambda: queue.ids() and queue.load(queue.ids()[0]).recipients[0].state == "failed")
    assert wait_for(lambda: queue.load(queue.ids()[0]).attempts >= 1 and queue.ids())
    os.unlink(os.path.join(box, "tmp"))
    os.mkdir(os.path.join(box, "tmp"))
    fields, = dsn_fields(read_dsn(app, "alice@example.test"))
    assert fields["Status"] == "5.1.1"
    assert wait_for(lambda: queue_empty(app))


def test_relay_helo_fallback_and_size_parameter(make_server, fake_smtp):
    fake = fake_smtp(ehlo=False)
    app = relay_server(make_server, fake)
    send_authenticated(app, ["bob@remote.test"])
    fake.wait_messages(1)
    assert fake.sessions[0][0].startswith("EHLO ") and fake.sessions[0][1].startswith("HELO ")
    fake2 = fake_smtp(features=("SIZE 100000", "8BITMIME"))
    app2 = relay_server(make_server, fake2, maildir=app.maildir.root + "-2")
    send_authenticated(app2, ["bob@remote.test"], b"Subject: s\r\n\r\n" + b"x" * 100 + b"\r\n")
    message, = fake2.wait_messages(1)
    assert any(param.startswith("SIZE=") for param in message["params"])


@pytest.mark.parametrize("features, message, options, status", [
    (("SIZE 50",), b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n", {}, "5.3.4"),
    (("SMTPUTF8",), "Subject: 8bit\r\n\r\ncafé\r\n".encode(), {}, "5.6.3"),
    (("8BITMIME",), b"Subject: utf8\r\n\r\nx\r\n", {"mail_options": ["SMTPUTF8"]}, "5.6.7"),
])
def test_relay_remote_capabilities_bounce(make_server, fake_smtp, features, message, options, status):
    fake = fake_smtp(features=features)
    app = relay_server(make_server, fake)
    send_authenticated(app, ["bob@remote.test"], message, **options)
    fields, = dsn_fields(read_dsn(app, "alice@example.test"))
    assert fields["Status"] == status
    assert fake.messages == []


def test_relay_long_lines_folded_and_dots_stuffed(make_server, fake_smtp):
    fake = fake_smtp()
    app = relay_server(make_server, fake)
    long_line = b"".join(b"%05d" % i for i in range(500))        # 2500 octets
    send_authenticated(app, ["bob@remote.test"],
                       b"Subject: long\r\n\r\n" + long_line + b"\r\n.leading dot\r\n..two\r\nend\r\n")
    data = fake.wait_messages(1)[0]["data"]
    body = data.split(b"\r\n\r\n", 1)[1]
    lines = body.split(b"\r\n")
    assert all(len(line) <= 998 for line in lines)
    assert lines[0] == long_line[:998] and lines[1] == b" " + long_line[998:1995]
    assert lines[2] == b" " + long_line[1995:]
    assert lines[3:6] == [b".leading dot", b"..two", b"end"]


def test_relay_sends_the_final_dot_with_the_last_data(make_server, raw_peer):
    first_data = []

    def smtp_peer(connection, stop):
        def command():
            line = b""
            while not line.endswith(b"\n"):
                data = connection.recv(1000)
                if not data:
                    raise ConnectionError("closed")
                line += data
            return line

        connection.sendall(b"220 peer.test ESMTP\r\n")
        for reply in (b"250 peer.test", b"250 2.1.0 ok", b"250 2.1.5 ok", b"354 go ahead"):
            command()
            connection.sendall(reply + b"\r\n")
        data = connection.recv(65536)                # one write arrives as one segment
        first_data.append(data)
        while not data.endswith(b"\r\n.\r\n"):
            data += connection.recv(65536)
        connection.sendall(b"250 2.0.0 queued\r\n")
        command()
        connection.sendall(b"221 2.0.0 bye\r\n")

    port = raw_peer(smtp_peer)
    app = make_server(smarthost=("127.0.0.1", port), users=(RELAY_USER,), retry_delay=0.05)
    send_authenticated(app, ["bob@remote.test"])
    assert wait_for(lambda: queue_empty(app))
    assert first_data[0].endswith(b"\r\nhello\r\n.\r\n")


def test_relay_chunks_fold_across_blocks(tmp_path):
    path = tmp_path / "message"
    block = minimail.READ_BLOCK
    data = b"a" * (block - 10) + b"\n" + b"b" * 3000 + b"\n.x\nlast"
    path.write_bytes(data)
    wire = b"".join(minimail.relay_chunks(str(path)))
    lines = wire.split(b"\r\n")
    assert all(len(line) <= 998 for line in lines)
    assert b"".join(line[1:] if i and line.startswith(b" ") else line
                    for i, line in enumerate(lines[:-1])).count(b"b") == 3000
    assert lines[-3:] == [b"..x", b"last", b""]


def relay_wire_reference(data):
    """What relay_chunks must yield, computed on the whole message at once."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for line in lines:
        pieces = [line[:998]] + [b" " + line[start:start + 997] for start in range(998, len(line), 997)]
        out += [(b"." if piece.startswith(b".") else b"") + piece + b"\r\n" for piece in pieces]
    return b"".join(out)


BLOCK = minimail.READ_BLOCK


@pytest.mark.parametrize("data", [
    b"a" * 998 + b"\n" + b"b" * 999 + b"\nshort\n",                    # 998 kept, 999 folded
    b"x\n" * 100 + b"c" * 1995 + b"\n" + b"d" * 1996 + b"\n",           # one and two folds
    b"e" * (BLOCK - 999) + b"\n" + b"f" * 998 + b"\n",                  # a long line ends a block
    b"g" * 10 + b"\n" + b"h" * (BLOCK - 11) + b"i" * 500 + b"\n",       # unfinished at the block end
    b"j" * (2 * BLOCK + 5) + b"\n.k\n",                                 # one line over three blocks
    b"l" * (BLOCK - 1) + b"\n" + b".m" * 600,                            # dot at a block start, no LF
    (b"n" * 76 + b"\n") * 2000 + b"o" * 999,                             # a long unfinished last line
], ids=["998-999", "two-folds", "ends-block", "unfinished-at-block-end", "three-blocks",
        "dot-at-block-start", "long-last-line"])
def test_relay_chunks_match_the_whole_message_reference(tmp_path, data):
    path = tmp_path / "message"
    path.write_bytes(data)
    assert b"".join(minimail.relay_chunks(str(path))) == relay_wire_reference(data)


def test_relay_queue_survives_restart(tmp_path, fake_smtp):
    fake = fake_smtp()
    port = fake.port
    fake.close()
    config = base_config(tmp_path, smarthost=("127.0.0.1", port), users=(RELAY_USER,),
                         retry_delay=1.0)
    with running(config) as app:
        send_authenticated(app, ["bob@remote.test"])
        assert wait_for(lambda: any("deferred" in line for line in queue_lines(app)))
    revived = FakeSMTP(port=port)
    try:
        with running(config):
            message, = revived.wait_messages(1)
            assert message["rcpts"] == ["bob@remote.test"]
    finally:
        revived.close()


def test_relay_queue_command_lists_entries(make_server, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT bob@remote.test", "452 4.2.2 mailbox full")
    fake.will("RCPT carol@remote.test", "452 4.2.2 mailbox full")
    app = relay_server(make_server, fake, retry_delay=3600)
    send_authenticated(app, ["bob@remote.test", "carol@remote.test"])
    assert wait_for(lambda: len(fake.sessions) == 1 and "mailbox full" in "".join(queue_lines(app)))
    lines = queue_lines(app)
    message_id, age, sender = lines[0].split(" ")
    assert app.queue.ids() == [message_id] and age.endswith("s") and sender == "<alice@example.test>"
    for line, rcpt in zip(lines[1:], ("bob@remote.test", "carol@remote.test")):
        assert line.startswith("  %s deferred 1 " % rcpt)
        fields = line.split(" ", 6)
        assert fields[5].endswith("s") and "452 4.2.2 mailbox full" in fields[6]


def test_relay_crash_after_partial_delivery_sends_nothing_twice(tmp_path, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT carol@remote.test", "451 4.3.0 later")
    maildir = tmp_path / "md"
    args = ["--smarthost", "127.0.0.1:%d" % fake.port, "--user", "%s:%s" % RELAY_USER,
            "--retry-delay", "3600"]
    process, lines = start_cli(tmp_path, *args)
    port = int([line for line in lines if " smtp listening on " in line][0].rsplit(":", 1)[1])
    try:
        with smtp_client(port) as client:
            client.login(*RELAY_USER)
            client.sendmail("alice@example.test", ["bob@remote.test", "carol@remote.test"],
                            b"Subject: once\r\n\r\nx\r\n")
        fake.wait_messages(1)
        queue = minimail.Queue(str(maildir))
        assert wait_for(lambda: "deferred" in [r.state for r in queue.load(queue.ids()[0]).recipients])
    finally:
        process.kill()                              # a crash: no clean shutdown
        process.communicate(timeout=20)
    with running(base_config(tmp_path, maildir=str(maildir), smarthost=("127.0.0.1", fake.port),
                             users=(RELAY_USER,), retry_delay=0.05)) as app:
        messages = fake.wait_messages(2)
        assert wait_for(lambda: queue_empty(app))
    assert [message["rcpts"] for message in messages] == [["bob@remote.test"], ["carol@remote.test"]]
    assert len(fake.wait_messages(3, timeout=0.5)) == 2


def test_relay_sigusr1_retries_now(tmp_path, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT bob@remote.test", "451 4.3.0 later")
    process, lines = start_cli(tmp_path, "--smarthost", "127.0.0.1:%d" % fake.port,
                               "--user", "%s:%s" % RELAY_USER, "--retry-delay", "1h")
    port = int([line for line in lines if " smtp listening on " in line][0].rsplit(":", 1)[1])
    try:
        with smtp_client(port) as client:
            client.login(*RELAY_USER)
            client.sendmail("alice@example.test", ["bob@remote.test"], b"Subject: u\r\n\r\nx\r\n")
        assert wait_for(lambda: len(fake.sessions) == 1)
        queue = minimail.Queue(str(tmp_path / "md"))
        assert wait_for(lambda: queue.ids() and queue.load(queue.ids()[0]).recipients[0].state == "deferred")
        process.send_signal(signal.SIGUSR1)
        assert fake.wait_messages(1)[0]["rcpts"] == ["bob@remote.test"]
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=20)[1]
    assert "Traceback" not in rest and "retrying every queued message" in rest


def test_relay_one_worker_delivers_messages_due_together_promptly(tmp_path, fake_smtp):
    fake = fake_smtp()
    port = fake.port
    fake.close()
    config = base_config(tmp_path, smarthost=("127.0.0.1", port), users=(RELAY_USER,),
                         retry_delay=3600, relay_workers=1)
    with running(config) as app:
        with smtp_client(app.smtp_port) as client:
            client.login(*RELAY_USER)
            for number in range(4):
                client.sendmail("alice@example.test", ["bob@remote.test"], b"Subject: %d\r\n\r\nx\r\n" % number)
        queue = app.queue
        assert wait_for(lambda: [queue.load(message_id).recipients[0].state
                                 for message_id in queue.ids()] == ["deferred"] * 4)

    def linger_after_work(frame, event, arg):      # widen the gap between a worker's last
        if event == "return" and frame.f_code.co_name == "_work":      # notify and its end
            time.sleep(0.2)

    revived = FakeSMTP(port=port)
    threading.setprofile(linger_after_work)         # for threads started from now on
    try:
        with running(config) as app:                # all four are due at once on restart
            assert len(revived.wait_messages(4, timeout=20)) == 4    # the rescan is 60 s away
            assert wait_for(lambda: queue_empty(app))
    finally:
        threading.setprofile(None)
        revived.close()


def test_relay_stop_during_a_queue_scan_ends_the_scheduler(tmp_path):
    app = minimail.App(base_config(tmp_path))
    app.queue.ensure()
    relay = app.relay
    scanning = threading.Event()
    scan = app.queue.ids

    def stop_during_scan():                 # what stop() does first, while the scan runs
        with relay.lock:
            relay.stopping = True
            relay.changed.notify_all()
        scanning.set()
        return scan()

    app.queue.ids = stop_during_scan
    app.start()
    try:
        assert scanning.wait(5)
        relay.scheduler.join(5)
        assert not relay.scheduler.is_alive()       # not asleep until the 60 s rescan
    finally:
        app.stop()


def test_relay_scan_during_enqueue_adopts_no_second_copy(make_server, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT bob@remote.test", "451 4.3.0 later")
    app = relay_server(make_server, fake, retry_delay=3600)
    relay, save = app.relay, app.queue.save
    copies = []

    def save_then_scan(entry):              # a periodic scan just after the state is written
        save(entry)
        if not copies:
            relay._scan(resume=False)
            with relay.lock:
                copies.append(relay.entries[entry.id])
            copies.append(entry)

    app.queue.save = save_then_scan
    send_authenticated(app, ["bob@remote.test"])
    assert wait_for(lambda: len(fake.sessions) == 1)
    assert copies[0] is copies[1]


def test_relay_enqueue_forgets_an_entry_it_cannot_save(make_server, fake_smtp):
    fake = fake_smtp()
    app = relay_server(make_server, fake)
    relay = app.relay

    def fail(entry):
        raise OSError(28, "No space left on device")

    app.queue.save = fail
    with smtp_client(app.smtp_port) as client:
        client.login(*RELAY_USER)
        with pytest.raises(smtplib.SMTPDataError) as error:
            client.sendmail("alice@example.test", ["bob@remote.test"], b"Subject: x\r\n\r\nx\r\n")
    assert error.value.smtp_code == 451
    with relay.lock:
        assert relay.entries == {} and relay.busy == set()


def test_relay_backoff_after_very_many_attempts(tmp_path, fake_smtp):
    fake = fake_smtp()
    fake.will("RCPT bob@remote.test", "451 4.3.0 later", "451 4.3.0 later")
    config = base_config(tmp_path, smarthost=("127.0.0.1", fake.port), users=(RELAY_USER,),
                         retry_delay=3600.0)             # a float, as the command line gives
    with running(config) as app:
        send_authenticated(app, ["bob@remote.test"])
        queue = app.queue
        assert wait_for(lambda: queue.ids() and queue.load(queue.ids()[0]).recipients[0].state == "deferred")
    message_id, = queue.ids()
    entry = queue.load(message_id)
    entry.attempts = 5000
    queue.save(entry)
    with running(config):                           # resumed at once
        assert wait_for(lambda: queue.load(message_id).attempts == 5001
                        and queue.load(message_id).next_try > time.time() + 3000)
    assert len(fake.sessions) == 2


def test_relay_timeout_bounds_a_whole_reply(make_server, raw_peer):
    """SPEC 7: --timeout bounds each reply, not each read of one."""
    connected_s = []

    def trickle_greeting(connection, stop):
        started = time.monotonic()
        connection.settimeout(0.05)
        try:
            while not stop.is_set():
                connection.sendall(b"2")                # one byte per 0.05 s, never a line end
                try:
                    if not connection.recv(1):
                        break                           # the client gave up
                except socket.timeout:
                    pass
        finally:
            connected_s.append(time.monotonic() - started)

    port = raw_peer(trickle_greeting)
    app = make_server(smarthost=("127.0.0.1", port), users=(RELAY_USER,), retry_delay=3600,
                      timeout=0.5)
    send_authenticated(app, ["bob@remote.test"])
    queue = app.queue
    assert wait_for(lambda: queue.ids() and queue.load(queue.ids()[0]).recipients[0].state == "deferred")
    assert "no complete reply" in queue.load(queue.ids()[0]).recipients[0].last_error
    assert wait_for(lambda: connected_s) and connected_s[0] < 3.0


POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


@pytest.fixture
def postfix_server():
    """A private Postfix (Debian package postfix) on a loopback port, delivering mail for
    postfix.test into a Maildir; started from its own config directory, never the system's."""
    daemon_dir = shutil.which("postconf") and subprocess.run(
        ["postconf", "-dh", "daemon_directory"], capture_output=True, text=True).stdout.strip()
    if not daemon_dir or not os.path.exists(os.path.join(daemon_dir, "master")):
        pytest.skip("Postfix is not installed (Debian package postfix)")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root")
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
        pwd.getpwnam("postfix")
    except KeyError:
        pytest.skip("users postfix and nobody are needed")
    import tempfile
    base = tempfile.mkdtemp(prefix="minimail-postfix-", dir="/var/tmp")
    os.chmod(base, 0o755)
    conf, queue, data, maildir = (os.path.join(base, name) for name in ("conf", "queue", "data", "mail"))
    for folder in (conf, queue, data, maildir):
        os.mkdir(folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(os.path.join(conf, "main.cf"), "w") as file:
        file.write("\n".join([
            "compatibility_level = 3.6", "queue_directory = " + queue, "data_directory = " + data,
            "mail_owner = postfix", "setgid_group = postdrop", "myhostname = postfix.test",
            "mydestination =", "inet_interfaces = 127.0.0.1", "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8", "alias_maps =", "alias_database =", "local_recipient_maps =",
            "virtual_mailbox_domains = postfix.test", "virtual_mailbox_base = " + maildir,
            "virtual_mailbox_maps = static:inbox/", "virtual_uid_maps = static:%d" % nobody.pw_uid,
            "virtual_gid_maps = static:%d" % nobody.pw_gid, "virtual_minimum_uid = 100",
            "smtputf8_enable = no", "biff = no", "maillog_file = " + os.path.join(base, "maillog"),
            "maillog_file_prefixes = " + base, ""]))
    with open(os.path.join(conf, "master.cf"), "w") as file:
        file.write(POSTFIX_MASTER_CF.format(port=port))
    os.chown(maildir, nobody.pw_uid, nobody.pw_gid)
    shutil.chown(data, "postfix")
    check = subprocess.run(["postfix", "-c", conf, "check"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip("postfix check failed: %s" % check.stderr.strip()[-200:])
    master = subprocess.Popen([os.path.join(daemon_dir, "master"), "-c", conf, "-s"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def banner():
            try:
                with Raw(port, greeting=False) as client:
                    return client.read_reply()[0] == 220
            except OSError:
                return False
        if not wait_for(banner, timeout=30, interval=0.1):
            pytest.skip("the private Postfix did not start")
        yield port, os.path.join(maildir, "inbox", "new")
    finally:
        master.terminate()
        try:
            master.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(master.pid, signal.SIGKILL)
            master.wait(5)
        shutil.rmtree(base, ignore_errors=True)


def test_relay_into_real_postfix(make_server, postfix_server):
    port, inbox = postfix_server
    app = make_server(smarthost=("127.0.0.1", port), users=(RELAY_USER,), retry_delay=0.2)
    long_line = b"x" * 1500
    send_authenticated(app, ["someone@postfix.test"],
                       b"Subject: via postfix\r\n\r\n.dot line\r\n" + long_line + b"\r\nend\r\n")
    files = wait_for(lambda: os.path.isdir(inbox) and os.listdir(inbox), timeout=60)
    assert files, "Postfix delivered nothing"
    with open(os.path.join(inbox, files[0]), "rb") as file:
        stored = file.read()
    assert b"Subject: via postfix\n" in stored and b"\n.dot line\n" in stored
    assert b"by mx.example.test (minimail)" in stored
    assert b"x" * 998 + b"\n " + b"x" * 502 + b"\n" in stored
    assert wait_for(lambda: queue_empty(app))


# --- HTTP: page and Mailpit-compatible API --------------------------------------------

RFC3339_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))     # never a proxy


@pytest.fixture
def web(make_server):
    return make_server(http=("127.0.0.1", 0))


def http_call(app, method, path, body=None, headers=None):
    """(status, headers, body) of one request to the app's HTTP listener."""
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (app.http_port, path), data=body,
                                     method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


def get_json(app, path):
    status, headers, body = http_call(app, "GET", path)
    assert status == 200, (path, status, body)
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)


def send_message(app, data, rcpts=("user@example.test",), sender="a@sender.test"):
    """Deliver one message over SMTP; return its ID from the 250 reply."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with smtp_client(app.smtp_port) as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(data)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def stored_files(app, mailbox):
    """Names of a mailbox's files in new/ and cur/, as folder/name."""
    found = []
    for folder in ("new", "cur"):
        path = os.path.join(app.maildir.root, mailbox, folder)
        if os.path.isdir(path):
            found += ["%s/%s" % (folder, name) for name in sorted(os.listdir(path))]
    return found


MULTIPART = b"""From: =?utf-8?q?Zo=C3=AB_Sender?= <zoe@sender.test>
To: "Bob, Builder" <bob@example.test>, carol@example.test
Cc: Dan <dan@example.test>
Reply-To: replies@sender.test
Subject: =?iso-8859-1?q?R=E9sum=E9?= and report
Date: Tue, 2 Jan 2024 09:30:00 -0500
Message-ID: <multi-1@sender.test>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/related; boundary="rel"

--rel
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

Caf=E9 plain text
--alt
Content-Type: text/html; charset=utf-8

<p>Caf\xc3\xa9 <b>html</b> <img src="cid:logo@x"></p>
--alt--
--rel
Content-Type: image/png
Content-ID: <logo@x>
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--rel--
--outer
Content-Type: application/pdf; name="report.pdf"
Content-Disposition: attachment; filename="report.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQK
--outer--
"""


def test_http_messages_list_envelope_and_fields(web):
    first = send_message(web, b"Subject: first\r\n\r\nbody one\r\n")
    second = send_message(web, MULTIPART, rcpts=("bob@example.test", "eve@example.test"))
    data = get_json(web, "/api/v1/messages")
    assert {key: data[key] for key in ("total", "unread", "count", "messages_count",
                                       "messages_unread", "start", "tags")} == {
        "total": 2, "unread": 2, "count": 2, "messages_count": 2, "messages_unread": 2,
        "start": 0, "tags": []}
    newest, oldest = data["messages"]
    assert (newest["ID"], oldest["ID"]) == (second, first)          # newest first
    assert set(newest) >= {"ID", "MessageID", "Read", "From", "To", "Cc", "Bcc", "ReplyTo", "Subject",
                           "Created", "Username", "Tags", "Size", "Attachments", "Snippet", "Mailboxes"}
    assert newest["MessageID"] == "multi-1@sender.test" and newest["Read"] is False
    assert newest["From"] == {"Name": "Zoë Sender", "Address": "zoe@sender.test"}
    assert newest["To"] == [{"Name": "Bob, Builder", "Address": "bob@example.test"},
                            {"Name": "", "Address": "carol@example.test"}]
    assert newest["Cc"] == [{"Name": "Dan", "Address": "dan@example.test"}]
    assert newest["ReplyTo"] == [{"Name": "", "Address": "replies@sender.test"}]
    assert newest["Bcc"] == [{"Name": "", "Address": "eve@example.test"}]   # envelope only
    assert newest["Subject"] == "Résumé and report"
    assert newest["Attachments"] == 1 and newest["Snippet"] == "Café plain text"
    assert newest["Mailboxes"] == ["bob@example.test", "eve@example.test"]
    assert newest["Size"] == os.path.getsize(os.path.join(web.maildir.root, "bob@example.test", "new",
                                                          stored_files(web, "bob@example.test")[0][4:]))
    assert re.fullmatch(RFC3339_RE, newest["Created"]) and newest["Created"].endswith("+00:00")
    assert oldest["From"] is None
    for key in ("To", "Cc", "Bcc", "ReplyTo", "Tags"):         # arrays, never null
        assert oldest[key] == [] if key != "Bcc" else oldest[key] == [
            {"Name": "", "Address": "user@example.test"}]
    assert oldest["Attachments"] == 0 and oldest["Snippet"] == "body one"


def test_http_messages_paging(web):
    ids = [send_message(web, "Subject: %d\r\n\r\nx\r\n" % number) for number in range(5)]
    page = get_json(web, "/api/v1/messages?start=1&limit=2")
    assert [m["ID"] for m in page["messages"]] == [ids[3], ids[2]]
    assert (page["start"], page["count"], page["total"], page["messages_count"]) == (1, 2, 5, 5)
    everything = get_json(web, "/api/v1/messages?start=x&limit=-3")   # bad values: defaults
    assert everything["start"] == 0 and everything["count"] == 5
    assert get_json(web, "/api/v1/messages?start=10")["messages"] == []


def test_http_message_detail_marks_every_copy_read(web):
    message_id = send_message(web, MULTIPART, rcpts=("bob@example.test", "eve@example.test"))
    assert get_json(web, "/api/v1/messages")["unread"] == 1
    message = get_json(web, "/api/v1/message/%s" % message_id)
    assert message["ID"] == message_id and message["Read"] is True
    assert message["ReturnPath"] == "a@sender.test"
    assert message["Date"] == "2024-01-02T09:30:00.000-05:00"
    assert message["Text"].strip() == "Café plain text"
    assert "Café <b>html</b>" in message["HTML"]
    assert message["Attachments"] == [{
        "PartID": "2", "FileName": "report.pdf", "ContentType": "application/pdf", "ContentID": "",
        "Size": 9, "Checksums": {"MD5": hashlib.md5(b"%PDF-1.4\n").hexdigest(),
                                 "SHA1": hashlib.sha1(b"%PDF-1.4\n").hexdigest(),
                                 "SHA256": hashlib.sha256(b"%PDF-1.4\n").hexdigest()}}]
    assert [(i["PartID"], i["ContentType"], i["ContentID"], i["Size"]) for i in message["Inline"]] == [
        ("1.2", "image/png", "logo@x", 8)]
    for mailbox in ("bob@example.test", "eve@example.test"):        # S flag on every copy
        (name,) = stored_files(web, mailbox)
        assert name.startswith("cur/%s," % message_id) and name.endswith(":2,S")
        assert web.maildir.find(mailbox, message_id) is not None    # POP3 still finds it
    listed = get_json(web, "/api/v1/messages")
    assert listed["unread"] == 0 and listed["messages"][0]["Read"] is True
    assert get_json(web, "/api/v1/message/latest")["ID"] == message_id


def test_http_unknown_message_is_404(web):
    for path in ("/api/v1/message/nope", "/api/v1/message/nope/raw", "/api/v1/message/nope/headers",
                 "/api/v1/message/latest", "/api/v1/message/nope/part/1", "/view/nope.html"):
        status, headers, body = http_call(web, "GET", path)
        assert status == 404 and headers["Content-Type"].startswith("text/plain"), path
    message_id = send_message(web, b"Subject: x\r\n\r\ny\r\n")
    assert http_call(web, "GET", "/api/v1/message/%s/part/9.9" % message_id)[0] == 404


def test_http_part_download(web):
    message_id = send_message(web, MULTIPART)
    status, headers, body = http_call(web, "GET", "/api/v1/message/%s/part/2" % message_id)
    assert (status, body, headers["Content-Type"]) == (200, b"%PDF-1.4\n", "application/pdf")
    assert headers["Content-Disposition"] == 'inline; filename="report.pdf"'
    status, headers, body = http_call(web, "GET", "/api/v1/message/latest/part/1.2")
    assert (status, headers["Content-Type"], body) == (200, "image/png", base64.b64decode("iVBORw0KGgo="))


def test_http_part_that_a_browser_would_run_is_a_download(web):
    message_id = send_message(web, b"""Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

see attachment
--b
Content-Type: text/html
Content-Disposition: attachment; filename="evil.html"

<script>alert(1)</script>
--b--
""")
    status, headers, body = http_call(web, "GET", "/api/v1/message/%s/part/2" % message_id)
    assert status == 200 and body == b"<script>alert(1)</script>"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Disposition"].startswith("attachment;")
    assert "sandbox" in headers["Content-Security-Policy"]


def test_http_html_only_message_gets_text_and_snippet(web):
    send_message(web, b"Subject: html\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
                      b"<html><head><style>p{color:red}</style><script>x()</script></head>"
                      b"<body><p>Hello&nbsp;<b>there</b></p><p>second &amp; last</p></body></html>\r\n")
    summary = get_json(web, "/api/v1/messages")["messages"][0]
    assert summary["Snippet"] == "Hello there second & last"
    message = get_json(web, "/api/v1/message/latest")
    assert message["Text"] == "Hello there\n\nsecond & last"
    assert message["HTML"].startswith("<html>") and message["Attachments"] == []


@pytest.mark.parametrize("raw, subject, name, text", [
    (b"Subject: =?utf-8?b?w6nDqQ==?=\r\nFrom: =?iso-8859-1?q?J=F6rg?= <j@x.test>\r\n\r\nplain\r\n",
     "éé", "Jörg", "plain"),
    ("Subject: raw ütf-8\r\nFrom: Jürgen <j@x.test>\r\n\r\nbody ü\r\n".encode("utf-8"),
     "raw ütf-8", "Jürgen", "body ü"),
    (b"Subject: latin \xe9\r\nFrom: j@x.test\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\ncaf\xe9\r\n",
     "latin \ufffd", "", "café"),
    (b"Subject: =?x-unknown?q?abc?=\r\nContent-Type: text/plain; charset=x-unknown\r\n\r\nna\xc3\xafve\r\n",
     "abc", None, "naïve"),
    (b"Subject: =?koi8-r?b?8NLJ18XU?=\r\nContent-Type: text/plain; charset=windows-1251\r\n\r\n\xcf\xf0\xe8\r\n",
     "Привет", None, "При"),
])
def test_http_encoded_headers_and_charsets(web, raw, subject, name, text):
    send_message(web, raw)
    message = get_json(web, "/api/v1/message/latest")
    assert message["Subject"] == subject
    if name is not None:
        assert message["From"]["Name"] == name
    assert message["Text"].strip() == text


@pytest.mark.parametrize("raw", [
    b"Content-Type: multipart/mixed\r\n\r\nno boundary at all\r\n",
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64\r\n",
    b"Content-Type: text/plain; charset=\"\r\nContent-Disposition: attachment; filename*=bogus''%ZZ\r\n\r\nx\r\n",
    b"From: <<<@@@>>>\r\nTo: ,,,;;;\r\nDate: yesterday-ish\r\nSubject: =?utf-8?q?broken\r\n\r\nx\r\n",
    b"no header line at all\r\n\r\n",
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n",
])
def test_http_malformed_mime_never_fails(web, raw):
    message_id = send_message(web, raw)
    summary = get_json(web, "/api/v1/messages")["messages"][0]
    assert summary["ID"] == message_id
    message = get_json(web, "/api/v1/message/%s" % message_id)
    assert re.fullmatch(RFC3339_RE, message["Date"])
    assert isinstance(message["Text"], str)
    for part in message["Attachments"] + message["Inline"]:
        assert http_call(web, "GET", "/api/v1/message/%s/part/%s" % (message_id, part["PartID"]))[0] == 200
    assert http_call(web, "GET", "/view/%s.html" % message_id)[0] == 200


def test_http_headers_endpoint(web):
    message_id = send_message(web, b"Subject: folded\r\n line\r\nX-Two: a\r\nx-two: b\r\nMESSAGE-ID: <h@x>\r\n\r\nx\r\n")
    headers = get_json(web, "/api/v1/message/%s/headers" % message_id)
    assert list(headers) == sorted(headers)
    assert headers["Subject"] == ["folded line"]
    assert headers["X-Two"] == ["a", "b"] and headers["Message-Id"] == ["<h@x>"]
    assert headers["Delivered-To"] == ["user@example.test"] and headers["Return-Path"] == ["<a@sender.test>"]


def test_http_headers_endpoint_stops_at_the_blank_line(web):
    message_id = send_message(web, b"Subject: h\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                                   b"X-Body: no\r\n--b\r\nX-Part: no\r\n\r\npart\r\n--b--\r\n")
    headers = get_json(web, "/api/v1/message/%s/headers" % message_id)
    assert "X-Body" not in headers and "X-Part" not in headers and headers["Subject"] == ["h"]


def test_http_raw_is_the_stored_file(web):
    message_id = send_message(web, b"Subject: raw\r\n\r\nline\r\n")
    with open(os.path.join(web.maildir.root, "user@example.test", stored_files(web, "user@example.test")[0]), "rb") as file:
        stored = file.read()
    status, headers, body = http_call(web, "GET", "/api/v1/message/%s/raw" % message_id)
    assert (status, body) == (200, stored)
    assert headers["Content-Type"] == "text/plain; charset=utf-8" and "Content-Disposition" not in headers
    headers = http_call(web, "GET", "/api/v1/message/%s/raw?dl=1" % message_id)[1]
    assert headers["Content-Disposition"] == 'attachment; filename="%s.eml"' % message_id


def test_http_search(web):
    plain = send_message(web, b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: Quarterly numbers\r\n\r\nthe secret word is pineapple\r\n",
                         rcpts=("bob@example.test",))
    blind = send_message(web, b"From: mallory@evil.test\r\nSubject: hello world\r\n\r\nno To header here\r\n",
                         rcpts=("dave@example.test",))
    attached = send_message(web, MULTIPART, rcpts=("bob@example.test",))

    def ids(query):
        data = get_json(web, "/api/v1/search?query=" + urllib.parse.quote(query))
        assert data["messages_count"] == len(data["messages"]) and data["total"] == 3
        return [message["ID"] for message in data["messages"]]
    assert ids("from:alice") == [plain]
    assert ids("to:bob@example.test") == [attached, plain]
    assert ids("to:dave") == [blind]                   # the envelope recipient counts
    assert ids("subject:quarterly") == [plain]
    assert ids("PINEAPPLE") == [plain]
    assert ids('"hello world"') == [blind] and ids("hello world") == [blind]
    assert ids("world -hello") == [] and ids("!from:alice") == [attached, blind]
    assert ids("has:attachment") == [attached] and ids("has:inline") == [attached]
    assert ids("mailbox:dave@example.test") == [blind]
    assert ids("report.pdf") == [attached]
    assert ids("is:unread") == [attached, blind, plain]
    get_json(web, "/api/v1/message/%s" % plain)
    assert ids("is:read") == [plain] and ids("is:unread") == [attached, blind]
    data = get_json(web, "/api/v1/search?query=is:unread")
    assert (data["messages_unread"], data["unread"]) == (2, 2)
    assert http_call(web, "GET", "/api/v1/search?query=%20")[0] == 400


def test_http_put_read_state(web):
    first = send_message(web, b"Subject: a\r\n\r\nx\r\n", rcpts=("bob@example.test", "eve@example.test"))
    second = send_message(web, b"Subject: b\r\n\r\nx\r\n")

    def put(body, content_type="application/json"):
        return http_call(web, "PUT", "/api/v1/messages", body, {"Content-Type": content_type})
    status, headers, body = put(json.dumps({"IDs": [first], "Read": True}).encode())
    assert (status, body, headers["Content-Type"]) == (200, b"ok", "text/plain; charset=utf-8")
    assert all(name.endswith(":2,S") for box in ("bob@example.test", "eve@example.test")
               for name in stored_files(web, box))
    assert [m["Read"] for m in get_json(web, "/api/v1/messages")["messages"]] == [False, True]
    assert put(b"ids=%s&Read=false" % first.encode(), "application/x-www-form-urlencoded")[0] == 200
    assert get_json(web, "/api/v1/messages")["unread"] == 2
    assert put(json.dumps({"Search": "subject:b", "Read": True}).encode())[0] == 200
    assert [m["Read"] for m in get_json(web, "/api/v1/messages")["messages"]] == [True, False]
    assert put(b'{"Read": true}')[0] == 200                         # no IDs: every message
    assert get_json(web, "/api/v1/messages")["unread"] == 0
    assert put(json.dumps({"IDs": [second], "Search": "x", "Read": False}).encode())[0] == 400
    assert put(b'{"IDs": "not a list"}')[0] == 400
    assert put(b"{broken")[0] == 400
    assert put(b'{"Read": false, "IDs": ["unknown-id"]}')[0] == 200
    assert get_json(web, "/api/v1/messages")["unread"] == 0


def test_http_delete_by_ids_removes_every_copy(web):
    first = send_message(web, b"Subject: a\r\n\r\nx\r\n", rcpts=("bob@example.test", "eve@example.test"))
    second = send_message(web, b"Subject: b\r\n\r\nx\r\n", rcpts=("bob@example.test",))
    third = send_message(web, b"Subject: c\r\n\r\nx\r\n")
    status, _, body = http_call(web, "DELETE", "/api/v1/messages", json.dumps({"IDs": [first]}).encode(),
                                {"Content-Type": "application/json"})
    assert (status, body) == (200, b"ok")
    assert stored_files(web, "eve@example.test") == []
    assert [name[4:].split(",")[0] for name in stored_files(web, "bob@example.test")] == [second]
    form = urllib.parse.urlencode([("ids", second), ("ids", "unknown")]).encode()
    assert http_call(web, "DELETE", "/api/v1/messages", form)[0] == 200      # form body, as a client sends
    assert stored_files(web, "bob@example.test") == []
    assert [m["ID"] for m in get_json(web, "/api/v1/messages")["messages"]] == [third]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"IDs": [1, 2]}', b"\xff\xfe",
                                  b'{"IDs": "abc"}', b"a=1&&&=", b"%%%"])
def test_http_delete_with_unparsable_body_deletes_nothing(web, body):
    send_message(web, b"Subject: keep\r\n\r\nx\r\n")
    status = http_call(web, "DELETE", "/api/v1/messages", body, {"Content-Type": "application/json"})[0]
    assert status == 400
    assert len(stored_files(web, "user@example.test")) == 1


def test_http_delete_with_empty_body_deletes_all(web):
    for number in range(3):
        send_message(web, "Subject: %d\r\n\r\nx\r\n" % number, rcpts=("bob@example.test", "eve@example.test"))
    assert http_call(web, "DELETE", "/api/v1/messages")[0] == 200
    assert stored_files(web, "bob@example.test") == stored_files(web, "eve@example.test") == []
    assert get_json(web, "/api/v1/messages")["total"] == 0


def test_http_delete_search(web):
    keep = send_message(web, b"Subject: keep me\r\n\r\nx\r\n")
    send_message(web, b"Subject: drop me\r\n\r\nx\r\n")
    assert http_call(web, "DELETE", "/api/v1/search?query=")[0] == 400
    assert http_call(web, "DELETE", "/api/v1/search?query=subject:drop")[:3:2] == (200, b"ok")
    assert [m["ID"] for m in get_json(web, "/api/v1/messages")["messages"]] == [keep]


def test_http_delete_messages_with_a_search_body_deletes_only_matches(web):
    keep = send_message(web, b"Subject: keep me\r\n\r\nx\r\n")
    send_message(web, b"Subject: drop me\r\n\r\nx\r\n")
    for search in ("subject:nothing-matches", "subject:drop"):
        status = http_call(web, "DELETE", "/api/v1/messages", json.dumps({"Search": search}).encode(),
                           {"Content-Type": "application/json"})[0]
        assert status == 200
    assert [m["ID"] for m in get_json(web, "/api/v1/messages")["messages"]] == [keep]


def test_http_info_health_and_mailboxes(web):
    send_message(web, b"Subject: a\r\n\r\nx\r\n", rcpts=("bob@example.test", "eve@example.test"))
    info = get_json(web, "/api/v1/info")
    assert info["Version"] == minimail.__version__ and info["Messages"] == 1 and info["Unread"] == 1
    assert info["Database"] == web.maildir.root and info["DatabaseSize"] > 0 and info["Tags"] == {}
    assert info["RuntimeStats"]["SMTPAccepted"] == 1
    assert {"Uptime", "Memory", "MessagesDeleted", "SMTPAcceptedSize"} <= set(info["RuntimeStats"])
    for path in ("/livez", "/readyz"):
        assert http_call(web, "GET", path)[0] == 200
    assert get_json(web, "/api/v1/mailboxes") == {"total": 1, "unread": 1, "mailboxes": [
        {"Name": "bob@example.test", "Total": 1, "Unread": 1},
        {"Name": "eve@example.test", "Total": 1, "Unread": 1}]}


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.test"}, {"Origin": "null"}, {"Referer": "http://evil.test/page"},
    {"Origin": "http://127.0.0.1:1"}, {"Sec-Fetch-Site": "cross-site"},
    {"Referer": "http://127.0.0.1:{port}.evil.test/"},
])
@pytest.mark.parametrize("method", ["DELETE", "PUT", "POST"])
def test_http_cross_site_state_change_refused(web, headers, method):
    send_message(web, b"Subject: keep\r\n\r\nx\r\n")
    headers = {name: value.replace("{port}", str(web.http_port)) for name, value in headers.items()}
    status, response_headers, _ = http_call(web, method, "/api/v1/messages", b"", headers)
    assert status == 403
    assert len(stored_files(web, "user@example.test")) == 1
    assert not any(name.lower().startswith("access-control-") for name in response_headers)


@pytest.mark.parametrize("headers", [
    {}, {"Origin": "http://127.0.0.1:{port}"}, {"Referer": "http://127.0.0.1:{port}/"},
    {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:{port}"}])
def test_http_same_origin_and_api_clients_may_delete(web, headers):
    send_message(web, b"Subject: go\r\n\r\nx\r\n")
    headers = {name: value.replace("{port}", str(web.http_port)) for name, value in headers.items()}
    assert http_call(web, "DELETE", "/api/v1/messages", b"", headers)[0] == 200
    assert stored_files(web, "user@example.test") == []


def test_http_page_is_self_contained_and_locked_down(web):
    status, headers, body = http_call(web, "GET", "/")
    page = body.decode("utf-8")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp).group(1)
    assert '<script nonce="%s">' % nonce in page and '<style nonce="%s">' % nonce in page
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert nonce != re.search(r"nonce-([^']+)", http_call(web, "GET", "/")[1]["Content-Security-Policy"]).group(1)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", page)   # works offline
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page
    sandbox = re.search(r'setAttribute\("sandbox", "([^"]*)"\)', page).group(1)
    assert "allow-scripts" not in sandbox and "allow-same-origin" not in sandbox
    assert "EventSource(\"/api/v1/events\")" in page and headers["X-Content-Type-Options"] == "nosniff"


def test_http_view_html_is_sandboxed_without_remote_content(web):
    message_id = send_message(web, MULTIPART)
    status, headers, body = http_call(web, "GET", "/view/%s.html" % message_id)
    csp = headers["Content-Security-Policy"]
    assert status == 200 and csp.startswith("sandbox ") and "allow-scripts" not in csp
    assert "allow-same-origin" not in csp and "default-src 'none'" in csp
    assert re.search(r"img-src 'self' data:;", csp) and "frame-ancestors http://127.0.0.1:%d;" % web.http_port in csp
    assert ('<img src="/api/v1/message/%s/part/1.2">' % message_id).encode() in body      # cid: resolved
    remote = http_call(web, "GET", "/view/%s.html?remote=1" % message_id)[1]["Content-Security-Policy"]
    assert "img-src 'self' data: https: http:" in remote and remote.startswith("sandbox ")


def test_http_message_strings_reach_the_page_only_as_json(web):
    send_message(web, b"From: \"<img src=x onerror=alert(1)>\" <x@evil.test>\r\n"
                      b"Subject: <script>alert(1)</script>\r\n\r\n</pre><script>alert(2)</script>\r\n")
    status, headers, body = http_call(web, "GET", "/api/v1/messages")
    assert headers["Content-Type"] == "application/json" and headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in headers["Content-Security-Policy"]
    assert json.loads(body)["messages"][0]["Subject"] == "<script>alert(1)</script>"
    assert b"<script>" not in http_call(web, "GET", "/")[2].split(b"<script nonce")[0]


def test_http_wait_answers_at_once_with_the_newest_match(web):
    send_message(web, b"Subject: code 111\r\n\r\nx\r\n")
    newest = send_message(web, b"Subject: code 222\r\n\r\nx\r\n")
    send_message(web, b"Subject: other\r\n\r\nx\r\n")
    started = time.monotonic()
    summary = get_json(web, "/api/v1/wait?query=subject:code&timeout=10")
    assert summary["ID"] == newest and "Mailboxes" in summary
    assert time.monotonic() - started < 5


def test_http_wait_returns_when_a_message_arrives(web):
    first = send_message(web, b"Subject: before\r\n\r\nx\r\n")
    result = {}

    def waiter():
        result["reply"] = http_call(web, "GET", "/api/v1/wait?query=to:late@example.test&timeout=10&after=%s" % first)
    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        arrived = send_message(web, b"Subject: late\r\n\r\nx\r\n", rcpts=("late@example.test",))
    finally:
        thread.join(15)
    status, _, body = result["reply"]
    assert status == 200 and json.loads(body)["ID"] == arrived


def test_http_wait_after_skips_older_matches(web):
    old = send_message(web, b"Subject: token\r\n\r\nx\r\n")
    started = time.monotonic()
    status, _, body = http_call(web, "GET", "/api/v1/wait?query=token&timeout=0.3&after=%s" % old)
    assert status == 408 and time.monotonic() - started >= 0.3


@pytest.mark.parametrize("query, status", [("timeout=soon", 400), ("timeout=nan", 400), ("timeout=-1", 400),
                                           ("after=no-such-id&timeout=1", 404), ("timeout=0", 408)])
def test_http_wait_errors(web, query, status):
    assert http_call(web, "GET", "/api/v1/wait?query=nothing-matches&" + query)[0] == status


def test_http_wait_sees_mail_written_by_another_process(make_server):
    app = make_server(http=("127.0.0.1", 0), http_scan_interval=0.05)
    box = os.path.join(app.maildir.root, "other@example.test")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "reply", http_call(app, "GET", "/api/v1/wait?query=subject:foreign&timeout=10")))
    thread.start()
    try:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(box, sub))
        with open(os.path.join(box, "tmp", "1700000000.foreign"), "wb") as file:
            file.write(b"Subject: foreign\n\nwritten elsewhere\n")
        os.rename(os.path.join(box, "tmp", "1700000000.foreign"), os.path.join(box, "new", "1700000000.foreign"))
    finally:
        thread.join(15)
    status, _, body = result["reply"]
    summary = json.loads(body)
    assert status == 200 and summary["ID"] == "1700000000.foreign"
    assert summary["Created"] == "2023-11-14T22:13:20.000+00:00"


def read_event(response):
    """The next (event, data) of a server-sent event stream."""
    event = data = None
    while True:
        line = response.readline()
        if not line:
            raise EOFError("event stream closed")
        line = line.decode("utf-8").rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif not line and event:
            return event, data


def test_http_events_stream_new_and_delete(web):
    connection = http.client.HTTPConnection("127.0.0.1", web.http_port, timeout=5)
    try:
        connection.request("GET", "/api/v1/events")
        response = connection.getresponse()
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        message_id = send_message(web, b"Subject: live\r\n\r\nx\r\n")
        event, data = read_event(response)
        assert event == "new" and data["ID"] == message_id and data["Subject"] == "live"
        assert http_call(web, "DELETE", "/api/v1/messages", json.dumps({"IDs": [message_id]}).encode())[0] == 200
        assert read_event(response) == ("delete", {"IDs": [message_id]})
    finally:
        connection.close()


def test_http_event_streams_share_scans_during_a_burst(web):
    index = web.mail_index
    streams = [http.client.HTTPConnection("127.0.0.1", web.http_port, timeout=10) for _ in range(4)]
    try:
        responses = []
        for connection in streams:
            connection.request("GET", "/api/v1/events")
            responses.append(connection.getresponse())
        scans = []
        folder_signature = index.maildir.folder_signature     # read once per mailbox per scan
        index.maildir.folder_signature = lambda *args: scans.append(1) or folder_signature(*args)
        with smtp_client(web.smtp_port) as client:
            for number in range(30):
                client.sendmail("a@sender.test", ["user@example.test"], b"Subject: %d\r\n\r\nx\r\n" % number)
        for response in responses:
            assert [read_event(response)[0] for _ in range(30)] == ["new"] * 30
        assert len(scans) < 30, len(scans)      # was one scan per delivery per stream
    finally:
        for connection in streams:
            connection.close()


def test_http_events_and_waits_end_when_the_app_stops(tmp_path):
    app = minimail.App(base_config(tmp_path, http=("127.0.0.1", 0)))
    app.start()
    connection = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=5)
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault(
        "reply", http_call(app, "GET", "/api/v1/wait?query=never&timeout=60")))
    try:
        connection.request("GET", "/api/v1/events")
        response = connection.getresponse()
        waiter.start()
        assert wait_for(lambda: any(getattr(handler, "path", "").startswith("/api/v1/wait")
                                    for handler in list(app.servers["http"].handlers)), timeout=5)
        started = time.monotonic()
        app.stop()
        assert time.monotonic() - started < 4
        with pytest.raises(EOFError):
            read_event(response)
    finally:
        connection.close()
        waiter.join(10)
        app.stop()
    assert result["reply"][0] == 503


def test_http_accounts_required_off_loopback(make_server):
    config = dict(http=("127.0.0.1", 0), loopback_networks=("192.0.2.0/24",),
                  users=(("bob@example.test", "bobpw"), ("eve@example.test", "evepw")))
    app = make_server(**config)
    shared = send_message(app, b"Subject: both\r\n\r\nx\r\n", rcpts=("bob@example.test", "eve@example.test"))
    own = send_message(app, b"Subject: bob only\r\n\r\nx\r\n", rcpts=("bob@example.test",))

    def basic(user, password):
        return {"Authorization": "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()}
    status, headers, _ = http_call(app, "GET", "/api/v1/messages")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    assert http_call(app, "GET", "/", headers=basic("bob@example.test", "wrong"))[0] == 401
    assert http_call(app, "GET", "/livez")[0] == 200
    status, _, body = http_call(app, "GET", "/api/v1/messages", headers=basic("eve@example.test", "evepw"))
    data = json.loads(body)
    assert status == 200 and [m["ID"] for m in data["messages"]] == [shared] and data["total"] == 1
    assert data["messages"][0]["Mailboxes"] == ["eve@example.test"]
    assert http_call(app, "GET", "/api/v1/message/%s" % own, headers=basic("eve@example.test", "evepw"))[0] == 404
    assert http_call(app, "DELETE", "/api/v1/messages", headers=basic("eve@example.test", "evepw"))[0] == 200
    assert stored_files(app, "eve@example.test") == [] and len(stored_files(app, "bob@example.test")) == 2
    status, _, body = http_call(app, "GET", "/api/v1/messages", headers=basic("bob@example.test", "bobpw"))
    assert json.loads(body)["total"] == 2


def test_http_non_loopback_without_accounts_refused(tmp_path):
    app = minimail.App(base_config(tmp_path, http=("127.0.0.1", 0), loopback_networks=("192.0.2.0/24",)))
    with pytest.raises(minimail.ConfigError, match="http on non-loopback"):
        app.start()


def test_http_connection_cap_answers_503(make_server):
    app = make_server(http=("127.0.0.1", 0), max_connections=1)
    holder = socket.create_connection(("127.0.0.1", app.http_port), timeout=5)
    try:
        holder.sendall(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")      # keep-alive: stays open
        assert holder.recv(65536).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", app.http_port), timeout=5) as refused:
            data = b""
            while True:
                chunk = refused.recv(65536)
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 503 ") and data.endswith(b"\r\n\r\nToo many connections\n")
    finally:
        holder.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"DELETE /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"DELETE /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"PATCH /api/v1/messages HTTP/1.1\r\nHost: localhost\r\n\r\n", 501),
    (b"POST /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n", 405),
    (b"GET /nothing/here HTTP/1.1\r\nHost: localhost\r\n\r\n", 404),
])
def test_http_bad_requests_get_one_error(web, request_bytes, status):
    send_message(web, b"Subject: keep\r\n\r\nx\r\n")
    with socket.create_connection(("127.0.0.1", web.http_port), timeout=5) as client:
        client.sendall(request_bytes)
        reply = client.recv(65536)
    assert reply.startswith(b"HTTP/1.") and int(reply.split()[1]) == status, reply[:200]
    assert len(stored_files(web, "user@example.test")) == 1


def warmed_up(app):
    """True once the index's background warm-up thread has finished."""
    return not any(thread.name == "http-index" and thread.is_alive() for thread in app.threads)


def test_http_list_parses_only_the_page(web):
    assert wait_for(lambda: warmed_up(web), timeout=10)       # it found an empty maildir
    box = os.path.join(web.maildir.root, "many@example.test")
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(box, sub))
    for number in range(120):
        with open(os.path.join(box, "new", "%d.M000000P1Q%d.host" % (1700000000 + number, number)), "wb") as file:
            file.write(b"Subject: n%d\n\nx\n" % number)
    data = get_json(web, "/api/v1/messages?limit=50")
    assert data["total"] == 120 and data["messages"][0]["Subject"] == "n119"
    assert len(web.mail_index.summaries) == 50               # parsed once, and only the page
    assert get_json(web, "/api/v1/messages?start=50&limit=50")["messages"][0]["Subject"] == "n69"
    assert len(web.mail_index.summaries) == 100


def test_http_cli_option_and_lazy_import(tmp_path):
    assert "--http" in run_cli("--help").stdout and "127.0.0.1:8025" in run_cli("--help").stdout
    process, lines = start_cli(tmp_path, "--http", "127.0.0.1:0")
    try:
        http_line = [line for line in lines if line.startswith("minimail: http listening on 127.0.0.1:")]
        assert http_line and not http_line[0].rstrip().endswith(":0")
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
    code = ("import sys, minimail; app = minimail.App(minimail.Config(maildir=%r, smtp=('127.0.0.1', 0))); "
            "app.start(); app.stop(); print('http.server' in sys.modules)" % str(tmp_path / "m"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=HERE)
    assert result.stdout.strip() == "False", result.stderr


def test_http_index_warms_up_in_the_background(tmp_path):
    box = tmp_path / "maildir" / "old@example.test"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    for number in range(30):
        (box / "new" / ("%d.M000000P1Q%d.host" % (1700000000 + number, number))).write_bytes(b"Subject: s\n\nx\n")
    with running(base_config(tmp_path, http=("127.0.0.1", 0))) as app:
        assert wait_for(lambda: warmed_up(app), timeout=10)
        assert len(app.mail_index.summaries) == 30



def test_http_refuses_foreign_host_names_without_logins(make_server):
    """A DNS-rebinding page (its name resolving to 127.0.0.1) must not read the mail."""
    app = make_server(http=("127.0.0.1", 0))
    with smtp_client(app.smtp_port) as client:
        client.sendmail("a@sender.test", ["u@example.test"], b"Subject: secret\r\n\r\nx\r\n")
    for host, status in (("rebind.evil.test:%d" % app.http_port, 403), ("localhost", 200),
                         ("127.0.0.1:%d" % app.http_port, 200), ("[::1]", 200),
                         ("mx.example.test", 200), ("app.localhost", 200)):
        with Raw(app.http_port, greeting=False) as client:
            client.send(b"GET /api/v1/messages HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                        % host.encode())
            assert client.read_line().split()[1] == str(status).encode(), host


@pytest.mark.parametrize("body", [b'{"IDs": ""}', b'{"IDs": {}}', b'{"IDs": 0}', b'{"IDs": false}',
                                  b'{"IDs": "abc"}', b'{"Search": 5}'])
def test_http_wrong_types_never_mean_everything(make_server, body):
    app = make_server(http=("127.0.0.1", 0))
    with smtp_client(app.smtp_port) as client:
        client.sendmail("a@sender.test", ["u@example.test"], b"Subject: keep\r\n\r\nx\r\n")
    request = urllib.request.Request("http://127.0.0.1:%d/api/v1/messages" % app.http_port,
                                     data=body, method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as failure:
        _OPENER.open(request, timeout=5)
    assert failure.value.code == 400
    failure.value.close()
    assert len(delivered(app, "u@example.test")) == 1
    request = urllib.request.Request("http://127.0.0.1:%d/api/v1/search?query=%%22%%22" % app.http_port,
                                     method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as failure:
        _OPENER.open(request, timeout=5)
    assert failure.value.code == 400
    failure.value.close()
    assert len(delivered(app, "u@example.test")) == 1


def test_http_mailbox_search_acts_on_that_mailbox_only(make_server):
    app = make_server(http=("127.0.0.1", 0))
    with smtp_client(app.smtp_port) as client:
        client.sendmail("a@sender.test", ["bob@example.test"], b"Subject: 1\r\n\r\nx\r\n")
        client.sendmail("a@sender.test", ["jimbob@example.test"], b"Subject: 2\r\n\r\nx\r\n")
        client.sendmail("a@sender.test", ["bob@example.test", "alice@example.test"], b"Subject: 3\r\n\r\nx\r\n")
    url = "http://127.0.0.1:%d/api/v1/search?query=%s" % (
        app.http_port, urllib.parse.quote('mailbox:"bob@example.test"'))
    with _OPENER.open(url, timeout=5) as response:
        assert json.load(response)["messages_count"] == 2
    with _OPENER.open(urllib.request.Request(url, method="DELETE"), timeout=5) as response:
        assert response.status == 200
    assert delivered(app, "bob@example.test") == []
    assert len(delivered(app, "jimbob@example.test")) == 1
    assert len(delivered(app, "alice@example.test")) == 1



def test_http_unlistable_mailbox_skipped_not_fatal(web, caplog):
    kept = send_message(web, b"Subject: fine\r\n\r\nx\r\n", rcpts=("good@example.test",))
    box = os.path.join(web.maildir.root, "bad@example.test")
    for sub in ("tmp", "new"):
        os.makedirs(os.path.join(box, sub))
    with open(os.path.join(box, "new", "1700000000.M1P1Q1.host"), "wb") as file:
        file.write(b"Subject: hidden\n\nx\n")
    with open(os.path.join(box, "cur"), "wb") as file:    # a file where a folder belongs
        file.write(b"x")
    with caplog.at_level(logging.WARNING, logger="minimail"):
        for _ in range(2):
            data = get_json(web, "/api/v1/messages")
            assert [message["ID"] for message in data["messages"]] == [kept]
    warnings = [record for record in caplog.records if "bad@example.test" in record.getMessage()]
    assert len(warnings) == 1                   # once per mailbox, not once per request


def test_http_disk_error_is_a_500_not_a_dropped_connection(web):
    assert wait_for(lambda: warmed_up(web), timeout=10)
    root = web.maildir.root
    os.rename(root, root + ".moved")
    with open(root, "wb") as file:              # listing the root now fails: NotADirectoryError
        file.write(b"x")
    try:
        status, _, body = http_call(web, "GET", "/api/v1/messages")
        assert status == 500 and body == b"Internal error\n"
    finally:
        os.unlink(root)
        os.rename(root + ".moved", root)



def test_http_search_term_count_is_limited(web):
    send_message(web, b"Subject: word\r\n\r\nx\r\n")
    many = " ".join("w%d" % number for number in range(minimail.SEARCH_MAX_TERMS + 1))
    assert http_call(web, "GET", "/api/v1/search?query=" + urllib.parse.quote(many))[0] == 400
    assert http_call(web, "GET", "/api/v1/wait?timeout=0&query=" + urllib.parse.quote(many))[0] == 400
    status, _, body = http_call(web, "PUT", "/api/v1/messages", json.dumps({"Search": many}).encode())
    assert status == 400
    repeated = urllib.parse.quote(" ".join(["word"] * 1000))    # duplicates count once
    assert json.loads(http_call(web, "GET", "/api/v1/search?query=" + repeated)[2])["messages_count"] == 1


def test_http_empty_mailbox_filter_matches_nothing(web):
    send_message(web, b"Subject: keep\r\n\r\nx\r\n")
    for query in ('mailbox:""', 'mailbox: keep', "mailbox:"):
        status, _, _ = http_call(web, "DELETE", "/api/v1/search?query=" + urllib.parse.quote(query))
        assert status == 200
        assert get_json(web, "/api/v1/search?query=" + urllib.parse.quote(query))["messages_count"] == 0
    assert len(stored_files(web, "user@example.test")) == 1


def test_http_mailbox_filter_with_a_quote_in_the_name(web):
    with Raw(web.smtp_port) as client:
        client.send(b'EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<"\\" "@example.test>\r\nDATA\r\n')
        assert [client.read_reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        client.send(b"Subject: odd\r\n\r\nx\r\n.\r\n")
        assert client.read_reply()[0] == 250
    send_message(web, b"Subject: other\r\n\r\nx\r\n")
    odd = '" @example.test'
    assert len(stored_files(web, odd)) == 1
    query = 'mailbox:"%s"' % odd.replace("\\", "\\\\").replace('"', '\\"')    # as the page builds it
    data = get_json(web, "/api/v1/search?query=" + urllib.parse.quote(query))
    assert [message["Subject"] for message in data["messages"]] == ["odd"]
    assert http_call(web, "DELETE", "/api/v1/search?query=" + urllib.parse.quote(query))[0] == 200
    assert stored_files(web, odd) == [] and len(stored_files(web, "user@example.test")) == 1
    page = http_call(web, "GET", "/")[2].decode()
    assert 'state.box.replace(/[\\\\"]/g, "\\\\$&")' in page



def test_http_raw_download_name_is_quoted(web):
    box = os.path.join(web.maildir.root, "user@example.test")
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(box, sub))
    name = '1700000000.M1P1Q1.a"; x=y'
    with open(os.path.join(box, "new", name), "wb") as file:
        file.write(b"Subject: odd name\n\nx\n")
    status, headers, body = http_call(web, "GET", "/api/v1/message/%s/raw?dl=1" % urllib.parse.quote(name))
    assert status == 200 and body == b"Subject: odd name\n\nx\n"
    assert headers["Content-Disposition"] == 'attachment; filename="%s.eml"' % urllib.parse.quote(name)



def test_http_unicode_digits_are_not_numbers(web):
    send_message(web, b"Subject: keep\r\n\r\nx\r\n")
    data = get_json(web, "/api/v1/messages?start=%C2%B2&limit=%D9%A3")     # superscript 2, Arabic 3
    assert data["start"] == 0 and data["count"] == 1        # anything but ASCII digits: the default
    with socket.create_connection(("127.0.0.1", web.http_port), timeout=5) as client:
        client.sendall(b"DELETE /api/v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: \xb2\r\n\r\n")
        reply = client.recv(65536)
    assert reply.split()[1] == b"400", reply[:200]
    assert len(stored_files(web, "user@example.test")) == 1



def test_http_log_shows_status_numbers(web, caplog):
    with caplog.at_level(logging.INFO, logger="minimail"):
        with socket.create_connection(("127.0.0.1", web.http_port), timeout=5) as client:
            client.sendall(b"PATCH /api/v1/messages HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert client.recv(65536).split()[1] == b"501"
        assert wait_for(lambda: any(record.getMessage().endswith(" PATCH /api/v1/messages 501")
                                    for record in caplog.records), timeout=5)
    assert not any("HTTPStatus" in record.getMessage() for record in caplog.records)


# --- POP3 -----------------------------------------------------------------------------

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


def test_pop3_login_waits_briefly_for_a_session_that_is_ending(make_server):
    app = make_server(pop3=("127.0.0.1", 0), users=ALICE, pop3_lock_wait=10)
    with RawPOP3(app.pop3_port) as first, RawPOP3(app.pop3_port) as second:
        first.login(b"alice@example.test", b"secret")
        assert second.command(b"USER alice@example.test").startswith(b"+OK")
        second.send(b"PASS secret\r\n")                # waits: the mailbox is in use
        start = time.monotonic()
        assert first.command(b"QUIT") == b"+OK Bye"
        assert second.read_line().startswith(b"+OK")
        assert time.monotonic() - start < 5


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


def test_pop3_many_moved_messages_cost_one_listing(pop, monkeypatch):
    for number in range(1, 41):
        put_message(pop, "u@example.test", "%02d.msg" % number, b"message %d\n" % number)
    with RawPOP3(pop.pop3_port) as client:
        client.login()
        for stored in pop.maildir.messages("u@example.test"):
            pop.maildir.set_flags(stored, "S")      # the web page's "mark all read"
        listings = []
        messages = pop.maildir.messages
        monkeypatch.setattr(pop.maildir, "messages", lambda mailbox: listings.append(mailbox) or messages(mailbox))
        for number in range(1, 41):
            assert client.command(b"RETR %d" % number).startswith(b"+OK")
            assert client.body() == b"message %d\r\n" % number
        assert client.command(b"QUIT") == b"+OK Bye"
    assert len(listings) == 1


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
    process, lines = start_cli(tmp_path, "-q", "--smtp", "off", "--http", "off")
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


# --- DNS ------------------------------------------------------------------------------

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


def test_dns_cname_to_a_name_with_a_dot_in_a_label_does_not_exist(fake_dns):
    fake_dns.add(rr("alias.test", T_CNAME, b"\x03a.b" + wire_name("test")))     # label "a.b"
    with pytest.raises(minimail.PermFail):
        resolver_for(fake_dns).resolve_mx("alias.test")
    assert fake_dns.asked() == [("alias.test", T_MX)]


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


# --- Relay through MX hosts -----------------------------------------------------------

def mx_relay_server(make_server, dns, port, **overrides):
    fields = dict(users=(RELAY_USER,), retry_delay=0.05, dns=(dns.address,), dns_timeout=0.5,
                  dns_attempts=1, mx_port=port)
    fields.update(overrides)
    return make_server(**fields)


def test_relay_mx_first_host_down_then_second(make_server, fake_dns, fake_smtp):
    backup = fake_smtp(host="127.0.0.3")
    fake_dns.add(mx_rr("remote.test", 10, "mx1.remote.test"), mx_rr("remote.test", 20, "mx2.remote.test"),
                 a_rr("mx1.remote.test", "127.0.0.2"), a_rr("mx2.remote.test", "127.0.0.3"))
    app = mx_relay_server(make_server, fake_dns, backup.port)      # nothing listens on 127.0.0.2
    send_authenticated(app, ["bob@remote.test"])
    message, = backup.wait_messages(1)
    assert message["rcpts"] == ["bob@remote.test"]
    assert wait_for(lambda: queue_empty(app))
    assert ("remote.test", T_MX) in fake_dns.asked()


def test_relay_mx_groups_recipients_by_domain(make_server, fake_dns, fake_smtp):
    first, second = fake_smtp(host="127.0.0.2"), None
    second = FakeSMTP(host="127.0.0.3", port=first.port)
    try:
        fake_dns.add(mx_rr("one.test", 10, "mx.one.test"), a_rr("mx.one.test", "127.0.0.2"),
                     a_rr("two.test", "127.0.0.3"))                # two.test: implicit MX
        app = mx_relay_server(make_server, fake_dns, first.port)
        send_authenticated(app, ["a@one.test", "b@two.test", "c@one.test"])
        assert first.wait_messages(1)[0]["rcpts"] == ["a@one.test", "c@one.test"]
        assert second.wait_messages(1)[0]["rcpts"] == ["b@two.test"]
    finally:
        second.close()


def test_relay_failed_state_write_after_delivery_sends_nothing_again(make_server, fake_dns, fake_smtp):
    first = fake_smtp(host="127.0.0.2")
    second = FakeSMTP(host="127.0.0.3", port=first.port)
    try:
        fake_dns.add(mx_rr("remote.test", 10, "mx1.remote.test"), mx_rr("remote.test", 20, "mx2.remote.test"),
                     a_rr("mx1.remote.test", "127.0.0.2"), a_rr("mx2.remote.test", "127.0.0.3"))
        app = mx_relay_server(make_server, fake_dns, first.port)
        queue_tmp = os.path.join(app.queue.folder, "tmp")

        def accept_then_break_the_queue():      # the state write after this 250 fails
            os.rmdir(queue_tmp)
            with open(queue_tmp, "w") as file:
                file.write("in the way")
            return "250 2.0.0 queued"

        first.will("END", accept_then_break_the_queue)
        send_authenticated(app, ["bob@remote.test"])
        assert first.wait_messages(1)[0]["rcpts"] == ["bob@remote.test"]
        assert wait_for(lambda: queue_empty(app))
        assert second.sessions == [] and len(first.wait_messages(2, timeout=0.5)) == 1
    finally:
        second.close()

def test_relay_to_a_second_minimail(make_server, fake_dns, tmp_path):
    receiver = minimail.App(base_config(tmp_path, maildir=str(tmp_path / "receiver"),
                                        smtp=("127.0.0.2", 0), domains=("remote.test",)))
    receiver.start()
    try:
        fake_dns.add(mx_rr("remote.test", 5, "mail.remote.test"), a_rr("mail.remote.test", "127.0.0.2"))
        app = mx_relay_server(make_server, fake_dns, receiver.smtp_port)
        send_authenticated(app, ["Bob@remote.test"], b"Subject: hop\r\n\r\n.dot\r\nbody\r\n")
        stored = wait_for(lambda: delivered(receiver, "bob@remote.test"))
        with open(stored[0], "rb") as file:
            data = file.read()
        assert data.count(b"Received: ") == 2 and b"\n.dot\nbody\n" in data
        assert b"Return-Path: <alice@example.test>" in data
    finally:
        receiver.stop()


@pytest.mark.parametrize("records, status", [
    ([], "5.1.2"),                                                      # NXDOMAIN
    ([mx_rr("remote.test", 0, "")], "5.1.10"),                          # null MX, RFC 7505
])
def test_relay_mx_permanent_dns_failure_bounces(make_server, fake_dns, records, status):
    fake_dns.add(*records)
    app = mx_relay_server(make_server, fake_dns, 25)
    send_authenticated(app, ["bob@remote.test"])
    fields, = dsn_fields(read_dsn(app, "alice@example.test"))
    assert fields["Status"] == status and fields["Action"] == "failed"
    assert fields["Final-Recipient"] == "rfc822; bob@remote.test"
    assert wait_for(lambda: queue_empty(app))


def test_relay_mx_dns_timeout_defers(make_server, fake_dns):
    fake_dns.handler = lambda query: []             # never answers
    app = mx_relay_server(make_server, fake_dns, 25, retry_delay=3600, dns_timeout=0.2)
    send_authenticated(app, ["bob@remote.test"])
    queue = app.queue
    assert wait_for(lambda: queue.ids() and queue.load(queue.ids()[0]).recipients[0].state == "deferred")
    assert queue.load(queue.ids()[0]).recipients[0].last_error
    assert delivered(app, "alice@example.test") == []              # no bounce for a 4xx

