#!/usr/bin/env python3
"""minimail: a small, complete mail server in one file of standard-library Python.

Usage:
    python3 minimail.py [serve] --domain example.test [options]
    python3 minimail.py mx DOMAIN [--dns HOST[:PORT]]
    python3 minimail.py queue [--maildir DIR]

Implements SMTP (RFC 5321) with ESMTP extensions PIPELINING (RFC 2920), SIZE
(RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), ENHANCEDSTATUSCODES
(RFC 2034, 3463), CHUNKING (RFC 3030), STARTTLS (RFC 3207) and AUTH PLAIN/LOGIN
(RFC 4954, 4616), submission (RFC 6409), Maildir delivery, and the Received
protocol names of RFC 3848; its own MX resolver (RFC 1035, 2181, 2308, 5452, 6891,
7505, 7766; RFC 5321 5.1).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import dataclasses
import errno
import hmac
import ipaddress
import logging
import os
import random
import re
import secrets
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

__version__ = "0.1.0"
__all__ = ["Config", "App", "main", "resolve_mx"]


# --- Protocol constants -------------------------------------------------------

SMTP_MAX_COMMAND_LINE = 512         # RFC 5321 4.5.3.1.4, including CRLF
SMTP_MAX_PATH_LINE = 1024           # MAIL/RCPT with parameters (Postfix allows as much)
SASL_MAX_RESPONSE_LINE = 12288      # RFC 4954 4: AUTH command or response line
SMTP_MAX_RECIPIENTS = 1000          # Postfix's smtpd_recipient_limit
SMTP_MAX_RECEIVED_HEADERS = 50      # loop detection, RFC 5321 6.3
SMTP_MAX_ERRORS = 20                # Postfix's smtpd_hard_error_limit
AUTH_MAX_FAILURES = 3               # SPEC 4: the third failure closes the session
MAILDIR_NAME_MAX = 255              # bytes in one folder name (NAME_MAX)
HEADER_SCAN_LIMIT = 256 * 1024      # header bytes inspected for Received: counting
RECV_SIZE = 64 * 1024               # one socket read (below glibc's mmap threshold)
WRITE_BUFFER = 256 * 1024           # buffered writes of message files
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104")   # SPEC 1

DNS_PORT = 53
DNS_TYPE_A = 1                      # RFC 1035 3.2.2
DNS_TYPE_CNAME = 5
DNS_TYPE_SOA = 6
DNS_TYPE_MX = 15
DNS_TYPE_AAAA = 28                  # RFC 3596
DNS_TYPE_OPT = 41                   # RFC 6891
DNS_TYPE_NAMES = {DNS_TYPE_A: "A", DNS_TYPE_CNAME: "CNAME", DNS_TYPE_MX: "MX",
                  DNS_TYPE_AAAA: "AAAA"}
DNS_CLASS_IN = 1
DNS_RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
                   5: "REFUSED"}     # RFC 1035 4.1.1
DNS_NOERROR = 0
DNS_NXDOMAIN = 3
DNS_FLAG_QR = 0x8000                # RFC 1035 4.1.1 header flags
DNS_FLAG_TC = 0x0200
DNS_FLAG_RD = 0x0100
DNS_MAX_NAME = 255                  # RFC 1035 2.3.4: octets of a name on the wire
DNS_MAX_LABEL = 63                  # RFC 1035 2.3.4
DNS_MAX_MESSAGE = 65535             # RFC 1035 4.2.2: the TCP length prefix's limit
EDNS_PAYLOAD = 1232                 # RFC 6891 6.2.5, the DNS flag day 2020 value
DNS_MAX_CNAMES = 8                  # CNAMEs followed for one lookup (RFC 1034 3.6.2)
DNS_MAX_MX_HOSTS = 10               # MX hosts resolved for delivery (Postfix: 5 addresses)
DNS_MAX_TTL = 86400                 # cache cap, seconds (RFC 2181 8 allows far more)
DNS_MAX_NEGATIVE_TTL = 10800        # RFC 2308 5: negative answers cached 3 hours at most
RESOLV_MAX_NAMESERVERS = 3          # glibc MAXNS (resolv.conf(5))
RESOLV_DEFAULT_TIMEOUT = 5          # seconds, glibc RES_TIMEOUT
RESOLV_DEFAULT_ATTEMPTS = 2         # glibc RES_DFLRETRY
RESOLV_MAX_TIMEOUT = 30             # glibc RES_MAXRETRANS
RESOLV_MAX_ATTEMPTS = 5             # glibc RES_MAXRETRY
RESOLV_CONF_MAX = 64 * 1024         # bytes of resolv.conf read
EXIT_TEMPFAIL = 75                  # sysexits.h EX_TEMPFAIL: the `mx` command's temporary failure

VERB_RE = re.compile(rb"[A-Za-z]{1,12}")
DATA_TERMINATOR = b"\r\n.\r\n"      # RFC 5321 4.1.1.4: the only end of DATA

log = logging.getLogger("minimail")


# --- Exceptions ---------------------------------------------------------------

class Reply(Exception):
    """A protocol reply raised from a verb method; the handler formats and sends it.

    SMTP uses a numeric code and an enhanced status (RFC 3463); POP3 uses "-ERR" as the
    code and its RFC 2449 response code (e.g. "AUTH") or "" as the status.
    """

    def __init__(self, code, status: str, text: str, close: bool = False):
        super().__init__(code, status, text)
        self.code = code
        self.status = status
        self.text = text
        self.close = close


class TempFail(Exception):
    """A temporary failure (DNS timeout, 4xx reply): try again later."""


class PermFail(Exception):
    """A permanent failure (NXDOMAIN, null MX, 5xx reply): give up and bounce."""


class ConfigError(Exception):
    """A bad option or an unusable resource at startup: one line, exit 2."""


class ClientGone(Exception):
    """The peer closed the connection."""


class IdleTimeout(Exception):
    """The peer sent nothing within the configured timeout."""


class LineTooLong(Exception):
    """A command line exceeded its limit; it was read to its end and discarded."""


# --- Configuration ------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """Everything a running minimail needs; built once by main() or by a test."""

    domains: tuple[str, ...] = ("localhost",)
    maildir: str = "maildir"
    smtp: Optional[tuple[str, int]] = None          # listener addresses: None is off
    submission: Optional[tuple[str, int]] = None
    hostname: str = "localhost"
    users: tuple[tuple[str, str], ...] = ()         # (address, password)
    relay_from: tuple[str, ...] = ()                # CIDR networks that may relay
    catch_all: bool = False
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    max_size: int = 26_214_400                      # bytes; SPEC --max-size
    max_connections: int = 100                      # per listener
    timeout: float = 300.0                          # seconds; RFC 5321 4.5.3.2.7
    auth_failure_delay: float = 1.0                 # seconds before a 535 reply
    loopback_networks: tuple[str, ...] = LOOPBACK_NETWORKS   # tests narrow this
    dns: tuple[tuple[str, int], ...] = ()           # nameservers; () reads resolv_conf
    dns_timeout: Optional[float] = None             # seconds per try; None: resolv.conf's or 5
    dns_attempts: Optional[int] = None              # rounds of tries; None: resolv.conf's or 2
    dns_cache_size: int = 10000                     # cached DNS answers at most
    resolv_conf: str = "/etc/resolv.conf"

    @cached_property
    def accounts(self) -> dict:
        """Mailbox name -> password, for AUTH and POP3 login."""
        return {mailbox_name(address): password for address, password in self.users}

    @cached_property
    def local_domains(self) -> frozenset:
        return frozenset(normalize_domain(domain) for domain in self.domains)

    @cached_property
    def relay_networks(self) -> tuple:
        return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.relay_from)

    @cached_property
    def loopback_nets(self) -> tuple:
        return tuple(ipaddress.ip_network(cidr) for cidr in self.loopback_networks)

    def is_loopback(self, host: str) -> bool:
        """True when host (an IP address string) is in the loopback networks."""
        return _address_in(host, self.loopback_nets)

    def may_relay_from(self, host: str) -> bool:
        return _address_in(host, self.relay_networks)


def _address_in(host: str, networks: tuple) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return any(address.version == net.version and address in net for net in networks)


def parse_addr(text: str) -> Optional[tuple[str, int]]:
    """Parse a listener ADDR: HOST:PORT, [IPv6]:PORT, PORT (127.0.0.1) or "off"."""
    if text == "off":
        return None
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("bad address %r (use [IPv6]:PORT)" % text)
    elif ":" in text:
        host, _, port = text.rpartition(":")
    else:
        host, port = "127.0.0.1", text
    if not port.isdigit() or int(port) > 65535 or not host:
        raise ValueError("bad address %r (use HOST:PORT, [IPv6]:PORT or PORT)" % text)
    return host, int(port)


def parse_nameserver(text: str) -> tuple[str, int]:
    """Parse a --dns server: IP, IP:PORT, [IPv6]:PORT, [IPv6] or a bare IPv6 address (port 53)."""
    host, port = text, DNS_PORT
    try:
        if text.startswith("[") and text.endswith("]"):
            host = text[1:-1]
        elif text.startswith("[") or text.count(":") == 1:
            host, port = parse_addr(text)
        ipaddress.ip_address(host.split("%", 1)[0])
        if port == 0:
            raise ValueError("port 0")
    except ValueError:
        raise ValueError("bad nameserver %r (use IP, IP:PORT or [IPv6]:PORT)" % text) from None
    return host, port


def parse_time(text: str) -> float:
    """Parse a TIME: seconds, or a number with s, m, h or d (fractions allowed)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValueError("bad time %r (use e.g. 30, 0.5s, 5m, 2h, 5d)" % text) from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("bad time %r" % text)
    return value


def parse_account(text: str) -> tuple[str, str]:
    """Parse ADDRESS:PASSWORD into (mailbox name, password)."""
    address, sep, password = text.partition(":")
    if not sep or not password or "@" not in address:
        raise ValueError("bad account %r (use ADDRESS:PASSWORD)" % text)
    try:
        return mailbox_name(address.strip()), password
    except ValueError as exc:
        raise ValueError("bad account address %r: %s" % (address, exc)) from None


def read_users_file(path: str) -> list:
    """Read ADDRESS:PASSWORD lines; blank lines and # comments are skipped."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError("cannot read users file %s: %s" % (path, exc)) from None
    accounts = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                accounts.append(parse_account(line))
            except ValueError as exc:
                raise ValueError("%s line %d: %s" % (path, number, exc)) from None
    return accounts


# --- Addresses and small helpers ----------------------------------------------

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
# Lenient dot-atom (leading, trailing and double dots allowed as Postfix does); unsafe
# folder names are refused later with 553 5.1.3 rather than as a syntax error.
_LOCAL_ATOM = r"[%s.]+" % _ATEXT
# Quoted pairs admit controls too (RFC 5322 obs-qp), so they meet the 553 folder rule.
_LOCAL_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x01-\x7f])*"'
_DOMAIN = r"[A-Za-z0-9\-.\u0080-\U0010ffff]+|\[[A-Za-z0-9:.\-]+\]"
MAILBOX_RE = re.compile(r"(%s|%s)@(%s)" % (_LOCAL_ATOM, _LOCAL_QUOTED, _DOMAIN))
LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")
UNSAFE_FOLDER_RE = re.compile(r"[/\\\x00-\x1f\x7f]")


def normalize_domain(domain: str) -> str:
    """Return the lowercase A-label form of a domain or address literal; ValueError if bad."""
    if domain.startswith("["):
        return domain.lower()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("bad internationalised domain") from None
    domain = domain.lower()
    labels = domain.split(".")
    if len(domain) > 253 or not all(LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError("bad domain %r" % domain)
    return domain


def parse_mailbox(text: str) -> tuple[str, str]:
    """Split an RFC 5321 Mailbox into (unquoted local part, A-label domain)."""
    match = MAILBOX_RE.fullmatch(text)
    if not match:
        raise ValueError("bad address syntax")
    local, domain = match.groups()
    if local.startswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    if len(local.encode("utf-8")) > 64 * 4:       # generous: UTF-8 local parts
        raise ValueError("local part too long")
    return local, normalize_domain(domain)


def mailbox_name(address: str) -> str:
    """Return the folder name (local@domain, lowercased) of a bare address."""
    local, domain = parse_mailbox(address)
    return "%s@%s" % (local.lower(), domain)


def is_safe_folder(name: str) -> bool:
    """True when a mailbox folder name cannot escape or confuse the maildir root (SPEC 3)."""
    local = name.rpartition("@")[0]
    return not (UNSAFE_FOLDER_RE.search(name) or local in (".", "..") or local.startswith(".")
                or len(name.encode("utf-8")) > MAILDIR_NAME_MAX)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc5322_date(when: Optional[float] = None) -> str:
    """Format a local time as an RFC 5322 date with a numeric zone, independent of locale."""
    tm = time.localtime(when)
    offset_min = (tm.tm_gmtoff or 0) // 60
    sign = "-" if offset_min < 0 else "+"
    hours, minutes = divmod(abs(offset_min), 60)
    return "%s, %d %s %d %02d:%02d:%02d %s%02d%02d" % (
        _DAYS[tm.tm_wday], tm.tm_mday, _MONTHS[tm.tm_mon - 1], tm.tm_year,
        tm.tm_hour, tm.tm_min, tm.tm_sec, sign, hours, minutes)


def address_literal(ip: str) -> str:
    """The RFC 5321 4.1.3 form of a client address for trace headers."""
    return "[IPv6:%s]" % ip if ":" in ip else "[%s]" % ip


def mask_auth(line: bytes) -> bytes:
    """Hide credentials in a logged AUTH line or SASL response."""
    parts = line.split(b" ")
    if parts[0].upper() == b"AUTH":
        return b" ".join(parts[:2] + [b"****"] * (len(parts) > 2))
    return b"****"


# --- Storage: Maildir delivery --------------------------------------------------

class MessageIds:
    """Unique Maildir base names, safe across threads and processes.

    The form is the classic time.MusecPpidQcount.host plus a random part, so two
    processes with the same PID (containers sharing a volume) still never collide.
    """

    def __init__(self, hostname: str):
        self.host = re.sub(r"[^A-Za-z0-9.\-]", "_", hostname)[:40] or "localhost"
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.count = 0

    def new(self) -> str:
        with self.lock:
            self.count += 1
            count = self.count
        now = time.time()
        return "%d.M%06dP%dQ%dR%08x.%s" % (now, (now % 1) * 1e6, self.pid, count,
                                           random.getrandbits(32), self.host)


def message_id_of(filename: str) -> str:
    """The message ID (SPEC 3): a Maildir file name up to its first ',' or ':'."""
    return re.split(r"[,:]", filename, maxsplit=1)[0]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StoredMessage:
    """One message file of one mailbox, as found on disk."""
    mailbox: str
    folder: str             # "new" or "cur"
    name: str               # the file name: ID, optional ,S=/,W= tags, optional :2,FLAGS
    path: str

    @property
    def id(self) -> str:
        return message_id_of(self.name)

    @property
    def flags(self) -> str:
        """Maildir info flags (the part after ':2,')."""
        _, sep, flags = self.name.partition(":2,")
        return flags if sep else ""

    def wire_size(self) -> int:
        """Bytes the message takes on the wire with CRLF line ends (POP3 octets, RFC 1939 11).

        On the wire every LF not preceded by CR becomes CRLF, and a last line without a line
        end gets CRLF. The ,W= tag is trusted only when ,S= equals the real size (SPEC 3);
        otherwise the file is read once to count its line ends.
        """
        real_size = os.stat(self.path).st_size
        tags = dict(re.findall(r",([SW])=(\d+)", self.name.partition(":")[0]))
        if tags.get("S") == str(real_size) and "W" in tags:
            return int(tags["W"])
        added = 0
        last = b""
        with open(self.path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                added += block.count(b"\n") - block.count(b"\r\n")
                if last == b"\r" and block.startswith(b"\n"):
                    added -= 1
                last = block[-1:]
        return real_size + added + (2 if last not in (b"", b"\n") else 0)


class Maildir:
    """The tree of mailboxes below one root: <root>/<local@domain>/{tmp,new,cur}."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def path(self, mailbox: str) -> str:
        return os.path.join(self.root, mailbox)

    def mailboxes(self) -> list:
        """Names of the mailboxes that exist (folders named local@domain with a new/)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(name for name in names
                      if "@" in name and os.path.isdir(os.path.join(self.root, name, "new")))

    def messages(self, mailbox: str) -> list:
        """Every message of a mailbox, in new/ and cur/, oldest name first (no file is read)."""
        found = []
        for folder in ("new", "cur"):
            directory = os.path.join(self.root, mailbox, folder)
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            found.extend(StoredMessage(mailbox, folder, name, os.path.join(directory, name))
                         for name in names if not name.startswith("."))
        found.sort(key=lambda message: message.name)
        return found

    def find(self, mailbox: str, message_id: str) -> Optional[StoredMessage]:
        """The current file of a message by ID, wherever it moved between new/ and cur/."""
        for message in self.messages(mailbox):
            if message.id == message_id:
                return message
        return None

    def set_flags(self, message: StoredMessage, flags: str) -> StoredMessage:
        """Move a message to cur/ with the given Maildir flags (kept in ASCII order)."""
        base = message.name.partition(":")[0]
        name = "%s:2,%s" % (base, "".join(sorted(set(flags))))
        path = os.path.join(self.root, message.mailbox, "cur", name)
        if path != message.path:
            os.rename(message.path, path)
        return StoredMessage(message.mailbox, "cur", name, path)

    def ensure(self, mailbox: str) -> str:
        """Create a mailbox's folders (durably) if needed; return its path."""
        box = self.path(mailbox)
        if not os.path.isdir(os.path.join(box, "new")):
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(box, sub), mode=0o700, exist_ok=True)
            fsync_dir(box)
            fsync_dir(self.root)
        return box


@dataclass
class _Copy:
    """One file being written for one mailbox."""
    mailbox: str
    header: bytes
    tmp_path: str = ""
    final_path: str = ""


class MessageWriter:
    """Stream one message from the wire into every recipient's Maildir, durably.

    Data arrives as SMTP wire text (CRLF lines, already unstuffed). It is stored with
    LF line ends, as Postfix, Dovecot and mailbox.Maildir store Maildir files; bare CR
    and bare LF both become LF, so nothing ambiguous is ever stored or relayed. The
    first copy is written as data arrives; others are copied from it at commit, each
    with its own header. Nothing is visible in new/ before commit() has fsync'd it.
    """

    def __init__(self, maildir: Maildir, message_id: str, copies: list):
        self.maildir = maildir
        self.message_id = message_id
        self.copies = copies
        self.size = 0               # message bytes as received (after unstuffing)
        self.body_bytes = 0         # bytes stored after the per-copy header
        self.body_lines = 0         # LF count of the stored body
        self.held_cr = b""          # a trailing CR waiting to see whether LF follows
        self.last_byte = b""
        self.head = bytearray()     # start of the message, for counting Received:
        self.head_done = False
        self.fd = -1                # the first copy's file
        self.unwritten = []         # stored bytes not yet written to fd
        self.unwritten_bytes = 0
        self.max_size = 0
        self.oversized = False

    def open(self, max_size: int) -> None:
        self.max_size = max_size
        self.fd = self._create(self.copies[0])

    def _create(self, copy: _Copy) -> int:
        """Create the copy's file in tmp/ with its header written; return its descriptor."""
        copy.tmp_path = os.path.join(self.maildir.path(copy.mailbox), "tmp", self.message_id)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(copy.tmp_path, flags, 0o600)
        except FileNotFoundError:
            self.maildir.ensure(copy.mailbox)
            fd = os.open(copy.tmp_path, flags, 0o600)
        try:
            _write_all(fd, copy.header)
        except OSError:
            os.close(fd)
            raise
        return fd

    def write(self, data: bytes) -> None:
        """Store a piece of wire data; past max_size, only count it."""
        self.size += len(data)
        if self.size > self.max_size:
            self.oversized = True
            return
        if self.held_cr:
            data = self.held_cr + data
            self.held_cr = b""
        if data.endswith(b"\r"):
            self.held_cr = b"\r"
            data = data[:-1]
        data = data.replace(b"\r\n", b"\n")
        if b"\r" in data:
            data = data.replace(b"\r", b"\n")
        self._store(data)

    def _store(self, data: bytes) -> None:
        if not self.head_done:
            self.head += data
            end = self.head.find(b"\n\n")
            if self.head.startswith(b"\n") or end >= 0 or len(self.head) >= HEADER_SCAN_LIMIT:
                self.head_done = True
                if end >= 0:
                    del self.head[end + 1:]
        if data:
            self.body_bytes += len(data)
            self.body_lines += data.count(b"\n")
            self.last_byte = data[-1:]
            self.unwritten.append(data)
            self.unwritten_bytes += len(data)
            if self.unwritten_bytes >= WRITE_BUFFER:
                self._write_out()

    def _write_out(self) -> None:
        _write_all(self.fd, b"".join(self.unwritten))
        self.unwritten = []
        self.unwritten_bytes = 0

    def finish(self) -> None:
        """Flush the end of the data: a held CR becomes LF and the last line ends in LF."""
        if not self.oversized and (self.held_cr or self.last_byte not in (b"", b"\n")):
            self._store(b"\n")
        self.held_cr = b""

    def received_count(self) -> int:
        return len(re.findall(rb"^received:", bytes(self.head), re.I | re.M))

    def commit(self) -> list:
        """Make every copy durable and visible in new/; return the final paths.

        On any failure, nothing stays in new/: copies already moved are removed again,
        so the client's retry cannot create a duplicate.
        """
        first = self.copies[0]
        moved = []
        try:
            self._write_out()
            os.fsync(self.fd)
            body_offset = len(first.header)
            for copy in self.copies[1:]:
                fd = self._create(copy)
                try:
                    _copy_range(self.fd, fd, body_offset, self.body_bytes)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.close(self.fd)
            self.fd = -1
            new_dirs = set()
            for copy in self.copies:
                size = len(copy.header) + self.body_bytes
                lines = copy.header.count(b"\n") + self.body_lines
                box = self.maildir.path(copy.mailbox)
                copy.final_path = os.path.join(
                    box, "new", "%s,S=%d,W=%d" % (self.message_id, size, size + lines))
                os.rename(copy.tmp_path, copy.final_path)
                moved.append(copy.final_path)
                new_dirs.add(os.path.join(box, "new"))
            for directory in new_dirs:
                fsync_dir(directory)
        except OSError:
            for path in moved:
                _unlink_quietly(path)
            self.abort()
            raise
        return moved

    def abort(self) -> None:
        """Remove every temporary file; nothing of this message stays on disk."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.unwritten = []
        for copy in self.copies:
            if copy.tmp_path:
                _unlink_quietly(copy.tmp_path)


def _copy_range(source_fd: int, target_fd: int, offset: int, count: int) -> None:
    """Copy count bytes from offset of source_fd to the end of target_fd, in the kernel when possible."""
    while count > 0:
        try:
            sent = os.sendfile(target_fd, source_fd, offset, min(count, 1 << 30))
        except OSError:
            sent = 0
        if sent <= 0:       # sendfile unsupported between these files: copy by hand
            data = os.pread(source_fd, min(count, 1 << 20), offset)
            if not data:
                raise OSError(errno.EIO, "short read while copying a message")
            sent = os.write(target_fd, data)
        offset += sent
        count -= sent


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --- DNS --------------------------------------------------------------------------

class DNSFormatError(ValueError):
    """A DNS message that breaks the RFC 1035 wire format."""


@dataclass(frozen=True)
class DNSRecord:
    """One resource record. data is an IP string (A, AAAA), a name (CNAME), a tuple
    (preference, exchange) for MX or (mname, rname, serial, refresh, retry, expire,
    minimum) for SOA, and the raw bytes for every other type."""
    name: str
    rtype: int
    rclass: int
    ttl: int
    data: object


@dataclass(frozen=True)
class DNSMessage:
    """A decoded DNS message; names are lowercase, without a trailing dot ("" is the root)."""
    id: int
    flags: int
    rcode: int              # with the EDNS0 extended bits (RFC 6891 6.1.3)
    question: tuple         # ((name, type, class), ...)
    answers: tuple = ()
    authority: tuple = ()
    additional: tuple = ()

    @property
    def truncated(self) -> bool:
        return bool(self.flags & DNS_FLAG_TC)


def mail_domain(domain: str) -> str:
    """The A-label form of a domain to look up (one trailing dot allowed); ValueError if bad."""
    name = normalize_domain(domain[:-1] if domain.endswith(".") else domain)
    if name.startswith("["):
        raise ValueError("%s is an address literal, not a domain" % name)
    return name


def encode_name(name: str) -> bytes:
    """The uncompressed wire form of a name given in A-labels; ValueError if it cannot be one."""
    text = name[:-1] if name.endswith(".") else name
    labels = [label.encode("ascii") for label in text.split(".")] if text else []
    if any(not 0 < len(label) <= DNS_MAX_LABEL for label in labels):
        raise ValueError("bad DNS name %r" % name)
    wire = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    if len(wire) > DNS_MAX_NAME:
        raise ValueError("DNS name too long")
    return wire


def build_query(name: str, qtype: int, query_id: int) -> bytes:
    """A recursive query for one name and type, with an EDNS0 OPT record (RFC 6891)."""
    header = struct.pack("!6H", query_id, DNS_FLAG_RD, 1, 0, 0, 1)
    opt = b"\x00" + struct.pack("!HHIH", DNS_TYPE_OPT, EDNS_PAYLOAD, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, DNS_CLASS_IN) + opt


def parse_response(data: bytes) -> DNSMessage:
    """Decode a DNS message; DNSFormatError for anything RFC 1035 does not allow.

    Every count and length is checked against the packet. A truncated (TC) message
    keeps only its header and question: its other sections may be cut anywhere, and
    it is asked again over TCP anyway (RFC 2181 9).
    """
    if len(data) < 12:
        raise DNSFormatError("short header")
    query_id, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", data)
    offset = 12
    question = []
    for _ in range(qdcount):
        name, offset = _read_name(data, offset)
        if offset + 4 > len(data):
            raise DNSFormatError("question runs past the end")
        question.append((name,) + struct.unpack_from("!HH", data, offset))
        offset += 4
    sections = ([], [], [])
    if not flags & DNS_FLAG_TC:
        for section, count in zip(sections, (ancount, nscount, arcount)):
            for _ in range(count):
                record, offset = _read_record(data, offset)
                section.append(record)
    rcode = flags & 0x000F
    for record in sections[2]:
        if record.rtype == DNS_TYPE_OPT:
            rcode |= (record.ttl >> 24) << 4
            break
    return DNSMessage(query_id, flags, rcode, tuple(question), *map(tuple, sections))


def _read_name(data: bytes, offset: int) -> tuple:
    """Decode the name at offset; return it and the offset just after it.

    A compression pointer must point before the labels that led to it (RFC 1035 4.1.4
    says "prior occurrence"), so pointers can neither loop nor point forward; the name
    may not exceed 255 octets.
    """
    labels = []
    wire_length = 1
    end = None                  # where the name ends at its original place
    start = position = offset
    while True:
        if position >= len(data):
            raise DNSFormatError("name runs past the end")
        length = data[position]
        if length >= 0xC0:
            if position + 1 >= len(data):
                raise DNSFormatError("name runs past the end")
            target = (length & 0x3F) << 8 | data[position + 1]
            if target >= start:
                raise DNSFormatError("compression pointer does not point backwards")
            if end is None:
                end = position + 2
            start = position = target
            continue
        if length > DNS_MAX_LABEL:
            raise DNSFormatError("bad label length or type %#x" % length)
        if length == 0:
            if any(_LABEL_ESCAPE_RE.search(label) for label in labels):
                labels = [_LABEL_ESCAPE_RE.sub(_escape_octet, label) for label in labels]
            return b".".join(labels).lower().decode("ascii"), position + 1 if end is None else end
        wire_length += length + 1
        if wire_length > DNS_MAX_NAME:
            raise DNSFormatError("name longer than 255 octets")
        label = data[position + 1:position + 1 + length]
        if len(label) < length:
            raise DNSFormatError("label runs past the end")
        labels.append(label)
        position += 1 + length


_LABEL_ESCAPE_RE = re.compile(rb"[^!-~]|[.\\]")      # octets written as \DDD (RFC 1035 5.1)


def _escape_octet(match) -> bytes:
    return b"\\%03d" % match.group()[0]


def _read_record(data: bytes, offset: int) -> tuple:
    """Decode the resource record at offset; return it and the offset after it."""
    name, offset = _read_name(data, offset)
    if offset + 10 > len(data):
        raise DNSFormatError("record runs past the end")
    rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", data, offset)
    start = offset + 10
    end = start + rdlength
    if end > len(data):
        raise DNSFormatError("RDLENGTH runs past the end")
    if rtype != DNS_TYPE_OPT and ttl >= 1 << 31:
        ttl = 0                 # RFC 2181 8: a TTL with the top bit set means zero
    return DNSRecord(name, rtype, rclass, ttl, _read_rdata(data, rtype, start, end)), end


def _read_rdata(data: bytes, rtype: int, start: int, end: int) -> object:
    """Decode the RDATA of the types the resolver uses; its length must be exact."""
    if rtype in (DNS_TYPE_A, DNS_TYPE_AAAA):
        family = socket.AF_INET if rtype == DNS_TYPE_A else socket.AF_INET6
        if end - start != (4 if rtype == DNS_TYPE_A else 16):
            raise DNSFormatError("bad address length")
        return socket.inet_ntop(family, data[start:end])
    if rtype == DNS_TYPE_CNAME:
        value, position = _read_name(data, start)
    elif rtype == DNS_TYPE_MX:
        if end - start < 3:
            raise DNSFormatError("MX record too short")
        exchange, position = _read_name(data, start + 2)
        value = (struct.unpack_from("!H", data, start)[0], exchange)
    elif rtype == DNS_TYPE_SOA:
        mname, position = _read_name(data, start)
        rname, position = _read_name(data, position)
        if position + 20 != end:
            raise DNSFormatError("bad SOA length")
        return (mname, rname) + struct.unpack_from("!5I", data, position)
    else:
        return data[start:end]
    if position != end:
        raise DNSFormatError("bad RDLENGTH")
    return value


def read_resolv_conf(path: str) -> tuple:
    """(nameservers, timeout_s, attempts) from a resolv.conf, with glibc's defaults and caps.

    Only `nameserver` (the first three) and `options timeout:N attempts:N` matter here.
    Without any nameserver, or without the file, the local server is used (resolv.conf(5)).
    """
    servers = []
    timeout_s = RESOLV_DEFAULT_TIMEOUT
    attempts = RESOLV_DEFAULT_ATTEMPTS
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read(RESOLV_CONF_MAX).splitlines()
    except OSError:
        lines = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and len(servers) < RESOLV_MAX_NAMESERVERS:
            try:
                ipaddress.ip_address(words[1].split("%", 1)[0])
            except ValueError:
                continue
            servers.append((words[1], DNS_PORT))
        elif words and words[0] == "options":
            for option in words[1:]:
                name, _, value = option.partition(":")
                if name == "timeout" and value.isdigit():
                    timeout_s = min(max(int(value), 1), RESOLV_MAX_TIMEOUT)
                elif name == "attempts" and value.isdigit():
                    attempts = min(max(int(value), 1), RESOLV_MAX_ATTEMPTS)
    return tuple(servers) or (("127.0.0.1", DNS_PORT),), float(timeout_s), attempts


@dataclass
class MXHost:
    """A mail exchanger of a domain (RFC 5321 5.1)."""
    preference: int
    host: str                                       # A-label, lowercase, no trailing dot
    addresses: list = field(default_factory=list)   # IPv4 first, then IPv6; may be empty


@dataclass(frozen=True)
class _Answer:
    """The outcome of one lookup, as cached: the records of the asked type at the end of
    any CNAME chain (empty for NODATA and NXDOMAIN)."""
    records: tuple
    exists: bool = True             # False for NXDOMAIN
    additional: tuple = ()          # (name, address) of MX exchanges, from the same reply
    ttl: int = 0


class _ServerFailure(Exception):
    """One nameserver gave no usable reply (timeout, error, malformed); ask the next."""


class Resolver:
    """A caching stub resolver for mail delivery: MX, then A and AAAA (SPEC 6).

    Queries go over UDP, and again over TCP when truncated, to each nameserver in turn.
    Every query has a random ID and its own socket (a random source port), and replies
    that do not match the server, ID and question are ignored (RFC 5452 9). Answers are
    cached by TTL, negative ones by their SOA (RFC 2308); the cache is bounded and
    shared by the threads that use this resolver.
    """

    def __init__(self, config: Config):
        self.config = config
        self.lock = threading.Lock()
        self.cache = collections.OrderedDict()      # (name, qtype) -> (expiry, _Answer)
        self.resolv_conf = None                     # (mtime, settings) of the last read

    def resolve_mx(self, domain: str, addresses: bool = True) -> list:
        """The MXHost list of a domain in delivery order; PermFail or TempFail if none.

        Preferences ascend and equal ones are shuffled. No MX records means the implicit
        MX, the domain itself, which must then have an address (RFC 5321 5.1); a null
        MX (RFC 7505) and NXDOMAIN are permanent failures. With addresses, the first
        DNS_MAX_MX_HOSTS hosts (those delivery tries) are returned with their A and AAAA
        addresses, and a domain none of whose hosts has one fails, temporarily if any
        lookup did. Without, every MX host is returned and none is looked up.
        """
        try:
            name = mail_domain(domain)
        except ValueError as exc:
            raise PermFail(str(exc)) from None
        answer = self.lookup(name, DNS_TYPE_MX)
        if not answer.exists:
            raise PermFail("domain %s does not exist (NXDOMAIN)" % name)
        if any(exchange == "" for _, exchange in answer.records):
            raise _permanent("domain %s accepts no mail (null MX, RFC 7505)" % name, "5.1.10")
        if answer.records:
            hosts = _order_mx_hosts(answer.records)
            if not hosts:
                raise _permanent("no MX record of %s names a valid host" % name, "5.4.4")
            if not addresses:
                return hosts
            del hosts[DNS_MAX_MX_HOSTS:]
        else:
            hosts = [MXHost(0, name)]
        known = {}
        for host_name, address in answer.additional:
            known.setdefault(host_name, []).append(address)
        errors = []
        for host in hosts:
            host.addresses = known.get(host.host) or self._addresses(host.host, errors)
        if any(host.addresses for host in hosts):
            return hosts
        if errors:
            raise TempFail("no address found for the mail hosts of %s: %s" % (name, errors[0]))
        if answer.records:
            raise _permanent("no MX host of %s has an address record" % name, "5.4.4")
        raise _permanent("domain %s has no MX and no address record" % name, "5.4.4")

    def _addresses(self, host: str, errors: list) -> list:
        """The A then AAAA addresses of a host; temporary failures are added to errors."""
        found = []
        for qtype in (DNS_TYPE_A, DNS_TYPE_AAAA):
            try:
                answer = self.lookup(host, qtype)
            except TempFail as exc:
                errors.append(exc)
                continue
            if not answer.exists:
                break
            found.extend(answer.records)
        return found

    def lookup(self, name: str, qtype: int) -> _Answer:
        """The records of one type at a name (A-labels), from the cache while fresh."""
        key = (name, qtype)
        with self.lock:
            entry = self.cache.get(key)
            if entry is not None:
                if entry[0] > time.monotonic():
                    self.cache.move_to_end(key)
                    return entry[1]
                del self.cache[key]
        answer = self._resolve(name, qtype)
        if answer.ttl > 0:
            with self.lock:
                self.cache[key] = (time.monotonic() + answer.ttl, answer)
                self.cache.move_to_end(key)
                while len(self.cache) > self.config.dns_cache_size:
                    self.cache.popitem(last=False)
        return answer

    def _resolve(self, name: str, qtype: int) -> _Answer:
        """Ask the nameservers, following CNAMEs from the queried name (bounded)."""
        target = name
        ttl = DNS_MAX_TTL
        cnames = 0
        while True:
            asked = target
            try:
                encode_name(asked)
            except ValueError:      # a CNAME to something no query can carry
                return _Answer((), exists=False)
            message = self._exchange(asked, qtype)
            answers = [record for record in message.answers if record.rclass == DNS_CLASS_IN]
            while True:
                records = [record for record in answers
                           if record.name == target and record.rtype == qtype]
                alias = next((record for record in answers
                              if record.name == target and record.rtype == DNS_TYPE_CNAME), None)
                if records or alias is None:
                    break
                cnames += 1
                if cnames > DNS_MAX_CNAMES:
                    raise TempFail("DNS lookup of %s: CNAME chain too long or looping"
                                   % _question_text(name, qtype))
                ttl = min(ttl, alias.ttl)
                target = alias.data
            if records:
                ttl = min([ttl] + [record.ttl for record in records])
                additional = ()
                if qtype == DNS_TYPE_MX:
                    additional = _mx_additional(message, records)
                    ttl = min([ttl] + [record.ttl for record in additional])
                return _Answer(tuple(record.data for record in records), ttl=ttl, additional=tuple(
                    (record.name, record.data) for record in additional))
            if message.rcode == DNS_NXDOMAIN or target == asked:
                return _Answer((), exists=message.rcode != DNS_NXDOMAIN,
                               ttl=min(ttl, _negative_ttl(message)))
            # The reply ends in a CNAME whose target it does not answer: ask for the target.

    def _exchange(self, name: str, qtype: int) -> DNSMessage:
        """The first NOERROR or NXDOMAIN reply of the nameservers, each tried in turn.

        SERVFAIL, REFUSED, malformed replies and timeouts move on to the next server;
        when every attempt at every server failed, TempFail says what each did.
        """
        servers, timeout_s, attempts = self.settings()
        problems = []
        for _ in range(attempts):
            for server in servers:
                try:
                    message = self._ask(server, name, qtype, timeout_s)
                except _ServerFailure as exc:
                    problems.append("%s %s" % (format_addr(server), exc))
                    continue
                if message.rcode in (DNS_NOERROR, DNS_NXDOMAIN):
                    return message
                problems.append("%s answered %s" % (format_addr(server), DNS_RCODE_NAMES.get(
                    message.rcode, "rcode %d" % message.rcode)))
        raise TempFail("DNS lookup of %s failed: %s" % (
            _question_text(name, qtype), "; ".join(dict.fromkeys(problems))))

    def _ask(self, server: tuple, name: str, qtype: int, timeout_s: float) -> DNSMessage:
        """One query to one server over UDP, repeated over TCP if the reply is truncated."""
        query = build_query(name, qtype, secrets.randbits(16))
        question = ((name, qtype, DNS_CLASS_IN),)
        log.debug("dns >> %s %s", format_addr(server), _question_text(name, qtype))
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        deadline = time.monotonic() + timeout_s
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                # A connected socket: the kernel drops datagrams from any other address.
                sock.connect(server)
                sock.send(query)
                while True:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    message = _match_reply(sock.recv(DNS_MAX_MESSAGE), query, question)
                    if message is not None:
                        break
            if message.truncated:
                message = self._ask_tcp(server, query, question, timeout_s)
        except socket.timeout:
            raise _ServerFailure("timed out") from None
        except OSError as exc:
            raise _ServerFailure("failed: %s" % (exc.strerror or exc.__class__.__name__)) from None
        log.debug("dns << %s %s %s", format_addr(server), _question_text(name, qtype),
                  DNS_RCODE_NAMES.get(message.rcode, message.rcode))
        return message

    def _ask_tcp(self, server: tuple, query: bytes, question: tuple,
                 timeout_s: float) -> DNSMessage:
        """Repeat a query over TCP (RFC 7766 5): two-octet length prefix, bounded reads."""
        deadline = time.monotonic() + timeout_s
        with socket.create_connection(server, timeout=timeout_s) as sock:
            sock.sendall(struct.pack("!H", len(query)) + query)
            length = struct.unpack("!H", _recv_exactly(sock, 2, deadline))[0]
            message = _match_reply(_recv_exactly(sock, length, deadline), query, question)
        if message is None or message.truncated:
            raise _ServerFailure("sent an unusable reply over TCP")
        return message

    def settings(self) -> tuple:
        """(nameservers, timeout_s, attempts): Config.dns with glibc's defaults, or else
        resolv.conf's; Config.dns_timeout and dns_attempts override either."""
        config = self.config
        if config.dns:
            servers = config.dns
            timeout_s, attempts = RESOLV_DEFAULT_TIMEOUT, RESOLV_DEFAULT_ATTEMPTS
        else:
            servers, timeout_s, attempts = self._read_resolv_conf()
        return (servers, float(timeout_s if config.dns_timeout is None else config.dns_timeout),
                attempts if config.dns_attempts is None else config.dns_attempts)

    def _read_resolv_conf(self) -> tuple:
        """resolv.conf's settings, read again only when the file has changed."""
        try:
            stamp = os.stat(self.config.resolv_conf).st_mtime_ns
        except OSError:
            stamp = None
        with self.lock:
            if self.resolv_conf is not None and self.resolv_conf[0] == stamp:
                return self.resolv_conf[1]
        settings = read_resolv_conf(self.config.resolv_conf)
        with self.lock:
            self.resolv_conf = (stamp, settings)
        return settings


def _permanent(text: str, status: str) -> PermFail:
    """A PermFail with the enhanced status (RFC 3463) its bounce reports; 5.1.2 without."""
    error = PermFail(text)
    error.status = status
    return error


def _question_text(name: str, qtype: int) -> str:
    return "%s %s" % (name, DNS_TYPE_NAMES.get(qtype, "TYPE%d" % qtype))


def _match_reply(data: bytes, query: bytes, question: tuple) -> Optional[DNSMessage]:
    """The reply to query, or None for a datagram that is not one (RFC 5452 9.1).

    A reply with the query's ID that cannot be decoded fails this server.
    """
    if data[:2] != query[:2]:
        return None
    try:
        message = parse_response(data)
    except DNSFormatError as exc:
        raise _ServerFailure("sent a malformed reply (%s)" % exc) from None
    if not message.flags & DNS_FLAG_QR or message.question != question:
        return None
    return message


def _recv_exactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    """Read exactly count bytes before the deadline (socket.timeout after it)."""
    data = b""
    while len(data) < count:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise _ServerFailure("closed the TCP connection early")
        data += chunk
    return data


def _order_mx_hosts(records: tuple) -> list:
    """MXHosts by ascending preference, equal preferences shuffled (RFC 5321 5.1).

    An exchange that is not a host name is skipped; a host listed twice keeps its
    lowest preference.
    """
    best = {}
    for preference, exchange in records:
        try:
            host = normalize_domain(exchange)
        except ValueError:
            log.info("dns skipping MX %s: not a host name", exchange)
            continue
        best[host] = min(preference, best.get(host, preference))
    groups = {}
    for host, preference in best.items():
        groups.setdefault(preference, []).append(MXHost(preference, host))
    hosts = []
    for preference in sorted(groups):
        random.shuffle(groups[preference])
        hosts.extend(groups[preference])
    return hosts


def _mx_additional(message: DNSMessage, mx_records: list) -> list:
    """A and AAAA records of the additional section that belong to the MX exchanges, A first."""
    exchanges = {record.data[1] for record in mx_records}
    found = [record for record in message.additional
             if record.rtype in (DNS_TYPE_A, DNS_TYPE_AAAA) and record.rclass == DNS_CLASS_IN
             and record.name in exchanges]
    return sorted(found, key=lambda record: record.rtype == DNS_TYPE_AAAA)


def _negative_ttl(message: DNSMessage) -> int:
    """How long a NODATA or NXDOMAIN reply may be cached: its SOA's TTL and MINIMUM,
    and not at all without an SOA (RFC 2308 3 and 5)."""
    for record in message.authority:
        if record.rtype == DNS_TYPE_SOA:
            return min(record.ttl, record.data[6], DNS_MAX_NEGATIVE_TTL)
    return 0


def resolve_mx(domain: str, config: Optional[Config] = None) -> list:
    """The MX hosts of a domain in delivery order, with a one-off Resolver (see Resolver)."""
    return Resolver(config or Config()).resolve_mx(domain)


# --- Line-protocol base ---------------------------------------------------------

class ThreadedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A TCP listener with one thread per connection, a connection cap and clean stop."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, name: str, address: tuple, handler, config: Config, app: "App"):
        self.name = name
        self.config = config
        self.app = app
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.lock = threading.Lock()
        self.connections = {}       # accepted socket -> thread serving it
        self.handlers = set()       # live handlers; their .sock may have become TLS
        self.sessions = 0
        super().__init__(address, handler)

    def next_session_id(self) -> str:
        with self.lock:
            self.sessions += 1
            return "%s%d" % (self.name[0], self.sessions)

    def process_request(self, request, client_address):
        """Start a thread for the connection, or refuse it when the cap is reached."""
        with self.lock:
            full = len(self.connections) >= self.config.max_connections
            if not full:
                self.connections[request] = None
        if full:
            log.info("%s refused connection from %s: %d connections already",
                     self.name, client_address[0], self.config.max_connections)
            try:
                request.settimeout(1.0)
                request.sendall(self.RequestHandlerClass.too_many_connections)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address), daemon=True)
        with self.lock:
            self.connections[request] = thread
        thread.start()

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.connections.pop(request, None)

    def handle_error(self, request, client_address):
        """Log one line instead of socketserver's traceback on stderr."""
        exc = sys.exc_info()[1]
        log.error("%s connection from %s failed: %s", self.name, client_address[0],
                  exc.__class__.__name__)
        log.debug("traceback", exc_info=True)

    def close_connections(self, wait_s: float) -> None:
        """Shut down every live connection and wait (bounded) for their threads."""
        with self.lock:
            handlers = list(self.handlers)
            threads = [thread for thread in self.connections.values() if thread is not None]
        for handler in handlers:
            try:
                handler.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class LineHandler(socketserver.BaseRequestHandler):
    """Shared loop of the line protocols: bounded reads, timeouts, dispatch by verb.

    It reads the socket through its own buffer rather than socketserver's rfile, so
    STARTTLS can discard exactly the pipelined plaintext and DATA can hand back the
    commands that follow a message.
    """

    verb_prefix = ""
    max_read_line = SMTP_MAX_COMMAND_LINE     # longest line read before it is refused
    too_many_connections = b""

    def setup(self):
        self.config = self.server.config
        self.app = self.server.app
        self.sock = self.request
        self.inbuf = bytearray()
        self.outbuf = []
        self.peer_ip = self.client_address[0]
        self.is_loopback = self.config.is_loopback(self.peer_ip)
        self.sid = self.server.next_session_id()
        self.tls = False
        self.closing = False
        self.read_timeout_s = None
        self.sock.settimeout(None)
        self._set_read_timeout(self.config.timeout)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.config.timeout))
        with self.server.lock:
            self.server.handlers.add(self)

    def finish(self):
        with self.server.lock:
            self.server.handlers.discard(self)
        if self.sock is not self.request:       # a TLS wrapper socketserver does not know
            try:
                self.sock.close()
            except OSError:
                pass

    def handle(self):
        log.info("%s %s connect from %s", self.sid, self.server.name, self.peer_ip)
        try:
            self.start_session()
            while not self.closing:
                try:
                    line = self.read_line(self.max_read_line)
                except LineTooLong:
                    self.send_error(self.line_too_long())
                    continue
                self.dispatch(line)
            self.flush()
        except ClientGone:
            log.info("%s connection closed by client", self.sid)
        except IdleTimeout:
            log.info("%s timeout after %gs", self.sid, self.config.timeout)
            self.on_timeout()
        except OSError as exc:
            log.info("%s connection lost: %s", self.sid, exc.__class__.__name__)
        finally:
            self.end_session()

    # Hooks for each protocol.
    def start_session(self):
        pass

    def end_session(self):
        pass

    def on_timeout(self):
        pass

    def line_too_long(self) -> Reply:
        raise NotImplementedError

    def format_reply(self, reply: Reply) -> bytes:
        raise NotImplementedError

    def unknown_verb(self) -> Reply:
        raise NotImplementedError

    def dispatch(self, line: bytes) -> None:
        """Run one command line through its verb method, turning Reply into a response."""
        log.debug("%s << %r", self.sid, mask_auth(line) if line[:4].upper() == b"AUTH" else line)
        verb, _, arg = line.partition(b" ")
        try:
            if not VERB_RE.fullmatch(verb):
                raise self.unknown_verb()
            method = getattr(self, self.verb_prefix + verb.decode("ascii").upper(), None)
            if method is None:
                raise self.unknown_verb()
            self.check_line(verb.upper(), line)
            method(arg)
        except Reply as reply:
            self.send_error(reply)
        except (ClientGone, IdleTimeout, OSError):
            raise
        except Exception as exc:            # a bug must cost one reply, not the server
            log.error("%s %s failed: %s", self.sid, verb[:12], exc.__class__.__name__)
            log.debug("traceback", exc_info=True)
            self.send_error(self.internal_error())

    def check_line(self, verb: bytes, line: bytes) -> None:
        """Per-verb limits on an already bounded line (overridden by SMTP)."""

    def internal_error(self) -> Reply:
        raise NotImplementedError

    def send_error(self, reply: Reply) -> None:
        self.send(self.format_reply(reply))
        if reply.close:
            self.closing = True

    # Output: replies are collected while pipelined input is waiting (RFC 2920) and
    # sent in one write before the next blocking read.
    def send(self, data: bytes) -> None:
        log.debug("%s >> %r", self.sid, data)
        self.outbuf.append(data)

    def flush(self) -> None:
        if self.outbuf:
            data = b"".join(self.outbuf)
            self.outbuf = []
            try:
                self.sock.sendall(data)
            except (BlockingIOError, socket.timeout):
                raise IdleTimeout() from None

    # Input. Plain sockets stay blocking with SO_RCVTIMEO/SO_SNDTIMEO set once, so a
    # read is one system call; Python's own timeouts would add a poll() and an ioctl().
    def _set_read_timeout(self, seconds: float) -> None:
        if seconds != self.read_timeout_s:
            self.read_timeout_s = seconds
            if self.tls:
                self.sock.settimeout(seconds)
            else:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))

    def _fill(self, deadline: Optional[float] = None) -> None:
        """Read more bytes into the input buffer, flushing pending replies first.

        A deadline bounds a whole command line; without one, each read waits at most
        the configured timeout (a pause inside DATA or BDAT).
        """
        self.flush()
        wait_s = self.config.timeout
        if deadline is not None:
            wait_s = min(wait_s, deadline - time.monotonic())
            if wait_s <= 0:
                raise IdleTimeout()
        self._set_read_timeout(max(wait_s, 0.001))
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, socket.timeout):
            raise IdleTimeout() from None
        if not data:
            raise ClientGone()
        self.inbuf += data

    def read_line(self, limit: int) -> bytes:
        """Return the next line without its CRLF (or bare LF).

        A line longer than limit octets (line end included) is read to its LF and
        discarded, then LineTooLong is raised: none of it is ever run as a command.
        """
        deadline = None
        start = 0
        while True:
            end = self.inbuf.find(b"\n", start)
            if end >= 0:
                line = bytes(self.inbuf[:end])
                del self.inbuf[:end + 1]
                if end + 1 > limit:
                    raise LineTooLong()
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.inbuf) > limit:
                self._discard_to_lf(deadline)
                raise LineTooLong()
            start = len(self.inbuf)
            if deadline is None:        # the first read may take the whole timeout
                deadline = time.monotonic() + self.config.timeout
                self._fill()
            else:
                self._fill(deadline)

    def _discard_to_lf(self, deadline: Optional[float]) -> None:
        while True:
            end = self.inbuf.find(b"\n")
            if end >= 0:
                del self.inbuf[:end + 1]
                return
            self.inbuf.clear()
            self._fill(deadline)

    def read_exactly(self, count: int, sink) -> None:
        """Pass the next count bytes to sink(data) as they arrive (BDAT)."""
        while count > 0:
            if not self.inbuf:
                self._fill()
            data = bytes(self.inbuf[:count])
            del self.inbuf[:len(data)]
            count -= len(data)
            sink(data)

    def read_dot_data(self, sink) -> None:
        """Pass DATA text up to <CRLF>.<CRLF> to sink(data), dot-unstuffed (RFC 5321 4.5.2).

        Only CRLF.CRLF ends the data: <LF>.<LF>, <CR>.<CR> and the other smuggling
        forms are ordinary content. A virtual CRLF before the first line lets one
        search handle both a first-line dot and an empty message. Input after the
        terminator stays buffered for the next command.
        """
        pending = b"\r\n" + bytes(self.inbuf)
        self.inbuf.clear()
        first = True
        while True:
            end = pending.find(DATA_TERMINATOR)
            if end >= 0:
                self.inbuf += pending[end + len(DATA_TERMINATOR):]
                text, pending = pending[:end + 2], b""
            else:
                keep = _terminator_prefix_len(pending)
                text, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
            if text:
                text = text.replace(b"\r\n.", b"\r\n")
                if first:
                    text, first = text[2:], False
                if text:
                    sink(text)
            if end >= 0:
                return
            self._fill()
            pending += bytes(self.inbuf)
            self.inbuf.clear()

    def start_tls(self, context) -> None:
        """Wrap the connection in TLS, discarding any plaintext read ahead (RFC 3207 4.2)."""
        self.flush()
        self.inbuf.clear()
        self.sock.settimeout(self.config.timeout)
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.tls = True
        self.read_timeout_s = self.config.timeout


def _timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO / SO_SNDTIMEO."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def _terminator_prefix_len(data: bytes) -> int:
    """Length of the longest tail of data that could begin a DATA terminator."""
    for length in (4, 3, 2, 1):
        if data.endswith(DATA_TERMINATOR[:length]):
            return length
    return 0


# --- SMTP server ----------------------------------------------------------------

@dataclass
class Envelope:
    """One mail transaction; replaced, never patched, on RSET, after DATA and STARTTLS."""
    sender: Optional[str] = None        # None before MAIL; "" is the null sender
    smtputf8: bool = False
    mailboxes: list = field(default_factory=list)   # local folder names, in RCPT order
    recipients: list = field(default_factory=list)  # every accepted address
    writer: Optional[MessageWriter] = None          # an open BDAT message
    bdat_error: Optional[Reply] = None              # a BDAT failure reported at LAST


class SMTPHandler(LineHandler):
    """An ESMTP session: receiving for local domains, submission with AUTH."""

    verb_prefix = "smtp_"
    max_read_line = SASL_MAX_RESPONSE_LINE      # AUTH may carry a long initial response
    too_many_connections = b"421 4.7.0 Too many connections, try again later\r\n"

    def start_session(self):
        self.helo = None
        self.esmtp = False
        self.auth_user = None       # the account a successful AUTH names
        self.authenticated = False  # AUTH succeeded (maybe as a dev-sink login)
        self.auth_failures = 0
        self.errors = 0
        self.envelope = Envelope()
        self.submission = self.server.name == "submission"
        self.send(b"220 %s ESMTP minimail\r\n" % self.config.hostname.encode())

    def end_session(self):
        if self.envelope.writer is not None:
            self.envelope.writer.abort()

    def on_timeout(self):
        try:
            self.send(b"421 4.4.2 %s Timeout, closing connection\r\n" % self.config.hostname.encode())
            self.flush()
        except OSError:
            pass

    def reply(self, code: int, status: Optional[str], text: str) -> None:
        self.send(self.format_reply(Reply(code, status, text)))

    def reply_lines(self, code: int, lines: list) -> None:
        """A multi-line reply: every line but the last uses a hyphen (RFC 5321 4.2.1)."""
        out = [b"%d-%s\r\n" % (code, line.encode()) for line in lines[:-1]]
        out.append(b"%d %s\r\n" % (code, lines[-1].encode()))
        self.send(b"".join(out))

    def format_reply(self, reply: Reply) -> bytes:
        if reply.status:
            return b"%d %s %s\r\n" % (reply.code, reply.status.encode(), reply.text.encode())
        return b"%d %s\r\n" % (reply.code, reply.text.encode())

    def send_error(self, reply: Reply) -> None:
        if reply.code >= 500:
            self.errors += 1
            if self.errors >= SMTP_MAX_ERRORS and not reply.close:
                reply = Reply(421, "4.7.0", "Too many errors, closing connection", close=True)
        log.info("%s refused: %d %s %s", self.sid, reply.code, reply.status, reply.text)
        super().send_error(reply)

    def unknown_verb(self) -> Reply:
        return Reply(500, "5.5.2", "Syntax error, command unrecognized")

    def line_too_long(self) -> Reply:
        return Reply(500, "5.5.2", "Line too long")

    def internal_error(self) -> Reply:
        return Reply(451, "4.3.0", "Internal error")

    def check_line(self, verb: bytes, line: bytes) -> None:
        if verb in (b"MAIL", b"RCPT"):
            limit = SMTP_MAX_PATH_LINE
        elif verb == b"AUTH":
            limit = SASL_MAX_RESPONSE_LINE
        else:
            limit = SMTP_MAX_COMMAND_LINE
        if len(line) + 2 > limit:
            raise self.line_too_long()
        if b"\x00" in line or b"\r" in line:
            raise Reply(500, "5.5.2", "Syntax error, NUL or CR in command")

    def decode_arg(self, arg: bytes) -> str:
        try:
            return arg.decode("utf-8")
        except UnicodeDecodeError:
            raise Reply(501, "5.5.2", "Syntax error, invalid UTF-8") from None

    # Capability and state.
    @property
    def tls_context(self):
        return self.app.tls_context

    def may_auth(self) -> bool:
        return self.tls or self.is_loopback

    def protocol_name(self) -> str:
        """RFC 3848 protocol name for the Received header."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.authenticated else "")

    def require_helo(self) -> None:
        if self.helo is None:
            raise Reply(503, "5.5.1", "Send EHLO or HELO first")

    # Verbs.
    def smtp_EHLO(self, arg: bytes) -> None:
        """EHLO domain: start an ESMTP session and list extensions."""
        self._greet(arg, esmtp=True)
        lines = ["%s Hello %s" % (self.config.hostname, self.helo),
                 "PIPELINING", "SIZE %d" % self.config.max_size, "8BITMIME", "SMTPUTF8",
                 "ENHANCEDSTATUSCODES", "CHUNKING"]
        if self.tls_context is not None and not self.tls:
            lines.append("STARTTLS")
        if self.may_auth():
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        self.reply_lines(250, lines)

    def smtp_HELO(self, arg: bytes) -> None:
        """HELO domain: start a plain SMTP session."""
        self._greet(arg, esmtp=False)
        self.reply(250, None, "%s Hello %s" % (self.config.hostname, self.helo))

    def _greet(self, arg: bytes, esmtp: bool) -> None:
        text = self.decode_arg(arg).strip()
        if not text or " " in text:
            raise Reply(501, "5.5.4", "Syntax: %s hostname" % ("EHLO" if esmtp else "HELO"))
        self.helo = text
        self.esmtp = esmtp
        self.reset_envelope()

    def reset_envelope(self) -> None:
        if self.envelope.writer is not None:
            self.envelope.writer.abort()
        self.envelope = Envelope()

    def smtp_MAIL(self, arg: bytes) -> None:
        """MAIL FROM:<address> [SIZE=n] [BODY=8BITMIME] [SMTPUTF8]: start a transaction."""
        self.require_helo()
        if self.submission and not self.authenticated:
            raise Reply(530, "5.7.0", "Authentication required")
        if self.envelope.sender is not None:
            raise Reply(503, "5.5.1", "Nested MAIL command")
        path, params = self._parse_path(arg, b"FROM:")
        smtputf8 = False
        for name, value in params:
            if name == "SIZE":
                if not value.isdigit():
                    raise Reply(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self.config.max_size:
                    raise Reply(552, "5.3.4", "Message size exceeds fixed limit")
            elif name == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    raise Reply(501, "5.5.4", "Unsupported BODY type")
            elif name == "SMTPUTF8" and value is None:
                smtputf8 = True
            elif name == "AUTH":
                pass                # RFC 4954 5: accepted, and not trusted
            else:
                raise Reply(555, "5.5.4", "Unsupported parameter %s" % name)
        if path:
            self._check_utf8_address(path, smtputf8)
            try:
                local, domain = parse_mailbox(path)
            except ValueError:
                raise Reply(501, "5.1.7", "Bad sender address syntax") from None
            path = "%s@%s" % (local, domain) if '"' not in path else path
        self.envelope.sender = path
        self.envelope.smtputf8 = smtputf8
        self.reply(250, "2.1.0", "Ok")

    def smtp_RCPT(self, arg: bytes) -> None:
        """RCPT TO:<address>: add a recipient (local mailbox, or relay when allowed)."""
        if self.envelope.sender is None:
            raise Reply(503, "5.5.1", "Need MAIL before RCPT")
        if self.envelope.writer is not None:
            raise Reply(503, "5.5.1", "RCPT during BDAT transfer")
        path, params = self._parse_path(arg, b"TO:")
        if params:
            raise Reply(555, "5.5.4", "Unsupported parameter %s" % params[0][0])
        if len(self.envelope.recipients) >= SMTP_MAX_RECIPIENTS:
            raise Reply(452, "4.5.3", "Too many recipients")
        if not path:
            raise Reply(501, "5.1.3", "Bad recipient address syntax")
        self._check_utf8_address(path, self.envelope.smtputf8)
        if "@" not in path and path.lower() == "postmaster":
            path = "postmaster@" + self.config.domains[0]      # RFC 5321 4.5.1
        try:
            local, domain = parse_mailbox(path)
        except ValueError:
            raise Reply(501, "5.1.3", "Bad recipient address syntax") from None
        folder = "%s@%s" % (local.lower(), domain)
        if not is_safe_folder(folder):
            raise Reply(553, "5.1.3", "Recipient address not allowed as a mailbox name")
        self._check_recipient(folder, local.lower(), domain)
        if folder not in self.envelope.mailboxes:
            self.envelope.mailboxes.append(folder)
        self.envelope.recipients.append(folder)
        self.reply(250, "2.1.5", "Ok")

    def _check_recipient(self, folder: str, local: str, domain: str) -> None:
        """Apply the recipient policy of SPEC 4, raising the refusal."""
        config = self.config
        if domain in config.local_domains:
            if local != "postmaster" and config.accounts and not config.catch_all \
                    and folder not in config.accounts:
                raise Reply(550, "5.1.1", "Mailbox unavailable")
            return
        if config.catch_all:
            return
        raise Reply(554, "5.7.1", "Relay access denied")

    def _check_utf8_address(self, path: str, smtputf8: bool) -> None:
        if not smtputf8 and not path.isascii():
            raise Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")

    def _parse_path(self, arg: bytes, keyword: bytes) -> tuple:
        """Split 'FROM:<path> PARAMS' into (address or "", [(NAME, value or None)])."""
        if arg[:len(keyword)].upper() != keyword:
            raise Reply(501, "5.5.4", "Syntax: %s<address>" % keyword.decode())
        text = self.decode_arg(arg[len(keyword):]).lstrip(" ")
        if text.startswith("<"):
            end = text.find(">")
            if end < 0:
                raise Reply(501, "5.1.7" if keyword == b"FROM:" else "5.1.3", "Missing '>'")
            path, rest = text[1:end], text[end + 1:]
            if rest and not rest.startswith(" "):
                raise Reply(501, "5.5.4", "Syntax error after address")
            if ":" in path and path.startswith("@"):
                path = path.split(":", 1)[1]        # RFC 5321 4.1.2: ignore source routes
        else:
            path, _, rest = text.partition(" ")     # lenient: an address without <>
        params = []
        for word in rest.split():
            name, sep, value = word.partition("=")
            params.append((name.upper(), value if sep else None))
        return path, params

    def smtp_DATA(self, arg: bytes) -> None:
        """DATA: send the message, ended by a line with a single dot."""
        self._check_data_ready()
        if arg:
            raise Reply(501, "5.5.4", "Syntax: DATA")
        writer = self._open_writer()
        self.reply(354, None, "End data with <CR><LF>.<CR><LF>")
        try:
            self.read_dot_data(writer.write)
        except BaseException:
            writer.abort()
            self.envelope = Envelope()
            raise
        self._finish_message(writer)

    def _check_data_ready(self) -> None:
        envelope = self.envelope
        if envelope.writer is not None or envelope.bdat_error is not None:
            raise Reply(503, "5.5.1", "DATA cannot follow BDAT")
        if envelope.sender is None:
            raise Reply(503, "5.5.1", "Need MAIL command")
        if not envelope.recipients:
            raise Reply(554, "5.5.1", "No valid recipients")

    def _open_writer(self) -> MessageWriter:
        """Choose the message ID and open the first copy's file in tmp/."""
        envelope = self.envelope
        message_id = self.app.ids.new()
        received = self._received_header(message_id)
        copies = []
        for mailbox in envelope.mailboxes:
            header = ("Return-Path: <%s>\nDelivered-To: %s\n%s" % (
                envelope.sender, mailbox, received % (" for <%s>" % mailbox))).encode("utf-8")
            copies.append(_Copy(mailbox, header))
        writer = MessageWriter(self.app.maildir, message_id, copies)
        try:
            writer.open(self.config.max_size)
        except OSError as exc:
            log.error("%s cannot create message file: %s", self.sid, exc)
            writer.abort()
            raise Reply(451, "4.3.0", "Local storage error, try again later") from None
        return writer

    def _received_header(self, message_id: str) -> str:
        """The Received: header (RFC 5321 4.4), with %s where the 'for' clause goes."""
        return "Received: from %s (%s)\n\tby %s (minimail) with %s id %s%%s;\n\t%s\n" % (
            self.helo, address_literal(self.peer_ip), self.config.hostname,
            self.protocol_name(), message_id, rfc5322_date())

    def _finish_message(self, writer: MessageWriter) -> None:
        """Check the complete message, make it durable, and give the final reply."""
        envelope = self.envelope
        self.envelope = Envelope()
        writer.finish()
        if writer.oversized:
            writer.abort()
            raise Reply(552, "5.3.4", "Message size exceeds fixed limit")
        if writer.received_count() > SMTP_MAX_RECEIVED_HEADERS:
            writer.abort()
            raise Reply(554, "5.4.6", "Too many Received headers: mail loop")
        try:
            writer.commit()
        except OSError as exc:
            log.error("%s storing message failed: %s", self.sid, exc)
            raise Reply(451, "4.3.0", "Local storage error, try again later") from None
        log.info("%s accept id=%s from=<%s> rcpts=%s size=%d", self.sid, writer.message_id,
                 envelope.sender, ",".join(envelope.recipients), writer.size)
        self.reply(250, "2.0.0", "Ok: queued as %s" % writer.message_id)

    def smtp_BDAT(self, arg: bytes) -> None:
        """BDAT size [LAST]: send a chunk of the message (RFC 3030)."""
        words = arg.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > 18 \
                or (len(words) == 2 and words[1].upper() != b"LAST"):
            # The chunk's length is unknown, so its bytes cannot be skipped safely.
            raise Reply(501, "5.5.4", "Syntax: BDAT size [LAST]", close=True)
        size, last = int(words[0]), len(words) == 2
        envelope = self.envelope
        problem = None
        if envelope.writer is None and envelope.bdat_error is None:
            try:
                self._check_data_ready()
                envelope.writer = self._open_writer()
            except Reply as reply:
                problem = reply
        writer = envelope.writer
        if problem is not None or writer is None:
            self.read_exactly(size, lambda data: None)
            if last or problem is not None:
                self.reset_envelope()
            raise problem or envelope.bdat_error
        self.read_exactly(size, writer.write)
        if writer.oversized:
            writer.abort()
            envelope.writer = None
            envelope.bdat_error = Reply(552, "5.3.4", "Message size exceeds fixed limit")
            if last:
                self.envelope = Envelope()
            raise Reply(552, "5.3.4", "Message size exceeds fixed limit")
        if last:
            envelope.writer = None
            self._finish_message(writer)
        else:
            self.reply(250, "2.0.0", "%d octets received" % size)

    def smtp_RSET(self, arg: bytes) -> None:
        """RSET: abort the current transaction."""
        self.reset_envelope()
        self.reply(250, "2.0.0", "Ok")

    def smtp_NOOP(self, arg: bytes) -> None:
        """NOOP: do nothing."""
        self.reply(250, "2.0.0", "Ok")

    def smtp_QUIT(self, arg: bytes) -> None:
        """QUIT: end the session."""
        self.reply(221, "2.0.0", "Bye")
        self.closing = True

    def smtp_VRFY(self, arg: bytes) -> None:
        """VRFY address: not disclosed (RFC 5321 3.5.3)."""
        self.reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: bytes) -> None:
        """EXPN list: not supported."""
        raise Reply(502, "5.5.1", "EXPN not implemented")

    def smtp_HELP(self, arg: bytes) -> None:
        """HELP: list the commands."""
        lines = [getattr(self, name).__doc__.strip().split("\n")[0]
                 for name in sorted(dir(self)) if name.startswith(self.verb_prefix)]
        self.reply_lines(214, ["2.0.0 " + line for line in lines] + ["2.0.0 End of HELP"])

    def smtp_STARTTLS(self, arg: bytes) -> None:
        """STARTTLS: switch to TLS (RFC 3207)."""
        if self.tls_context is None:
            raise Reply(502, "5.5.1", "STARTTLS not available")
        if self.tls:
            raise Reply(503, "5.5.1", "Already in TLS")
        if arg:
            raise Reply(501, "5.5.4", "Syntax: STARTTLS")
        self.reply(220, "2.0.0", "Ready to start TLS")
        try:
            self.start_tls(self.tls_context)
        except (OSError, ValueError) as exc:
            log.info("%s TLS handshake failed: %s", self.sid, exc.__class__.__name__)
            self.closing = True
            return
        # RFC 3207 4.2: forget everything learned before TLS.
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self.authenticated = False
        self.reset_envelope()

    def smtp_AUTH(self, arg: bytes) -> None:
        """AUTH PLAIN|LOGIN [initial-response]: authenticate (RFC 4954)."""
        self.require_helo()
        if not self.may_auth():
            raise Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if self.authenticated:
            raise Reply(503, "5.5.1", "Already authenticated")
        if self.envelope.sender is not None:
            raise Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
        mechanism, _, initial = arg.partition(b" ")
        method = getattr(self, "auth_" + mechanism.decode("ascii", "replace").upper(), None) \
            if VERB_RE.fullmatch(mechanism) else None
        if method is None:
            raise Reply(504, "5.5.4", "Unrecognized authentication mechanism")
        username, password = method(initial.strip() or None)
        self._check_credentials(username, password)

    def _sasl_response(self, challenge: bytes, initial: Optional[bytes]) -> bytes:
        """The client's decoded answer to a 334 challenge, or its initial response."""
        if initial is None:
            self.send(b"334 " + challenge + b"\r\n")
            try:
                initial = self.read_line(SASL_MAX_RESPONSE_LINE)
            except LineTooLong:
                raise Reply(500, "5.5.6", "Authentication exchange line is too long") from None
        if initial == b"*":
            raise Reply(501, "5.0.0", "Authentication cancelled")
        if initial == b"=":
            return b""
        try:
            return base64.b64decode(initial, validate=True)
        except (binascii.Error, ValueError):
            raise Reply(501, "5.5.2", "Invalid base64 data") from None

    def auth_PLAIN(self, initial: Optional[bytes]) -> tuple:
        parts = self._sasl_response(b"", initial).split(b"\x00")
        if len(parts) != 3:
            raise Reply(501, "5.5.2", "Malformed PLAIN response")
        authzid, username, password = parts
        if authzid and authzid != username:
            raise Reply(535, "5.7.8", "Authorization identity not allowed")
        return username, password

    def auth_LOGIN(self, initial: Optional[bytes]) -> tuple:
        username = self._sasl_response(b"VXNlcm5hbWU6", initial)      # "Username:"
        password = self._sasl_response(b"UGFzc3dvcmQ6", None)         # "Password:"
        return username, password

    def _check_credentials(self, username: bytes, password: bytes) -> None:
        """Accept or refuse credentials; failures are slowed and counted (SPEC 4)."""
        account = self.app.check_login(username, password, self.is_loopback)
        if account is False:
            self.auth_failures += 1
            log.info("%s auth failed for %r", self.sid, username[:64])
            self.flush()
            time.sleep(self.config.auth_failure_delay)
            if self.auth_failures >= AUTH_MAX_FAILURES:
                raise Reply(421, "4.7.0", "Too many authentication failures", close=True)
            raise Reply(535, "5.7.8", "Authentication credentials invalid")
        self.authenticated = True
        self.auth_user = account
        log.info("%s auth ok as %s", self.sid, account or "(dev sink, grants nothing)")
        self.reply(235, "2.7.0", "Authentication successful")


# --- Application ----------------------------------------------------------------

LISTENERS = (
    ("smtp", SMTPHandler),
    ("submission", SMTPHandler),
)


class App:
    """Build, start and stop every listener from one Config (used by main() and tests)."""

    def __init__(self, config: Config):
        self.config = config
        self.maildir = Maildir(config.maildir)
        self.ids = MessageIds(config.hostname)
        self.resolver = Resolver(config)
        self.tls_context = None
        self.servers = {}
        self.threads = []

    def start(self) -> None:
        """Validate the config, bind every listener and start serving; ConfigError if not possible."""
        self.check_config()
        try:
            os.makedirs(self.maildir.root, exist_ok=True)
        except OSError as exc:
            raise ConfigError("cannot create maildir %s: %s" % (self.maildir.root, exc.strerror)) from None
        if self.config.tls_cert:
            self.tls_context = self._load_tls()
        try:
            for name, handler in LISTENERS:
                address = getattr(self.config, name)
                if address is None:
                    continue
                try:
                    self.servers[name] = ThreadedServer(name, address, handler, self.config, self)
                except OSError as exc:
                    raise ConfigError("cannot listen on %s for %s: %s" % (
                        format_addr(address), name, exc.strerror or exc)) from None
        except ConfigError:
            self.stop()
            raise
        for name, server in self.servers.items():
            thread = threading.Thread(target=server.serve_forever, name=name,
                                      kwargs={"poll_interval": 0.2}, daemon=True)
            thread.start()
            self.threads.append(thread)

    def check_config(self) -> None:
        """Refuse configurations SPEC 2 forbids."""
        config = self.config
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if not config.accounts:
            for name in ("submission", "pop3", "http"):
                address = getattr(config, name, None)
                if address is not None and not config.is_loopback(_resolve_host(address[0])):
                    raise ConfigError("%s on non-loopback address %s needs accounts (--user or --users)"
                                      % (name, format_addr(address)))

    def _load_tls(self):
        import ssl
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("cannot load TLS certificate %s / key %s: %s" % (
                self.config.tls_cert, self.config.tls_key, getattr(exc, "strerror", None) or exc)) from None
        return context

    def address(self, name: str) -> tuple:
        """The (host, port) a listener is really bound to."""
        return self.servers[name].server_address[:2]

    @property
    def smtp_port(self) -> int:
        return self.address("smtp")[1]

    @property
    def submission_port(self) -> int:
        return self.address("submission")[1]

    def check_login(self, username: bytes, password: bytes, loopback: bool):
        """The mailbox an account logs in to, None for a dev-sink login, False if refused.

        With no accounts configured, a loopback client may log in with anything (SPEC 4/5).
        """
        accounts = self.config.accounts
        try:
            name = mailbox_name(username.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            name = None
        if not accounts:
            return None if loopback else False
        expected = accounts.get(name)
        if expected is None:
            hmac.compare_digest(password, password)     # similar time either way
            return False
        if hmac.compare_digest(expected.encode("utf-8"), password):
            return name
        return False

    def stop(self) -> None:
        """Stop listening, close live connections and wait (bounded) for their threads."""
        for server in self.servers.values():
            server.shutdown()
            server.server_close()
        for server in self.servers.values():
            server.close_connections(wait_s=5.0)
        for thread in self.threads:
            thread.join(5.0)
        self.servers = {}
        self.threads = []


def _resolve_host(host: str) -> str:
    """A listener host as an IP string (names such as localhost resolved once, at startup)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None)[0][4][0]
    except OSError:
        return host


def format_addr(address: tuple) -> str:
    host, port = address[:2]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


# --- Command line ---------------------------------------------------------------

class UsageError(Exception):
    """A command-line error: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Show every option's default, spelling 'none' and 'off' for empty ones."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is False:
            return text + " (default: off)"
        if action.default in (None, []):
            return text + " (default: none)"
        return text + " (default: %(default)s)"


def _typed(parse):
    """Wrap a ValueError-raising parser so argparse reports its message."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The `serve` command line (SPEC 2)."""
    parser = _Parser(prog="minimail.py", description="A small mail server: SMTP into Maildir.",
                     formatter_class=_HelpFormatter)
    add = parser.add_argument
    add("--domain", action="append", metavar="NAME",
        help="a local domain; repeatable (default: localhost)")
    add("--maildir", default="./maildir", metavar="DIR", help="root of all mailboxes")
    add("--smtp", default="127.0.0.1:1025", type=_typed(parse_addr), metavar="ADDR",
        help="SMTP listener: HOST:PORT, [IPv6]:PORT, PORT or off")
    add("--submission", default="off", type=_typed(parse_addr), metavar="ADDR",
        help="submission listener (AUTH required before MAIL)")
    add("--hostname", default=socket.gethostname(), metavar="NAME",
        help="name in the greeting, EHLO and Received:")
    add("--user", action="append", default=[], type=_typed(parse_account),
        metavar="ADDRESS:PASSWORD", help="an account; repeatable")
    add("--users", metavar="FILE", help="accounts file, one ADDRESS:PASSWORD a line")
    add("--relay-from", action="append", default=[], type=_typed(_parse_cidr), metavar="CIDR",
        help="client network that may relay without AUTH; repeatable")
    add("--catch-all", action="store_true",
        help="store mail for every domain locally instead of relaying")
    add("--tls-cert", metavar="FILE", help="certificate (PEM) for STARTTLS")
    add("--tls-key", metavar="FILE", help="private key (PEM) for STARTTLS")
    add("--max-size", type=int, default=26214400, metavar="BYTES", help="largest message")
    add("--max-connections", type=int, default=100, metavar="N",
        help="concurrent connections per listener")
    add("--timeout", type=_typed(parse_time), default="300s", metavar="TIME",
        help="longest wait for a client's command or data")
    _add_dns_option(parser)
    add("-q", "--quiet", action="store_true", help="log warnings and errors only")
    add("-v", "--verbose", action="store_true", help="log protocol traffic too")
    return parser


def _add_dns_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dns", action="append", default=[], type=_typed(parse_nameserver),
                        metavar="HOST[:PORT]", help="nameserver (an IP address) for MX lookups; "
                        "repeatable (default: from /etc/resolv.conf)")


def _parse_cidr(text: str) -> str:
    ipaddress.ip_network(text, strict=False)
    return text


def config_from_args(args) -> Config:
    """Turn parsed `serve` options into a Config (ValueError for bad combinations)."""
    users = list(args.user)
    if args.users:
        users += read_users_file(args.users)
    domains = tuple(normalize_domain(domain) for domain in (args.domain or ["localhost"]))
    if args.max_size <= 0 or args.max_connections <= 0:
        raise ValueError("--max-size and --max-connections must be positive")
    return Config(
        domains=domains, maildir=args.maildir, smtp=args.smtp, submission=args.submission,
        hostname=args.hostname, users=tuple(users), relay_from=tuple(args.relay_from),
        catch_all=args.catch_all, tls_cert=args.tls_cert, tls_key=args.tls_key,
        max_size=args.max_size, max_connections=args.max_connections, timeout=args.timeout,
        dns=tuple(args.dns))


def serve(argv: list) -> int:
    """Run the server until SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s minimail %(levelname)s %(message)s", stream=sys.stderr)
    app = App(config)
    app.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    for name in app.servers:
        print("minimail: %s listening on %s" % (name, format_addr(app.address(name))),
              file=sys.stderr, flush=True)
    print("minimail: mail stored in %s" % app.maildir.root, file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    app.stop()
    return 0


def print_mx(argv: list) -> int:
    """The `mx` command: print a domain's MX hosts in delivery order (SPEC 2)."""
    parser = _Parser(prog="minimail.py mx", formatter_class=_HelpFormatter,
                     description="Print the MX hosts of DOMAIN, one PREFERENCE HOST line each, "
                     "in the order delivery tries them. Exit 0, 1 when the domain takes no mail, "
                     "%d on a temporary failure." % EXIT_TEMPFAIL)
    parser.add_argument("domain", metavar="DOMAIN", help="the domain (IDN allowed)")
    _add_dns_option(parser)
    args = parser.parse_args(argv)
    try:
        mail_domain(args.domain)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        hosts = Resolver(Config(dns=tuple(args.dns))).resolve_mx(args.domain, addresses=False)
    except PermFail as exc:
        print("minimail: %s" % exc, file=sys.stderr)
        return 1
    except TempFail as exc:
        print("minimail: %s" % exc, file=sys.stderr)
        return EXIT_TEMPFAIL
    for host in hosts:
        print("%d %s" % (host.preference, host.host))
    return 0


COMMANDS = {"serve": serve, "mx": print_mx}


def main(argv: Optional[list] = None) -> int:
    """Entry point: `serve` (the default), `mx` or `queue`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "serve"
    try:
        return COMMANDS[command](argv)
    except (UsageError, ConfigError) as exc:
        print("minimail: %s" % exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
