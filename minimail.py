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
protocol names of RFC 3848; POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595)
and AUTH PLAIN (RFC 5034); its own MX resolver (RFC 1035, 2181, 2308, 5452, 6891,
7505, 7766; RFC 5321 5.1); and an HTTP page and JSON API compatible with Mailpit's
API v1 (HTTP/1.1, RFC 9110/9112; server-sent events; HTTP Basic, RFC 7617).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import dataclasses
import datetime
import errno
import fcntl
import ipaddress
import json
import logging
import math
import os
import queue
import random
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Optional

__version__ = "0.1.0"
__all__ = ["Config", "App", "main", "resolve_mx"]


# --- Protocol constants ---------------------------------------------------------------

SMTP_MAX_COMMAND_LINE = 512         # RFC 5321 4.5.3.1.4, including CRLF
SMTP_MAX_PATH_LINE = 1024           # MAIL/RCPT with parameters (Postfix allows as much)
SASL_MAX_RESPONSE_LINE = 12288      # RFC 4954 4: AUTH command or response line
SMTP_MAX_RECIPIENTS = 1000          # Postfix's smtpd_recipient_limit
SMTP_MAX_RECEIVED_HEADERS = 50      # loop detection, RFC 5321 6.3
SMTP_MAX_ERRORS = 20                # Postfix's smtpd_hard_error_limit
AUTH_MAX_FAILURES = 3               # SPEC 4: the third failure closes the session
MAILDIR_NAME_MAX = 255              # bytes in one folder name (NAME_MAX)
HEADER_SCAN_LIMIT = 256 * 1024      # header bytes inspected for Received: counting
RECV_SIZE = 32 * 1024               # one socket read: larger reads gain nothing, cost RSS
# Linux copies SO_RCVTIMEO/SO_SNDTIMEO from a listening socket to the sockets it accepts.
SOCKET_TIMEOUTS_INHERITED = sys.platform.startswith("linux")
IDLE_THREAD_S = 10.0                # a connection thread waits this long for the next one
WRITE_BUFFER = 256 * 1024           # replies collected before one send
READ_BLOCK = 64 * 1024              # one read of a message file
WIRE_SIZE_CACHE = 100_000           # remembered wire sizes of untagged message files
LISTING_CACHE = 50_000              # messages in remembered mailbox listings
FOLDER_MTIME_TRUST = 1.0            # seconds: a folder changed more recently is listed again
TMP_MAX_AGE_S = 36 * 3600.0         # a tmp/ file this old was left by a crash (as Dovecot cleans)
POP3_MAX_COMMAND_LINE = 512         # SPEC 5 (RFC 2449 4 asks clients for at most 255)
POP3_LOCK_FILE = ".minimail-pop3.lock"  # in the mailbox folder, beside tmp/ new/ cur/
POP3_LOCK_POLL_S = 0.05             # how often a waiting login retries another process's lock
POP3_MAX_UIDL = 70                  # RFC 1939 7: a unique-id is 1 to 70 characters 0x21-0x7E
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
RECEIVED_RE = re.compile(rb"^received:", re.I | re.M)   # trace headers counted for loops
DATA_TERMINATOR = b"\r\n.\r\n"      # RFC 5321 4.1.1.4: the only end of DATA

log = logging.getLogger("minimail")


# --- Exceptions -----------------------------------------------------------------------

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
    """A permanent failure (NXDOMAIN, null MX, 5xx reply): give up and bounce.

    status is the enhanced status (RFC 3463) a bounce reports, when the cause has one."""

    def __init__(self, text: str, status: Optional[str] = None):
        super().__init__(text)
        self.status = status


class ConfigError(Exception):
    """A bad option or an unusable resource at startup: one line, exit 2."""


class ClientGone(Exception):
    """The peer closed the connection."""


class IdleTimeout(Exception):
    """The peer sent nothing within the configured timeout."""


class SendTimeout(IdleTimeout):
    """The peer read nothing of our output within the configured timeout."""


class LineTooLong(Exception):
    """A command line exceeded its limit; it was read to its end and discarded."""


# --- Configuration --------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """Everything a running minimail needs; built once by main() or by a test."""

    domains: tuple[str, ...] = ("localhost",)
    maildir: str = "maildir"
    smtp: Optional[tuple[str, int]] = None          # listener addresses: None is off
    submission: Optional[tuple[str, int]] = None
    http: Optional[tuple[str, int]] = None
    pop3: Optional[tuple[str, int]] = None
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
    smarthost: Optional[tuple[str, int]] = None     # relay everything through this server
    smarthost_auth: Optional[tuple[str, str]] = None    # (user, password) for the smarthost
    mx_port: int = 25                               # port of MX hosts when relaying
    retry_delay: float = 300.0                      # first retry; delays double (SPEC 2)
    queue_lifetime: float = 5 * 86400.0             # then a queued message is bounced
    relay_workers: int = 4                          # deliveries at the same time
    pop3_lock_wait: float = 1.0                     # a login waits this long for a busy mailbox
    loopback_networks: tuple[str, ...] = LOOPBACK_NETWORKS   # tests narrow this
    http_scan_interval: float = 1.0                 # seconds between maildir scans while waiting
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


def parse_ip(text: str):
    """An IP address, ignoring an IPv6 zone (%eth0); ValueError if text is none."""
    return ipaddress.ip_address(text.split("%", 1)[0])


@lru_cache(maxsize=1024)      # asked once per connection, mostly about the same few peers
def _address_in(host: str, networks: tuple) -> bool:
    try:
        address = parse_ip(host)
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
        if ":" in host:         # a bare IPv6 address: its last group is no port
            raise ValueError("bad address %r (use [IPv6]:PORT)" % text)
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
        parse_ip(host)
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


# --- Addresses and small helpers ------------------------------------------------------

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
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MIME_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+\-]*/[a-z0-9][a-z0-9!#$&^_.+\-]*")   # RFC 6838


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
    """Return the folder name of a bare address."""
    return folder_name(*parse_mailbox(address))


def folder_name(local: str, domain: str) -> str:
    """The mailbox folder of a parsed address: local@domain, the local part lowercased."""
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


def mailbox_header(sender: str, mailbox: str, received: str) -> bytes:
    """The trace headers that start a mailbox copy (SPEC 3), with LF line ends."""
    return ("Return-Path: <%s>\nDelivered-To: %s\n%s" % (sender, mailbox, received)).encode("utf-8")


def address_literal(ip: str) -> str:
    """The RFC 5321 4.1.3 form of a client address for trace headers."""
    return "[IPv6:%s]" % ip if ":" in ip else "[%s]" % ip


def mask_auth(line: bytes) -> bytes:
    """Hide credentials in a logged AUTH or PASS line, or SASL response."""
    parts = line.split(b" ")
    if parts[0].upper() == b"AUTH":
        return b" ".join(parts[:2] + [b"****"] * (len(parts) > 2))
    if parts[0].upper() == b"PASS":
        return parts[0] + b" ****"
    return b"****"


# --- Storage: Maildir delivery --------------------------------------------------------

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


@dataclass
class _FolderSync:
    """Group-commit state of one directory."""
    registered: int = 0         # renames announced so far
    synced: int = 0             # renames known durable
    syncing: bool = False       # an fsync is running
    users: int = 0              # callers inside sync(); the state is dropped at zero


class DirectorySync:
    """fsync directories with group commit: one fsync covers every rename made before it
    began, so concurrent deliveries into one mailbox share their directory flushes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)
        self.folders = {}       # path -> _FolderSync, only while someone waits on it

    def sync(self, path: str) -> None:
        """Return once the renames made into path so far are durable (OSError if not)."""
        with self.lock:
            state = self.folders.setdefault(path, _FolderSync())
            state.registered += 1
            state.users += 1
            mine = state.registered
            try:
                while state.synced < mine:
                    if state.syncing:           # started before our rename: wait, then retry
                        self.done.wait()
                        continue
                    state.syncing, target = True, state.registered
                    self.lock.release()
                    try:
                        fsync_dir(path)
                    finally:
                        self.lock.acquire()
                        state.syncing = False
                        self.done.notify_all()
                    state.synced = max(state.synced, target)
            finally:
                state.users -= 1
                if not state.users:
                    del self.folders[path]


def remove_old_files(directory: str, older_than_s: float) -> int:
    """Delete the files of directory unchanged for older_than_s; return how many went."""
    cutoff = time.time() - older_than_s
    removed = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and \
                        entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
    except OSError:         # gone meanwhile, or not ours to clean: try again next time
        pass
    return removed


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BoundedCache:
    """A thread-safe dict that forgets its oldest entries past a total weight."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.lock = threading.Lock()
        self.entries = {}           # key -> (value, weight), oldest first
        self.weight = 0

    def get(self, key):
        with self.lock:
            entry = self.entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key, value, weight: int = 1) -> None:
        with self.lock:
            old = self.entries.pop(key, None)
            self.weight += weight - (old[1] if old else 0)
            self.entries[key] = (value, weight)
            while self.weight > self.capacity and self.entries:
                self.weight -= self.entries.pop(next(iter(self.entries)))[1]


@dataclass
class StoredMessage:
    """One message file of one mailbox, as found on disk."""
    mailbox: str
    folder: str             # "new" or "cur"
    name: str               # the file name: ID, optional ,S=/,W= tags, optional :2,FLAGS
    path: str

    @cached_property
    def id(self) -> str:
        return message_id_of(self.name)

    @property
    def flags(self) -> str:
        """Maildir info flags (the part after ':2,')."""
        _, sep, flags = self.name.partition(":2,")
        return flags if sep else ""

    def wire_size(self, cache: Optional[BoundedCache] = None) -> int:
        """Bytes the message takes on the wire with CRLF line ends (POP3 octets, RFC 1939 11).

        On the wire every LF not preceded by CR becomes CRLF, and a last line without a line
        end gets CRLF. The ,W= tag is trusted only when ,S= equals the real size (SPEC 3);
        otherwise the file is read once to count its line ends, and the result is kept in
        cache (if given): its key is the file's path, size and times, so a file changed in
        any way is counted again.
        """
        status = os.stat(self.path)
        real_size = status.st_size
        tags = dict(re.findall(r",([SW])=(\d+)", self.name.partition(":")[0]))
        if tags.get("S") == str(real_size) and "W" in tags:
            return int(tags["W"])
        key = (self.path, real_size, status.st_mtime_ns, status.st_ctime_ns)
        size = cache.get(key) if cache is not None else None
        if size is None:
            size = self._count_wire_size(real_size)
            if cache is not None:
                cache.put(key, size)
        return size

    def _count_wire_size(self, real_size: int) -> int:
        added = 0
        last = b""
        with open(self.path, "rb") as file:
            for block in iter(lambda: file.read(READ_BLOCK), b""):
                added += block.count(b"\n") - block.count(b"\r\n")
                if last == b"\r" and block.startswith(b"\n"):
                    added -= 1
                last = block[-1:]
        return real_size + added + (2 if last not in (b"", b"\n") else 0)


class Maildir:
    """The tree of mailboxes below one root: <root>/<local@domain>/{tmp,new,cur}."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.directory_sync = DirectorySync()
        self.wire_sizes = BoundedCache(WIRE_SIZE_CACHE)     # file -> counted wire size
        self.listings = BoundedCache(LISTING_CACHE)         # mailbox -> sized_messages()

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

    def clean_tmp(self) -> None:
        """Remove what crashed deliveries left in the mailboxes' tmp/ folders."""
        for mailbox in self.mailboxes():
            removed = remove_old_files(os.path.join(self.path(mailbox), "tmp"), TMP_MAX_AGE_S)
            if removed:
                log.info("removed %d stale files from %s/tmp", removed, mailbox)

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

    def sized_messages(self, mailbox: str) -> tuple:
        """messages() with their wire sizes, ((StoredMessage, size), ...); files that vanish
        while listing are left out.

        While neither new/ nor cur/ has changed since an earlier call, that call's list is
        returned without listing or stat()ing any file (see folder_signature).
        """
        signature = self.folder_signature(mailbox)
        cached = self.listings.get(mailbox)
        if cached is not None and signature is not None and cached[0] == signature:
            return cached[1]
        listing = []
        for message in self.messages(mailbox):
            try:
                listing.append((message, message.wire_size(self.wire_sizes)))
            except FileNotFoundError:
                continue            # removed, or moved to cur/, while listing
            except OSError as exc:  # not a readable file: leave it out, list the rest
                log.warning("skipping %s: %s", message.path, exc.strerror or exc)
        listing = tuple(listing)    # shared by the sessions that reuse it
        if signature is not None:
            self.listings.put(mailbox, (signature, listing), max(1, len(listing)))
        return listing

    def folder_signature(self, mailbox: str) -> Optional[tuple]:
        """The (inode, mtime) of new/ and cur/: while it stays the same, so does the listing.

        Maildir files are never rewritten, so a delivery, move or removal always changes
        its folder's mtime. None while a folder changed less than FOLDER_MTIME_TRUST ago:
        timestamps may be coarse, so such a listing must not be trusted later.
        """
        settled_ns = time.time_ns() - int(FOLDER_MTIME_TRUST * 1e9)
        folders = []
        for folder in ("new", "cur"):
            try:
                status = os.stat(os.path.join(self.root, mailbox, folder))
            except FileNotFoundError:
                folders.append(None)
                continue
            if status.st_mtime_ns >= settled_ns:
                return None
            folders.append((status.st_ino, status.st_mtime_ns))
        return tuple(folders)

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

    def follow(self, message: StoredMessage, action):
        """Return action(message), following the file if another session renamed it meanwhile.

        A file may move between new/ and cur/ or change flags at any time; on
        FileNotFoundError the message is found again by ID and action is retried. The
        result is None when the message is gone.
        """
        while message is not None:
            try:
                return action(message)
            except FileNotFoundError:
                found = self.find(message.mailbox, message.id)
                message = found if found is not None and found.path != message.path else None
        return None

    def remove(self, message: StoredMessage) -> bool:
        """Delete a message's file wherever it moved; False if it was already gone."""
        return self.follow(message, lambda current: os.unlink(current.path) or True) is not None

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
    """One file being written: a mailbox's copy, or the relay queue's when mailbox is None."""
    mailbox: Optional[str]
    header: bytes
    tmp_path: str = ""
    final_path: str = ""


class MessageWriter:
    """Stream one message from the wire into every recipient's Maildir, durably.

    Data arrives as SMTP wire text (CRLF lines, already unstuffed). It is stored with
    LF line ends, as Postfix, Dovecot and mailbox.Maildir store Maildir files; bare CR
    and bare LF both become LF, so nothing ambiguous is ever stored or relayed. The
    first copy is written as data arrives; others are copied from it at commit, each
    with its own header. Nothing is visible in new/ (or in the queue) before commit()
    has fsync'd it.
    """

    def __init__(self, maildir: Maildir, queue: "Queue", message_id: str, copies: list):
        self.maildir = maildir
        self.queue = queue
        self.message_id = message_id
        self.copies = copies
        self.eight_bit = False      # any byte over 127 (RFC 6152: needs 8BITMIME to relay)
        self.size = 0               # message bytes as received (after unstuffing)
        self.body_bytes = 0         # bytes stored after the per-copy header
        self.body_lines = 0         # LF count of the stored body
        self.held_cr = b""          # a trailing CR waiting to see whether LF follows
        self.last_byte = b""
        self.head = bytearray()     # start of the message, for counting Received:
        self.head_done = False
        self.fd = -1                # the first copy's file
        self.header_pending = b""
        self.max_size = 0
        self.oversized = False
        self.failed = None          # the OSError that stopped storing; reported after the data

    def open(self, max_size: int) -> None:
        self.max_size = max_size
        self.fd = self._create(self.copies[0], with_header=False)
        self.header_pending = self.copies[0].header     # goes out with the first data

    def _create(self, copy: _Copy, with_header: bool = True) -> int:
        """Create the copy's file in tmp/, normally with its header written; return its descriptor."""
        if copy.mailbox is None:
            copy.tmp_path = self.queue.tmp_path(self.message_id)
        else:
            copy.tmp_path = os.path.join(self.maildir.path(copy.mailbox), "tmp", self.message_id)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(copy.tmp_path, flags, 0o600)
        except FileNotFoundError:
            if copy.mailbox is None:
                self.queue.ensure()
            else:
                self.maildir.ensure(copy.mailbox)
            fd = os.open(copy.tmp_path, flags, 0o600)
        if with_header:
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
        if self.failed is not None:     # keep reading the client's data, store nothing
            return
        if not self.eight_bit and not data.isascii():
            self.eight_bit = True
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
            start = max(len(self.head) - 1, 0)     # search only what is new: tiny writes stay linear
            self.head += data
            end = self.head.find(b"\n\n", start)
            if self.head.startswith(b"\n") or end >= 0 or len(self.head) >= HEADER_SCAN_LIMIT:
                self.head_done = True
                if end >= 0:
                    del self.head[end + 1:]
        if data:
            self.body_bytes += len(data)
            self.body_lines += data.count(b"\n")
            self.last_byte = data[-1:]
            if self.header_pending:
                data = self.header_pending + data
                self.header_pending = b""
            try:
                _write_all(self.fd, data)   # one write per socket read: no copy held
            except OSError as exc:          # disk full, quota: answered 451 after the data
                self.failed = exc

    def finish(self) -> None:
        """Flush the end of the data: a held CR becomes LF and the last line ends in LF."""
        if not self.oversized and (self.held_cr or self.last_byte not in (b"", b"\n")):
            self._store(b"\n")
        self.held_cr = b""

    def received_count(self) -> int:
        return len(RECEIVED_RE.findall(self.head))

    def commit(self) -> list:
        """Make every copy durable and visible in new/ (or the queue); return the final paths.

        On any failure, nothing stays visible: copies already moved are removed again,
        so the client's retry cannot create a duplicate.
        """
        first = self.copies[0]
        moved = []
        try:
            if self.failed is not None:
                raise self.failed
            if self.header_pending:
                _write_all(self.fd, self.header_pending)
                self.header_pending = b""
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
                if copy.mailbox is None:
                    copy.final_path = self.queue.message_path(self.message_id)
                else:
                    size = len(copy.header) + self.body_bytes
                    lines = copy.header.count(b"\n") + self.body_lines
                    copy.final_path = os.path.join(
                        self.maildir.path(copy.mailbox), "new",
                        "%s,S=%d,W=%d" % (self.message_id, size, size + lines))
                os.rename(copy.tmp_path, copy.final_path)
                moved.append(copy.final_path)
                new_dirs.add(os.path.dirname(copy.final_path))
            for directory in new_dirs:
                self.maildir.directory_sync.sync(directory)
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
            data = os.pread(source_fd, min(count, READ_BLOCK), offset)
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


@dataclass
class QueueRecipient:
    """One recipient of a queued message and what became of it."""
    address: str                # as the client wrote it; relayed exactly so
    domain: str                 # A-label form, for MX lookups and grouping
    state: str = "queued"       # queued, deferred, delivered, failed (bounce due), bounced
    attempts: int = 0
    last_error: str = ""        # one line: what went wrong last, for `queue` and the bounce
    status: str = ""            # enhanced status of a failure (RFC 3463), for the bounce
    diagnostic: str = ""        # RFC 3464 Diagnostic-Code, e.g. "smtp; 550 5.1.1 unknown"
    remote_mta: str = ""        # host[address] that gave the last answer

    @property
    def pending(self) -> bool:
        return self.state in ("queued", "deferred")


@dataclass
class QueueEntry:
    """A message waiting for relay: its envelope and delivery state (SPEC 3, 7)."""
    id: str
    sender: str                 # "" is the null sender: never bounced
    created: float
    recipients: list
    smtputf8: bool = False
    eight_bit: bool = False
    size: int = 0
    attempts: int = 0
    next_try: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "QueueEntry":
        data = json.loads(text)
        data["recipients"] = [QueueRecipient(**item) for item in data["recipients"]]
        return cls(**data)


class Queue:
    """The outbound queue: <maildir>/.queue/ID.eml (the message) and ID.json (its state).

    An entry exists once its .json is in place; both files are written in tmp/, fsync'd
    and renamed, so a crash leaves either a whole entry or none. `.queue` can never be a
    mailbox, since mailbox names contain '@'.
    """

    def __init__(self, root: str):
        self.folder = os.path.join(root, ".queue")

    def ensure(self) -> None:
        if not os.path.isdir(os.path.join(self.folder, "tmp")):
            os.makedirs(os.path.join(self.folder, "tmp"), mode=0o700, exist_ok=True)
            fsync_dir(self.folder)
            fsync_dir(os.path.dirname(self.folder))

    def tmp_path(self, name: str) -> str:
        return os.path.join(self.folder, "tmp", name)

    def message_path(self, message_id: str) -> str:
        return os.path.join(self.folder, message_id + ".eml")

    def state_path(self, message_id: str) -> str:
        return os.path.join(self.folder, message_id + ".json")

    def save(self, entry: QueueEntry) -> None:
        """Write an entry's state atomically and durably."""
        self.ensure()
        tmp = self.tmp_path(entry.id + ".json")
        try:
            with open(tmp, "w", encoding="utf-8") as file:
                file.write(entry.to_json())
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.state_path(entry.id))
        except OSError:
            _unlink_quietly(tmp)
            raise
        fsync_dir(self.folder)

    def remove(self, message_id: str) -> None:
        """Forget an entry: its state first, so a crash never leaves state without a message."""
        _unlink_quietly(self.state_path(message_id))
        _unlink_quietly(self.message_path(message_id))

    def ids(self) -> list:
        """IDs of the entries on disk, oldest name first."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(name[:-5] for name in names if name.endswith(".json"))

    def load(self, message_id: str) -> Optional[QueueEntry]:
        """An entry from disk, or None if it is gone or unreadable (logged)."""
        try:
            with open(self.state_path(message_id), encoding="utf-8") as file:
                return QueueEntry.from_json(file.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("queue entry %s unreadable: %s", message_id, exc)
            return None

    def remove_orphans(self, older_than_s: float = 3600.0) -> None:
        """Delete message files whose state was never written (no 250 was sent for them),
        and what crashed writes left in tmp/."""
        remove_old_files(os.path.join(self.folder, "tmp"), TMP_MAX_AGE_S)
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        states = set(name[:-5] for name in names if name.endswith(".json"))
        now = time.time()
        for name in names:
            path = os.path.join(self.folder, name)
            if name.endswith(".eml") and name[:-4] not in states:
                try:
                    if now - os.stat(path).st_mtime > older_than_s:
                        os.unlink(path)
                except OSError:
                    pass

    def lock(self) -> Optional[int]:
        """Take the queue's delivery lock (one delivering process per maildir), or None when
        another process holds it or there is no queue yet."""
        try:
            fd = os.open(os.path.join(self.folder, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd


# --- DNS ------------------------------------------------------------------------------

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
    # A backslash is _read_name's escape of an odd octet: that name is no host name to ask for.
    if "\\" in text or any(not 0 < len(label) <= DNS_MAX_LABEL for label in labels):
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
                parse_ip(words[1])
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
        lookup did. Without, every MX host is returned and none is looked up (but the
        implicit MX still must have an address).
        """
        try:
            name = mail_domain(domain)
        except ValueError as exc:
            raise PermFail(str(exc)) from None
        answer = self.lookup(name, DNS_TYPE_MX)
        if not answer.exists:
            raise PermFail("domain %s does not exist (NXDOMAIN)" % name)
        if any(exchange == "" for _, exchange in answer.records):
            raise PermFail("domain %s accepts no mail (null MX, RFC 7505)" % name, "5.1.10")
        if answer.records:
            hosts = _order_mx_hosts(answer.records)
            if not hosts:
                raise PermFail("no MX record of %s names a valid host" % name, "5.4.4")
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
            raise PermFail("no MX host of %s has an address record" % name, "5.4.4")
        raise PermFail("domain %s has no MX and no address record" % name, "5.4.4")

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
        query = build_query(name, qtype, _random_query_id())
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


def _random_query_id() -> int:
    """An unpredictable 16-bit query ID (RFC 5452 9.2), from the kernel's CSPRNG.

    os.urandom rather than the secrets module, which would load OpenSSL's hashes (3 MB)."""
    return int.from_bytes(os.urandom(2), "big")


def resolve_mx(domain: str, config: Optional[Config] = None) -> list:
    """The MX hosts of a domain in delivery order, with a one-off Resolver (see Resolver)."""
    return Resolver(config or Config()).resolve_mx(domain)


# --- Line-protocol base ---------------------------------------------------------------

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
        self.idle_threads = 0       # threads waiting for a connection in self.waiting
        self.waiting = queue.SimpleQueue()
        self.sessions = 0
        super().__init__(address, handler)

    def server_activate(self):
        super().server_activate()
        _set_socket_timeouts(self.socket, self.config.timeout)     # inherited by accept()

    def shutdown_request(self, request):
        """Close without socketserver's extra shutdown(): the session has ended already."""
        self.close_request(request)

    def next_session_id(self) -> str:
        with self.lock:
            self.sessions += 1
            return "%s%d" % (self.name[0], self.sessions)

    def process_request(self, request, client_address):
        """Serve the connection on an idle thread or a new one; refuse it at the cap."""
        with self.lock:
            full = len(self.connections) >= self.config.max_connections
            handed_over = False
            if not full:
                self.connections[request] = None
                if self.idle_threads:
                    self.idle_threads -= 1
                    self.waiting.put((request, client_address))
                    handed_over = True
        if full:
            log.info("%s refused connection from %s: %d connections already",
                     self.name, client_address[0], self.config.max_connections)
            try:
                request.settimeout(1.0)
                request.sendall(self.RequestHandlerClass.too_many_connections)
            except OSError:
                pass
            self.shutdown_request(request)
        elif not handed_over:
            threading.Thread(target=self._serve_connections, args=((request, client_address),),
                             daemon=True).start()

    def _serve_connections(self, job) -> None:
        """Serve a connection, then wait a while for the next one.

        Still one thread per connection, but a finished thread is reused: starting a
        thread costs more than a short SMTP session (smtp-source opens one per message).
        """
        while job is not None:
            request, client_address = job
            with self.lock:
                self.connections[request] = threading.current_thread()
            try:
                self.process_request_thread(request, client_address)
            finally:
                with self.lock:
                    self.connections.pop(request, None)
                    self.idle_threads += 1
            try:
                job = self.waiting.get(timeout=IDLE_THREAD_S)
            except queue.Empty:
                with self.lock:     # a job may have been handed over as the wait ended
                    try:
                        job = self.waiting.get_nowait()
                    except queue.Empty:
                        self.idle_threads -= 1
                        job = None

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
            for _ in range(self.idle_threads):
                self.waiting.put(None)          # wakes an idle thread, which then ends
            self.idle_threads = 0
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
    sasl_prompt = b""                         # before a SASL challenge: "334 ", "+ "
    sasl_errors = {}                          # SASL problem -> (code, status, text)

    def setup(self):
        self.config = self.server.config
        self.app = self.server.app
        self.sock = self.request
        self.inbuf = bytearray()
        self.outbuf = []
        self.outbuf_bytes = 0
        self.auth_failures = 0
        self.peer_ip = self.client_address[0]
        self.is_loopback = self.config.is_loopback(self.peer_ip)
        self.sid = self.server.next_session_id()
        self.tls = False
        self.closing = False
        self.read_timeout_s = self.config.timeout
        if self.sock.gettimeout() is not None:
            self.sock.settimeout(None)
        if not SOCKET_TIMEOUTS_INHERITED:
            _set_socket_timeouts(self.sock, self.config.timeout)
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
        except SendTimeout:             # a last reply would only wait as long again
            log.info("%s client stopped reading: closed after %gs", self.sid, self.config.timeout)
        except IdleTimeout:
            log.info("%s timeout after %gs", self.sid, self.config.timeout)
            try:
                self.on_timeout()
            except (OSError, IdleTimeout):
                pass
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
        log.debug("%s << %r", self.sid,
                  mask_auth(line) if line[:4].upper() in (b"AUTH", b"PASS") else line)
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
    # sent in one write before the next blocking read, or once WRITE_BUFFER is waiting.
    def send(self, data: bytes) -> None:
        log.debug("%s >> %r", self.sid, data)
        self.send_text(data)

    def send_text(self, data: bytes) -> None:
        """Queue output without logging it (message text)."""
        self.outbuf.append(data)
        self.outbuf_bytes += len(data)
        if self.outbuf_bytes >= WRITE_BUFFER:
            self.flush()

    def flush(self) -> None:
        if self.outbuf:
            data = b"".join(self.outbuf)
            self.outbuf = []
            self.outbuf_bytes = 0
            try:
                self.sock.sendall(data)
            except (BlockingIOError, socket.timeout):
                raise SendTimeout() from None

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
        """Read more bytes into the input buffer."""
        self.inbuf += self._recv(deadline)

    def _recv(self, deadline: Optional[float] = None) -> bytes:
        """Read the next bytes from the socket, flushing pending replies first.

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
        return data

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
                self._discard_to_lf(deadline or time.monotonic() + self.config.timeout)
                raise LineTooLong()
            start = len(self.inbuf)
            if deadline is None:        # the first read may take the whole timeout
                deadline = time.monotonic() + self.config.timeout
                self._fill()
            else:
                self._fill(deadline)

    def _discard_to_lf(self, deadline: float) -> None:
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
            if self.inbuf:
                data = bytes(self.inbuf[:count])
                del self.inbuf[:len(data)]
            else:
                data = self._recv()
                if len(data) > count:       # the next command follows the chunk
                    self.inbuf += data[count:]
                    data = data[:count]
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
            data = self._recv()     # bypasses inbuf: a body chunk is copied as little as possible
            pending = pending + data if pending else data

    def start_tls(self, context) -> None:
        """Wrap the connection in TLS, discarding any plaintext read ahead (RFC 3207 4.2)."""
        self.flush()
        self.inbuf.clear()
        self.sock.settimeout(self.config.timeout)
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.tls = True
        self.read_timeout_s = self.config.timeout

    # SASL (RFC 4422) as SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034) use it; problems
    # are answered with the protocol's own reply from sasl_errors.
    def sasl_error(self, problem: str) -> Reply:
        return Reply(*self.sasl_errors[problem])

    def sasl_login(self, arg: bytes) -> tuple:
        """Run the exchange of 'AUTH mechanism [initial-response]'; return (username, password)."""
        mechanism, _, initial = arg.partition(b" ")
        method = getattr(self, "auth_" + mechanism.decode("ascii", "replace").upper(), None) \
            if VERB_RE.fullmatch(mechanism) else None
        if method is None:
            raise self.sasl_error("mechanism")
        return method(initial.strip() or None)

    def sasl_response(self, challenge: bytes, initial: Optional[bytes]) -> bytes:
        """The client's decoded answer to a challenge, or its initial response."""
        if initial is None:
            self.send(self.sasl_prompt + challenge + b"\r\n")
            try:
                initial = self.read_line(SASL_MAX_RESPONSE_LINE)
            except LineTooLong:
                raise self.sasl_error("too long") from None
        if initial == b"*":
            raise self.sasl_error("cancelled")
        if initial == b"=":
            return b""
        try:
            return base64.b64decode(initial, validate=True)
        except (binascii.Error, ValueError):
            raise self.sasl_error("base64") from None

    def auth_PLAIN(self, initial: Optional[bytes]) -> tuple:
        parts = self.sasl_response(b"", initial).split(b"\x00")
        if len(parts) != 3:
            raise self.sasl_error("malformed")
        authzid, username, password = parts
        if authzid and authzid != username:
            raise self.sasl_error("identity")
        return username, password

    def login_failed(self, username: bytes) -> bool:
        """Log a refused login and wait the configured delay; True at the last allowed failure."""
        self.auth_failures += 1
        log.info("%s auth failed for %r", self.sid, username[:64])
        self.flush()
        time.sleep(self.config.auth_failure_delay)
        return self.auth_failures >= AUTH_MAX_FAILURES


def _timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO / SO_SNDTIMEO."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def _set_socket_timeouts(sock: socket.socket, seconds: float) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))


def _terminator_prefix_len(data: bytes) -> int:
    """Length of the longest tail of data that could begin a DATA terminator."""
    for length in (4, 3, 2, 1):
        if data.endswith(DATA_TERMINATOR[:length]):
            return length
    return 0


# --- SMTP server ----------------------------------------------------------------------

@dataclass
class Envelope:
    """One mail transaction; replaced, never patched, on RSET, after DATA and STARTTLS."""
    sender: Optional[str] = None        # None before MAIL; "" is the null sender
    smtputf8: bool = False
    mailboxes: list = field(default_factory=list)   # local folder names, in RCPT order
    relay: list = field(default_factory=list)       # QueueRecipient for each remote address
    recipients: list = field(default_factory=list)  # every accepted address, for the log
    writer: Optional[MessageWriter] = None          # an open BDAT message
    bdat_error: Optional[Reply] = None              # a BDAT failure reported at LAST


class SMTPHandler(LineHandler):
    """An ESMTP session: receiving for local domains, submission with AUTH."""

    verb_prefix = "smtp_"
    max_read_line = SASL_MAX_RESPONSE_LINE      # AUTH may carry a long initial response
    too_many_connections = b"421 4.7.0 Too many connections, try again later\r\n"
    sasl_prompt = b"334 "
    sasl_errors = {
        "mechanism": (504, "5.5.4", "Unrecognized authentication mechanism"),
        "too long": (500, "5.5.6", "Authentication exchange line is too long"),
        "cancelled": (501, "5.0.0", "Authentication cancelled"),
        "base64": (501, "5.5.2", "Invalid base64 data"),
        "malformed": (501, "5.5.2", "Malformed PLAIN response"),
        "identity": (535, "5.7.8", "Authorization identity not allowed"),
    }

    def start_session(self):
        self.helo = None
        self.esmtp = False
        self.auth_user = None       # the account a successful AUTH names
        self.authenticated = False  # AUTH succeeded (maybe as a dev-sink login)
        self.errors = 0
        self.envelope = Envelope()
        self.submission = self.server.name == "submission"
        self.send(b"220 %s ESMTP minimail\r\n" % self.config.hostname.encode())

    def end_session(self):
        if self.envelope.writer is not None:
            self.envelope.writer.abort()

    def on_timeout(self):
        self.send(b"421 4.4.2 %s Timeout, closing connection\r\n" % self.config.hostname.encode())
        self.flush()

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
        if not text or " " in text or CONTROL_RE.search(text):     # it goes into Received:
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
                if value is None or not value.isdigit():
                    raise Reply(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self.config.max_size:
                    raise Reply(552, "5.3.4", "Message size exceeds fixed limit")
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
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
            if CONTROL_RE.search(local):        # it would go into Return-Path: and logs
                raise Reply(553, "5.1.7", "Control characters in sender address")
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
        folder = folder_name(local, domain)
        if not is_safe_folder(folder):
            raise Reply(553, "5.1.3", "Recipient address not allowed as a mailbox name")
        envelope = self.envelope
        if self._is_relayed(folder, local.lower(), domain):
            # The local part goes out exactly as written; the domain in A-label form.
            address = "%s@%s" % (path.rpartition("@")[0], domain)
            if all(rcpt.address != address for rcpt in envelope.relay):
                envelope.relay.append(QueueRecipient(address, domain))
            envelope.recipients.append(address)
        else:
            if folder not in envelope.mailboxes:
                envelope.mailboxes.append(folder)
            envelope.recipients.append(folder)
        self.reply(250, "2.1.5", "Ok")

    def _is_relayed(self, folder: str, local: str, domain: str) -> bool:
        """Apply the recipient policy of SPEC 4: False for a mailbox, True to relay, or refuse."""
        config = self.config
        if domain in config.local_domains:
            if local != "postmaster" and config.accounts and not config.catch_all \
                    and folder not in config.accounts:
                raise Reply(550, "5.1.1", "Mailbox unavailable")
            return False
        if config.catch_all:
            return False
        # A dev-sink login (no accounts configured) grants nothing: auth_user stays None.
        if self.auth_user is not None or config.may_relay_from(self.peer_ip):
            return True
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
        date = rfc5322_date()
        copies = []
        for mailbox in envelope.mailboxes:
            copies.append(_Copy(mailbox, mailbox_header(
                envelope.sender, mailbox, self._received_header(message_id, mailbox, date))))
        if envelope.relay:
            only = envelope.relay[0].address if len(envelope.relay) == 1 else None
            copies.append(_Copy(None, self._received_header(message_id, only, date).encode("utf-8")))
        writer = MessageWriter(self.app.maildir, self.app.queue, message_id, copies)
        try:
            writer.open(self.config.max_size)
        except OSError as exc:
            log.error("%s cannot create message file: %s", self.sid, exc)
            writer.abort()
            raise Reply(451, "4.3.0", "Local storage error, try again later") from None
        return writer

    def _received_header(self, message_id: str, recipient: Optional[str], date: str) -> str:
        """The Received: header (RFC 5321 4.4); 'for' names this copy's recipient, if one."""
        return "Received: from %s (%s)\n\tby %s (minimail) with %s id %s%s;\n\t%s\n" % (
            self.helo, address_literal(self.peer_ip), self.config.hostname,
            self.protocol_name(), message_id, " for <%s>" % recipient if recipient else "", date)

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
        stored = []
        try:
            stored = writer.commit()
            if envelope.relay:
                self.app.relay.enqueue(QueueEntry(
                    writer.message_id, envelope.sender, time.time(), envelope.relay,
                    smtputf8=envelope.smtputf8, eight_bit=writer.eight_bit, size=writer.size))
        except OSError as exc:
            log.error("%s storing message failed: %s", self.sid, exc)
            if envelope.relay:
                for path in stored:
                    _unlink_quietly(path)
            raise Reply(451, "4.3.0", "Local storage error, try again later") from None
        log.info("%s accept id=%s from=<%s> rcpts=%s size=%d", self.sid, writer.message_id,
                 envelope.sender, ",".join(envelope.recipients), writer.size)
        self.app.notify_new(writer.size)
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
        username, password = self.sasl_login(arg)
        self._check_credentials(username, password)

    def auth_LOGIN(self, initial: Optional[bytes]) -> tuple:
        username = self.sasl_response(b"VXNlcm5hbWU6", initial)      # "Username:"
        password = self.sasl_response(b"UGFzc3dvcmQ6", None)         # "Password:"
        return username, password

    def _check_credentials(self, username: bytes, password: bytes) -> None:
        """Accept or refuse credentials; failures are slowed and counted (SPEC 4)."""
        account = self.app.check_login(username, password, self.is_loopback)
        if account is False:
            if self.login_failed(username):
                raise Reply(421, "4.7.0", "Too many authentication failures", close=True)
            raise Reply(535, "5.7.8", "Authentication credentials invalid")
        self.authenticated = True
        self.auth_user = account
        log.info("%s auth ok as %s", self.sid, account or "(dev sink, grants nothing)")
        self.reply(235, "2.7.0", "Authentication successful")


# --- Relay delivery -------------------------------------------------------------------

SMTP_MAX_TEXT_LINE = 998            # RFC 5321 4.5.3.1.6, without CRLF
REPLY_MAX_LINES = 100               # a longer multi-line reply is a broken server
REPLY_MAX_LINE = 4096               # RFC 5321 says 512; be generous, but bounded
RETRY_DELAY_MAX_S = 4000.0          # SPEC 2: delays double, at most 4000 s
QUEUE_RESCAN_S = 60.0               # look for entries queued by another process
DSN_HEADERS_MAX = 64 * 1024         # original headers carried in a bounce


class _HostFailure(Exception):
    """This server cannot take the message now (no connection, bad greeting): try the next."""


class SMTPClient:
    """A small SMTP client for relaying: bounded replies, every wait bounded by a timeout."""

    def __init__(self, address: str, port: int, timeout: float):
        self.timeout = timeout
        self.sock = socket.create_connection((address, port), timeout=timeout)
        self.buf = bytearray()
        self.tls = False

    def _read_line(self, deadline: float) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end]).rstrip(b"\r")
                del self.buf[:end + 1]
                return line
            if len(self.buf) > REPLY_MAX_LINE:
                raise _HostFailure("reply line too long")
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise _HostFailure("no complete reply within %gs" % self.timeout)
            self.sock.settimeout(remaining_s)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                raise _HostFailure("no complete reply within %gs" % self.timeout) from None
            if not data:
                raise _HostFailure("connection closed by server")
            self.buf += data

    def read_reply(self) -> tuple:
        """(code, [text lines]) of one reply; _HostFailure if it is not SMTP.

        SPEC 7: the timeout bounds the whole reply, so a server trickling bytes cannot
        stretch it. Control characters in the text become spaces: a bare CR would break
        the lines of a bounce.
        """
        deadline = time.monotonic() + self.timeout
        lines = []
        try:
            while True:
                line = self._read_line(deadline)
                if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                    raise _HostFailure("malformed reply %r" % line[:80])
                lines.append(CONTROL_RE.sub(" ", line[4:].decode("utf-8", "replace")).strip())
                if line[3:4] != b"-":
                    return int(line[:3]), lines
                if len(lines) >= REPLY_MAX_LINES:
                    raise _HostFailure("reply too long")
        finally:
            self.sock.settimeout(self.timeout)     # each write is bounded on its own

    def command(self, text: str) -> tuple:
        self.sock.sendall(text.encode("utf-8") + b"\r\n")
        return self.read_reply()

    def starttls(self, hostname: str) -> None:
        """Opportunistic TLS, like Postfix's 'may': encrypt, but accept any certificate."""
        import ssl
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.buf.clear()
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname)
        self.tls = True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def relay_chunks(path: str):
    """Yield a stored message as DATA text: CRLF line ends, dot-stuffed (RFC 5321 4.5.2),
    lines over 998 octets broken with CRLF SP (SPEC 7). The final '.' is not included."""
    line_length = 0             # octets of the unfinished line already yielded
    at_line_start = True
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(READ_BLOCK), b""):
            first_end = block.find(b"\n")
            # Line lengths from split(): a regex search for 999 non-LF octets cost some
            # 2 s of CPU (holding the GIL) per 24 MB message.
            if line_length + (first_end if first_end >= 0 else len(block)) > SMTP_MAX_TEXT_LINE \
                    or max(map(len, block.split(b"\n"))) > SMTP_MAX_TEXT_LINE:
                block, line_length = _fold_long_lines(block, line_length)
            else:
                last_end = block.rfind(b"\n")
                line_length = len(block) - last_end - 1 if last_end >= 0 else line_length + len(block)
            block = block.replace(b"\n.", b"\n..")
            if at_line_start and block.startswith(b"."):
                block = b"." + block
            at_line_start = block.endswith(b"\n")
            yield block.replace(b"\n", b"\r\n")
    if not at_line_start:
        yield b"\r\n"


def _fold_long_lines(block: bytes, line_length: int) -> tuple:
    """Break lines longer than 998 octets with LF SP (CRLF SP on the wire)."""
    out = []
    for index, piece in enumerate(block.split(b"\n")):
        if index:
            out.append(b"\n")
            line_length = 0
        while line_length + len(piece) > SMTP_MAX_TEXT_LINE:
            room = SMTP_MAX_TEXT_LINE - line_length
            out.extend((piece[:room], b"\n "))
            piece = piece[room:]
            line_length = 1
        out.append(piece)
        line_length += len(piece)
    return b"".join(out), line_length


def _status_of(code: int, lines: list) -> str:
    """The enhanced status of a reply, or one derived from its class (RFC 3463)."""
    match = re.match(r"([245])\.(\d{1,3})\.(\d{1,3})\b", lines[0] if lines else "")
    return match.group(0) if match else "%d.0.0" % (code // 100)


class Relay:
    """Deliver queued mail in the background: MX hosts or a smarthost, retries with growing
    delays, RFC 3464 bounces (SPEC 7). Only one process delivers a maildir's queue."""

    def __init__(self, app: "App"):
        self.app = app
        self.config = app.config
        self.queue = app.queue
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.entries = {}           # ID -> QueueEntry this process knows of
        self.busy = set()           # IDs being attempted now
        self.workers = []
        self.stopping = False
        self.lock_fd = None
        self.scheduler = None
        self.flushes = 0            # flush() calls so far: one during an attempt still counts

    def start(self) -> None:
        self.scheduler = threading.Thread(target=self._schedule, name="relay", daemon=True)
        self.scheduler.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.changed.notify_all()
            workers = list(self.workers)
        if self.scheduler is not None:
            self.scheduler.join(5.0)
        deadline = time.monotonic() + 5.0
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def enqueue(self, entry: QueueEntry) -> None:
        """Save a new entry durably (OSError if that fails) and schedule it at once."""
        with self.lock:     # known and busy before its state is on disk: no scan adopts a copy
            self.entries[entry.id] = entry
            self.busy.add(entry.id)
        saved = False
        try:
            self.queue.save(entry)
            saved = True
        finally:
            with self.lock:
                if not saved:
                    self.entries.pop(entry.id, None)
                self.busy.discard(entry.id)
                self.changed.notify_all()

    def flush(self) -> None:
        """Retry every entry now (SIGUSR1)."""
        with self.lock:
            self.flushes += 1
            for entry in self.entries.values():
                entry.next_try = 0.0
            self.changed.notify_all()
        log.info("relay: retrying every queued message now")

    # Scheduling.
    def _schedule(self) -> None:
        next_scan = 0.0
        while True:
            with self.lock:
                if self.stopping:
                    return
            if self.lock_fd is None:
                try:
                    self.lock_fd = self.queue.lock()
                except OSError as exc:
                    log.error("relay: cannot open the queue: %s", exc)
                if self.lock_fd is None:
                    with self.lock:
                        if self.stopping:       # stop() may have come while unlocked
                            return
                        self.changed.wait(QUEUE_RESCAN_S)
                    continue
                self.queue.remove_orphans()
            if time.monotonic() >= next_scan:
                self._scan(resume=next_scan == 0.0)
                next_scan = time.monotonic() + QUEUE_RESCAN_S
            with self.lock:
                if self.stopping:               # stop() may have come during the scan
                    return
                now = time.time()
                # Count busy IDs, not live threads: a worker notifies in its finally, before
                # its thread has ended, and would otherwise still look busy here.
                self.workers = [worker for worker in self.workers if worker.is_alive()]
                waiting = [entry for entry in self.entries.values() if entry.id not in self.busy]
                for entry in sorted(waiting, key=lambda entry: entry.next_try):
                    if entry.next_try > now or len(self.busy) >= self.config.relay_workers:
                        break
                    self.busy.add(entry.id)
                    worker = threading.Thread(target=self._work, args=(entry,), daemon=True)
                    self.workers.append(worker)
                    worker.start()
                waiting = [entry.next_try for entry in self.entries.values()
                           if entry.id not in self.busy]
                wait_s = min([next_scan - time.monotonic()] + [due - now for due in waiting])
                if len(self.busy) < self.config.relay_workers or not waiting:
                    self.changed.wait(max(0.0, wait_s))
                else:
                    self.changed.wait(QUEUE_RESCAN_S)       # a worker's end notifies

    def _scan(self, resume: bool) -> None:
        """Pick up entries on disk this process does not know yet (another process's).

        The first scan resumes what a previous run left: those entries are tried at once,
        since a restart often follows a fix of the configuration.
        """
        resumed = 0
        for message_id in self.queue.ids():
            with self.lock:
                known = message_id in self.entries
            if not known:
                entry = self.queue.load(message_id)
                if entry is not None:
                    if resume:
                        entry.next_try = 0.0
                        resumed += 1
                    with self.lock:
                        self.entries.setdefault(message_id, entry)
        if resumed:
            log.info("relay: resuming %d queued message(s)", resumed)

    def _work(self, entry: QueueEntry) -> None:
        with self.lock:
            flushes = self.flushes
        try:
            self.attempt(entry)
        except Exception as exc:        # a bug must not stop the relay; retry later
            log.error("relay %s failed: %s", entry.id, exc.__class__.__name__)
            log.debug("traceback", exc_info=True)
            entry.next_try = time.time() + self.config.retry_delay
        finally:
            with self.lock:
                if self.flushes != flushes:     # asked to retry while this attempt ran
                    entry.next_try = 0.0
                self.busy.discard(entry.id)
                self.changed.notify_all()

    # Delivery.
    def attempt(self, entry: QueueEntry) -> None:
        """Try every pending recipient once; record results, bounce failures, reschedule."""
        config = self.config
        if not os.path.exists(self.queue.message_path(entry.id)):
            log.error("relay %s: message file missing; dropping the entry", entry.id)
            self._forget(entry)
            return
        pending = [rcpt for rcpt in entry.recipients if rcpt.pending]
        if pending:
            entry.attempts += 1
            groups = {}
            for rcpt in pending:
                groups.setdefault(None if config.smarthost else rcpt.domain, []).append(rcpt)
            for domain, group in groups.items():
                self._deliver_group(entry, domain, group)
                self.queue.save(entry)
        if time.time() >= entry.created + config.queue_lifetime:
            for rcpt in entry.recipients:
                if rcpt.pending:
                    self._fail(rcpt, "4.4.7", "X-Minimail; delivery time expired"
                               + (" (last error: %s)" % rcpt.last_error if rcpt.last_error else ""))
        self._bounce(entry)
        if any(rcpt.pending for rcpt in entry.recipients):
            # Cap the exponent: 2 ** 1024 does not fit a float (OverflowError).
            delay_s = min(config.retry_delay * 2 ** min(entry.attempts - 1, 32), RETRY_DELAY_MAX_S)
            entry.next_try = min(time.time() + delay_s, entry.created + config.queue_lifetime)
            self.queue.save(entry)
        elif any(rcpt.state == "failed" for rcpt in entry.recipients):
            # The bounce could not be stored: keep the entry and try the bounce again.
            entry.next_try = time.time() + config.retry_delay
            self.queue.save(entry)
        else:
            self._forget(entry)

    def _forget(self, entry: QueueEntry) -> None:
        self.queue.remove(entry.id)
        with self.lock:
            self.entries.pop(entry.id, None)
        log.info("relay %s done: %s", entry.id, ", ".join(
            "%s %s" % (rcpt.address, rcpt.state) for rcpt in entry.recipients))

    def _routes(self, domain: Optional[str]) -> list:
        """(host name, [addresses], port) to try in order; PermFail/TempFail from DNS."""
        if domain is None:
            host, port = self.config.smarthost
            return [(host, [host], port)]
        if domain.startswith("["):                  # an address literal, RFC 5321 4.1.3
            literal = domain[1:-1]
            literal = literal[5:] if literal[:5].lower() == "ipv6:" else literal
            try:
                return [(domain, [str(ipaddress.ip_address(literal))], self.config.mx_port)]
            except ValueError:
                raise PermFail("%s is not an IP address literal" % domain) from None
        return [(mx.host, list(mx.addresses), self.config.mx_port)
                for mx in self.app.resolver.resolve_mx(domain)]

    def _deliver_group(self, entry: QueueEntry, domain: Optional[str], group: list) -> None:
        """Deliver to the recipients of one domain (or all, via the smarthost)."""
        for rcpt in group:
            rcpt.attempts += 1
        try:
            routes = self._routes(domain)
        except PermFail as exc:
            for rcpt in group:
                self._fail(rcpt, exc.status or "5.1.2", "X-Minimail; %s" % exc)
            return
        except TempFail as exc:
            for rcpt in group:
                self._defer(rcpt, str(exc))
            return
        errors = []
        for host, addresses, port in routes:
            if not addresses:
                errors.append("%s has no address" % host)
            for address in addresses:
                # A failure after some answers (say, the state write after the final 250)
                # must not send again to, or defer, recipients that already have a result.
                group = [rcpt for rcpt in group if rcpt.pending]
                if not group:
                    return
                try:
                    self._transaction(entry, group, host, address, port)
                    return
                except (_HostFailure, OSError) as exc:
                    text = "%s[%s]:%d: %s" % (host, address, port,
                                               getattr(exc, "strerror", None) or exc)
                    log.info("relay %s: %s", entry.id, text)
                    errors.append(text)
        for rcpt in group:
            if rcpt.pending:
                self._defer(rcpt, errors[-1] if errors else "no mail exchanger")

    def _transaction(self, entry: QueueEntry, group: list, host: str, address: str,
                     port: int) -> None:
        """One SMTP session delivering entry to the group's recipients."""
        client = SMTPClient(address, port, self.config.timeout)
        remote = "%s[%s]" % (host, address)
        try:
            code, lines = client.read_reply()
            if code != 220:
                raise _HostFailure("greeting: %d %s" % (code, " ".join(lines)))
            features = self._hello(client)
            if "STARTTLS" in features:
                code, lines = client.command("STARTTLS")
                if code == 220:
                    client.starttls(host)
                    features = self._hello(client)
            if self.config.smarthost and self.config.smarthost_auth:
                self._authenticate(client, features)
            needs = [("SMTPUTF8", entry.smtputf8, "5.6.7", "does not support SMTPUTF8"),
                     ("8BITMIME", entry.eight_bit, "5.6.3", "does not accept 8-bit data")]
            for feature, needed, status, text in needs:
                if needed and feature not in features:
                    for rcpt in group:
                        self._fail(rcpt, status, "X-Minimail; %s %s" % (remote, text), remote)
                    return
            limit = features.get("SIZE", "")
            if limit.isdigit() and 0 < int(limit) < entry.size:
                for rcpt in group:
                    self._fail(rcpt, "5.3.4", "X-Minimail; message size %d exceeds %s's limit %s"
                               % (entry.size, remote, limit), remote)
                return
            mail = "MAIL FROM:<%s>" % entry.sender
            if "SIZE" in features:
                mail += " SIZE=%d" % entry.size
            if entry.eight_bit:
                mail += " BODY=8BITMIME"
            if entry.smtputf8:
                mail += " SMTPUTF8"
            code, lines = client.command(mail)
            if code // 100 != 2:
                for rcpt in group:
                    self._record(rcpt, code, lines, remote, "MAIL FROM")
                return
            accepted = []
            for rcpt in group:
                code, lines = client.command("RCPT TO:<%s>" % rcpt.address)
                if code // 100 == 2:
                    accepted.append(rcpt)
                else:
                    self._record(rcpt, code, lines, remote, "RCPT TO")
            if not accepted:
                return
            code, lines = client.command("DATA")
            if code != 354:
                for rcpt in accepted:
                    self._record(rcpt, code, lines, remote, "DATA")
                return
            last = b""
            for chunk in relay_chunks(self.queue.message_path(entry.id)):
                if last:
                    client.sock.sendall(last)
                last = chunk
            # The final '.' goes in the last write: alone, Nagle's algorithm holds it until
            # the server's delayed ACK, some 40 ms per message.
            client.sock.sendall(last + b".\r\n")
            code, lines = client.read_reply()
            for rcpt in accepted:
                self._record(rcpt, code, lines, remote, "end of DATA")
            self.queue.save(entry)      # at once: a crash must not send it again
            try:
                client.command("QUIT")
            except (OSError, _HostFailure):
                pass
        finally:
            client.close()

    def _hello(self, client: SMTPClient) -> dict:
        """EHLO (HELO when refused); the server's extensions as {KEYWORD: parameters}."""
        code, lines = client.command("EHLO " + self.config.hostname)
        if code == 250:
            return {line.partition(" ")[0].upper(): line.partition(" ")[2]
                    for line in lines[1:] if line}
        code, lines = client.command("HELO " + self.config.hostname)
        if code != 250:
            raise _HostFailure("HELO refused: %d %s" % (code, " ".join(lines)))
        return {}

    def _authenticate(self, client: SMTPClient, features: dict) -> None:
        """AUTH at the smarthost, only inside TLS or to a loopback host (SPEC 7)."""
        peer = client.sock.getpeername()[0]      # the address connected to, even for a name
        if not (client.tls or self.config.is_loopback(peer)):
            log.info("relay: not sending smarthost credentials without TLS to %s", peer)
            return
        user, password = self.config.smarthost_auth
        mechanisms = features.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms or "LOGIN" not in mechanisms:
            token = base64.b64encode(("\0%s\0%s" % (user, password)).encode("utf-8")).decode()
            code, lines = client.command("AUTH PLAIN " + token)
        else:
            client.command("AUTH LOGIN")
            client.command(base64.b64encode(user.encode("utf-8")).decode())
            code, lines = client.command(base64.b64encode(password.encode("utf-8")).decode())
        if code != 235:
            raise _HostFailure("authentication failed: %d %s" % (code, " ".join(lines)))

    # Outcomes.
    def _record(self, rcpt: QueueRecipient, code: int, lines: list, remote: str, stage: str) -> None:
        text = "%d %s" % (code, " ".join(lines))
        if code // 100 == 2:
            rcpt.state, rcpt.last_error, rcpt.remote_mta = "delivered", "", remote
            log.info("relay delivered to %s via %s: %s", rcpt.address, remote, text)
        elif code // 100 == 5:
            self._fail(rcpt, _status_of(code, lines), "smtp; " + text, remote,
                       "%s said: %s (in reply to %s)" % (remote, text, stage))
        else:
            self._defer(rcpt, "%s said: %s (in reply to %s)" % (remote, text, stage))

    def _defer(self, rcpt: QueueRecipient, error: str) -> None:
        rcpt.state, rcpt.last_error = "deferred", " ".join(error.split())
        log.info("relay deferred %s: %s", rcpt.address, rcpt.last_error)

    def _fail(self, rcpt: QueueRecipient, status: str, diagnostic: str, remote: str = "",
              error: str = "") -> None:
        rcpt.state, rcpt.status, rcpt.diagnostic, rcpt.remote_mta = "failed", status, diagnostic, remote
        rcpt.last_error = " ".join((error or diagnostic.partition("; ")[2]).split())
        log.info("relay failed %s: %s %s", rcpt.address, status, rcpt.last_error)

    def _bounce(self, entry: QueueEntry) -> None:
        """Send one delivery status notification for the recipients that just failed."""
        failed = [rcpt for rcpt in entry.recipients if rcpt.state == "failed"]
        if not failed:
            return
        if entry.sender:
            try:
                bounce_id = self.app.store_generated("", entry.sender, self._dsn(entry, failed))
                log.info("relay %s: bounce %s sent to <%s>", entry.id, bounce_id, entry.sender)
            except (OSError, ValueError) as exc:
                if time.time() < entry.created + self.config.queue_lifetime:
                    log.error("relay %s: cannot store the bounce, will retry: %s", entry.id, exc)
                    return      # the recipients stay failed: the entry is kept and retried
                log.error("relay %s: bounce to <%s> dropped after the queue lifetime: %s",
                          entry.id, entry.sender, exc)
        else:
            log.info("relay %s: undeliverable mail from the null sender dropped", entry.id)
        for rcpt in failed:
            rcpt.state = "bounced"
        self.queue.save(entry)

    def _dsn(self, entry: QueueEntry, failed: list) -> bytes:
        """An RFC 3464 multipart/report for the failed recipients, in wire form (CRLF)."""
        hostname = self.config.hostname
        boundary = "%s/%s" % (entry.id, hostname)
        now = rfc5322_date()
        human = ["This is the mail system at host %s." % hostname, "",
                 "Your message could not be delivered to one or more recipients.", ""]
        human += ["<%s>: %s" % (rcpt.address, rcpt.last_error) for rcpt in failed]
        report = ["Reporting-MTA: dns; %s" % hostname, "X-Minimail-Queue-ID: %s" % entry.id,
                  "Arrival-Date: %s" % rfc5322_date(entry.created)]
        for rcpt in failed:
            kind = "rfc822" if rcpt.address.isascii() else "utf-8"
            report += ["", "Final-Recipient: %s; %s" % (kind, rcpt.address), "Action: failed",
                       "Status: %s" % rcpt.status]
            if rcpt.remote_mta:
                report.append("Remote-MTA: dns; %s" % rcpt.remote_mta.partition("[")[0])
            report += ["Diagnostic-Code: %s" % rcpt.diagnostic, "Last-Attempt-Date: %s" % now]
        text = "\r\n".join([
            "From: Mail Delivery System <MAILER-DAEMON@%s>" % hostname,
            "To: <%s>" % entry.sender,
            "Subject: Undelivered Mail Returned to Sender",
            "Date: %s" % now,
            "Message-ID: <%s.bounce@%s>" % (entry.id, hostname),
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            'Content-Type: multipart/report; report-type=delivery-status; boundary="%s"' % boundary,
            "", "This is a MIME-encapsulated message.", "",
            "--%s" % boundary, "Content-Description: Notification",
            "Content-Type: text/plain; charset=utf-8", ""] + human + [
            "", "--%s" % boundary, "Content-Description: Delivery report",
            "Content-Type: message/%sdelivery-status" % ("" if entry.sender.isascii() else "global-"),
            ""] + report + [
            "", "--%s" % boundary, "Content-Description: Undelivered Message Headers",
            "Content-Type: text/rfc822-headers", "", ""])
        return text.encode("utf-8") + self._original_headers(entry) + (
            "\r\n--%s--\r\n" % boundary).encode("ascii")

    def _original_headers(self, entry: QueueEntry) -> bytes:
        """The queued message's header block (bounded), with CRLF line ends."""
        with open(self.queue.message_path(entry.id), "rb") as file:
            head = file.read(DSN_HEADERS_MAX)
        end = head.find(b"\n\n")
        head = head[:end + 1] if end >= 0 else head[:head.rfind(b"\n") + 1]
        return head.replace(b"\n", b"\r\n")


# --- POP3 server ----------------------------------------------------------------------

class MailboxLocks:
    """One POP3 session per mailbox (SPEC 5), across threads and processes.

    A flock() on a lock file inside the mailbox excludes other processes and is dropped
    by the kernel when the holder dies; the set of folders this process holds excludes
    a second session here even where flock() is emulated per process (NFS).
    """

    def __init__(self):
        self.guard = threading.Lock()
        self.released = threading.Condition(self.guard)
        self.held = set()

    def acquire(self, folder: str, wait_s: float) -> Optional[int]:
        """Lock a mailbox folder; the lock file's descriptor, or None when it stays in use
        for wait_s (a client that reconnects at once finds its last session ending)."""
        deadline = time.monotonic() + wait_s
        while True:
            fd = self._try(folder)
            remaining_s = deadline - time.monotonic()
            if fd is not None or remaining_s <= 0:
                return fd
            with self.released:     # a release here wakes us; another process's is polled
                self.released.wait(min(remaining_s, POP3_LOCK_POLL_S))

    def _try(self, folder: str) -> Optional[int]:
        with self.guard:
            if folder in self.held:
                return None
            self.held.add(folder)
        fd = -1
        try:
            fd = os.open(os.path.join(folder, POP3_LOCK_FILE),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            self._drop(folder, fd)
            return None
        except OSError:
            self._drop(folder, fd)
            raise

    def release(self, folder: str, fd: int) -> None:
        self._drop(folder, fd)      # closing the only descriptor releases the flock

    def _drop(self, folder: str, fd: int) -> None:
        if fd >= 0:
            os.close(fd)
        with self.guard:
            self.held.discard(folder)
            self.released.notify_all()


@dataclass
class POP3Message:
    """One message of a maildrop, numbered by its place in Maildrop.messages."""
    stored: StoredMessage
    octets: int                 # RFC 1939 11: size with CRLF line ends, before byte-stuffing
    deleted: bool = False       # DELE: removed at QUIT
    retrieved: bool = False     # RETR: marked seen (S) at QUIT
    gone: bool = False          # removed by another client since login


@dataclass
class Maildrop:
    """A logged-in session's mailbox: the messages present at login (RFC 1939 8)."""
    mailbox: str
    folder: str
    lock_fd: int
    messages: list


def uidl_of(message_id: str) -> str:
    """The RFC 1939 unique-id of a message: its ID, or a hash when the ID is not a valid one."""
    if 0 < len(message_id) <= POP3_MAX_UIDL and message_id.isascii() \
            and message_id.isprintable() and " " not in message_id:
        return message_id
    import hashlib      # loads OpenSSL's hashes (3 MB): only for an ID that needs it
    return hashlib.sha256(os.fsencode(message_id)).hexdigest()


def _top_length(file, body_lines: int) -> Optional[int]:
    """Bytes at the start of a message file that TOP sends: the headers, the blank line
    and body_lines lines of the body (RFC 1939 7); None when that is the whole file."""
    offset = 0
    in_body = False
    line_start = True
    while True:
        piece = file.readline(READ_BLOCK)
        if not piece:
            return None
        offset += len(piece)
        ends_line = piece.endswith(b"\n")
        if in_body:
            body_lines -= ends_line
        elif line_start and piece in (b"\n", b"\r\n"):
            in_body = True
        if in_body and body_lines <= 0:
            return offset
        line_start = ends_line


def _wire_blocks(file, limit: Optional[int] = None):
    """Yield a stored message (its first limit bytes) as POP3 sends it: every LF not after
    CR becomes CRLF, a last line without one gets CRLF (StoredMessage.wire_size counts the
    same), and lines starting with "." get another (RFC 1939 3 byte-stuffing)."""
    line_start = True
    held_cr = b""                # a CR at the end of a block, until we know whether LF follows
    last = b"\n"
    remaining = -1 if limit is None else limit
    while remaining:
        data = file.read(READ_BLOCK if remaining < 0 else min(READ_BLOCK, remaining))
        if not data:
            break
        remaining -= len(data) if remaining > 0 else 0
        data = held_cr + data
        held_cr = b""
        if data.endswith(b"\r"):
            held_cr, data = b"\r", data[:-1]
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        data = data.replace(b"\n", b"\r\n")
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n..")
        if line_start and data.startswith(b"."):
            data = b"." + data
        if data:
            line_start = data.endswith(b"\n")
            last = data[-1:]
            yield data
    if held_cr or last != b"\n":
        yield held_cr + b"\r\n"


class POP3Handler(LineHandler):
    """A POP3 session (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595) and AUTH PLAIN
    (RFC 5034), over the mailboxes SMTP delivery writes."""

    verb_prefix = "pop_"
    max_read_line = SASL_MAX_RESPONSE_LINE      # AUTH may carry a long initial response
    too_many_connections = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    sasl_prompt = b"+ "
    sasl_errors = {
        "mechanism": ("-ERR", "", "Unsupported authentication mechanism"),
        "too long": ("-ERR", "", "Authentication line too long"),
        "cancelled": ("-ERR", "", "Authentication cancelled"),
        "base64": ("-ERR", "", "Invalid base64 data"),
        "malformed": ("-ERR", "", "Malformed PLAIN response"),
        "identity": ("-ERR", "AUTH", "Authorization identity not allowed"),
    }

    def start_session(self):
        self.user = None            # the USER name, waiting for PASS
        self.maildrop = None        # set at login: the TRANSACTION state
        self.ok("%s POP3 minimail ready" % self.config.hostname)

    def end_session(self):
        if self.maildrop is not None:   # no QUIT: RFC 1939 6, nothing is updated
            self._unlock()

    def on_timeout(self):
        self.send(b"-ERR Disconnected for inactivity\r\n")
        self.flush()

    def ok(self, text: str = "", lines: Optional[list] = None) -> None:
        """A +OK reply; with lines, a multi-line one ended by "." (RFC 1939 3)."""
        status = b"+OK %s\r\n" % text.encode() if text else b"+OK\r\n"
        if lines is None:
            self.send(status)
        else:
            self.send(status + "".join([line + "\r\n" for line in lines]).encode() + b".\r\n")

    def format_reply(self, reply: Reply) -> bytes:
        if reply.status:
            return b"-ERR [%s] %s\r\n" % (reply.status.encode(), reply.text.encode())
        return b"-ERR %s\r\n" % reply.text.encode()

    def send_error(self, reply: Reply) -> None:
        log.info("%s refused: %s", self.sid, self.format_reply(reply).decode().rstrip())
        super().send_error(reply)

    def unknown_verb(self) -> Reply:
        return Reply("-ERR", "", "Unknown command")

    def line_too_long(self) -> Reply:
        return Reply("-ERR", "", "Line too long")

    def internal_error(self) -> Reply:
        return Reply("-ERR", "SYS/TEMP", "Internal error")

    def check_line(self, verb: bytes, line: bytes) -> None:
        limit = SASL_MAX_RESPONSE_LINE if verb == b"AUTH" else POP3_MAX_COMMAND_LINE
        if len(line) + 2 > limit:
            raise self.line_too_long()
        if b"\x00" in line or b"\r" in line:
            raise Reply("-ERR", "", "NUL or CR in command")

    # State.
    def may_login(self) -> bool:
        return self.tls or self.is_loopback

    def require_authorization(self) -> None:
        """Allow a login command: AUTHORIZATION state, in TLS or on loopback (SPEC 5)."""
        if self.maildrop is not None:
            raise Reply("-ERR", "", "Already logged in")
        if not self.may_login():
            raise Reply("-ERR", "AUTH", "use STLS")

    def require_maildrop(self) -> Maildrop:
        if self.maildrop is None:
            raise Reply("-ERR", "", "Log in first")
        return self.maildrop

    def message(self, arg: bytes) -> tuple:
        """(number, POP3Message) of a message number that names a message not deleted."""
        maildrop = self.require_maildrop()
        arg = arg.strip()
        if not arg.isdigit() or len(arg) > 9:
            raise Reply("-ERR", "", "Syntax: a message number")
        number = int(arg)
        if not 1 <= number <= len(maildrop.messages) or maildrop.messages[number - 1].deleted:
            raise Reply("-ERR", "", "No such message")
        return number, maildrop.messages[number - 1]

    def live_messages(self) -> list:
        """(number, POP3Message) of every message not marked deleted."""
        return [(number, message) for number, message in
                enumerate(self.require_maildrop().messages, 1) if not message.deleted]

    # Login and the maildrop.
    def login(self, username: bytes, password: bytes) -> None:
        """Check credentials, then lock and list the mailbox: the TRANSACTION state."""
        account = self.app.check_login(username, password, self.is_loopback)
        if account is False:
            if self.login_failed(username):
                raise Reply("-ERR", "AUTH", "Too many authentication failures", close=True)
            raise Reply("-ERR", "AUTH", "Authentication failed")
        mailbox = account
        if mailbox is None:             # dev sink: any password opens any mailbox
            try:
                mailbox = mailbox_name(username.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise Reply("-ERR", "AUTH", "Log in with a full address") from None
        if not is_safe_folder(mailbox):
            raise Reply("-ERR", "AUTH", "Not a valid mailbox name")
        maildir = self.app.maildir
        try:
            folder = maildir.ensure(mailbox)
            lock_fd = self.app.mailbox_locks.acquire(folder, self.config.pop3_lock_wait)
        except OSError as exc:
            log.error("%s cannot open mailbox %s: %s", self.sid, mailbox, exc)
            raise Reply("-ERR", "SYS/TEMP", "Cannot open the mailbox, try again later") from None
        if lock_fd is None:
            log.info("%s mailbox %s in use", self.sid, mailbox)
            raise Reply("-ERR", "IN-USE", "Mailbox is in use by another POP3 session")
        self.maildrop = Maildrop(mailbox, folder, lock_fd, [])
        try:
            self.maildrop.messages = [POP3Message(stored, octets) for stored, octets
                                      in self.app.maildir.sized_messages(mailbox)]
        except OSError as exc:
            log.error("%s cannot list mailbox %s: %s", self.sid, mailbox, exc)
            self._unlock()
            raise Reply("-ERR", "SYS/TEMP", "Cannot read the mailbox, try again later") from None
        log.info("%s pop3 login %s: %d messages", self.sid, mailbox, len(self.maildrop.messages))
        self.ok("Logged in, %d messages" % len(self.maildrop.messages))

    def _unlock(self) -> None:
        maildrop, self.maildrop = self.maildrop, None
        self.app.mailbox_locks.release(maildrop.folder, maildrop.lock_fd)

    def _on_current_file(self, message: POP3Message, action):
        """Return action(stored) for the message's file; None when the message is gone.

        Another client (HTTP) may have moved or removed files since login. The first miss
        lists the mailbox once and re-points every message, so a session that meets many
        moved files pays one listing, not one per message.
        """
        if not message.gone:
            try:
                return action(message.stored)
            except FileNotFoundError:
                self._find_moved_files()
        if message.gone:
            return None

        def act(stored: StoredMessage):
            result = action(stored)
            message.stored = stored         # remember where it was found
            return result
        result = self.app.maildir.follow(message.stored, act)      # moved once more meanwhile
        message.gone = result is None
        return result

    def _find_moved_files(self) -> None:
        current = {stored.id: stored for stored in self.app.maildir.messages(self.maildrop.mailbox)}
        for message in self.maildrop.messages:
            found = current.get(message.stored.id)
            message.gone = found is None
            message.stored = found or message.stored

    def _update(self) -> int:
        """The UPDATE state (RFC 1939 6): remove DELEted messages, mark RETRieved ones seen
        (moved to cur/ with S added to their flags); return how many could not be changed."""
        maildir = self.app.maildir
        failures = removed = seen = 0
        for message in self.maildrop.messages:
            if not (message.deleted or message.retrieved):
                continue
            try:
                if message.deleted:
                    if self._on_current_file(message, lambda stored: os.unlink(stored.path) or True):
                        removed += 1
                elif self._on_current_file(message, lambda stored: maildir.set_flags(
                        stored, stored.flags + "S")):
                    seen += 1
            except OSError as exc:
                log.error("%s cannot update %s: %s", self.sid, message.stored.name, exc)
                failures += 1
        try:
            for sub in ("new", "cur") if removed or seen else ():
                fsync_dir(os.path.join(self.maildrop.folder, sub))
        except OSError as exc:
            log.error("%s cannot sync %s: %s", self.sid, self.maildrop.folder, exc)
            failures += 1
        log.info("%s pop3 update %s: %d deleted, %d seen", self.sid, self.maildrop.mailbox,
                 removed, seen)
        return failures

    def _send_message(self, message: POP3Message, limit: Optional[int] = None) -> None:
        """Send a message, or its first limit bytes, as a multi-line reply."""
        try:
            file = self._on_current_file(message, lambda stored: open(stored.path, "rb"))
        except OSError as exc:
            log.error("%s cannot read %s: %s", self.sid, message.stored.name, exc)
            raise Reply("-ERR", "SYS/TEMP", "Cannot read the message") from None
        if file is None:
            raise Reply("-ERR", "", "Message was removed by another client")
        with file:
            if limit is not None:
                limit = _top_length(file, limit)
                file.seek(0)
                self.send(b"+OK\r\n")
            else:
                self.send(b"+OK %d octets\r\n" % message.octets)
            for block in _wire_blocks(file, limit):
                self.send_text(block)
        self.send_text(b".\r\n")

    # Verbs of the AUTHORIZATION state.
    def pop_CAPA(self, arg: bytes) -> None:
        """CAPA: list the capabilities (RFC 2449)."""
        capabilities = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.may_login():
            capabilities += ["USER", "SASL PLAIN"]
        if self.app.tls_context is not None and not self.tls:
            capabilities.append("STLS")
        capabilities.append("IMPLEMENTATION minimail")
        self.ok("Capability list follows", capabilities)

    def pop_STLS(self, arg: bytes) -> None:
        """STLS: switch to TLS (RFC 2595)."""
        if self.app.tls_context is None:
            raise Reply("-ERR", "", "STLS not available")
        if self.tls or self.maildrop is not None:
            raise Reply("-ERR", "", "STLS not allowed now")
        if arg:
            raise Reply("-ERR", "", "Syntax: STLS")
        self.ok("Begin TLS negotiation")
        try:
            self.start_tls(self.app.tls_context)
        except (OSError, ValueError) as exc:
            log.info("%s TLS handshake failed: %s", self.sid, exc.__class__.__name__)
            self.closing = True
            return
        self.user = None            # RFC 2595 4: nothing learned before TLS is kept

    def pop_USER(self, arg: bytes) -> None:
        """USER name: name the mailbox (a full address) to log in to."""
        self.require_authorization()
        if not arg:
            raise Reply("-ERR", "", "Syntax: USER address")
        self.user = arg
        self.ok("Send PASS")

    def pop_PASS(self, arg: bytes) -> None:
        """PASS password: log in as the USER given before."""
        self.require_authorization()
        if self.user is None:
            raise Reply("-ERR", "", "Send USER first")
        username, self.user = self.user, None
        self.login(username, arg)

    def pop_AUTH(self, arg: bytes) -> None:
        """AUTH PLAIN [initial-response]: log in with SASL (RFC 5034)."""
        self.require_authorization()
        if not arg:
            self.ok("Mechanisms follow", ["PLAIN"])
            return
        self.user = None
        self.login(*self.sasl_login(arg))

    def pop_QUIT(self, arg: bytes) -> None:
        """QUIT: apply DELE and RETR (in the TRANSACTION state) and end the session."""
        self.closing = True
        if self.maildrop is None:
            self.ok("Bye")
            return
        failures = self._update()
        self._unlock()
        if failures:
            raise Reply("-ERR", "SYS/TEMP", "Some messages could not be updated")
        self.ok("Bye")

    # Verbs of the TRANSACTION state.
    def pop_STAT(self, arg: bytes) -> None:
        """STAT: count and total octets of the messages not deleted."""
        live = self.live_messages()
        self.ok("%d %d" % (len(live), sum(message.octets for _, message in live)))

    def pop_LIST(self, arg: bytes) -> None:
        """LIST [n]: the octet count of one message, or of each message."""
        if arg:
            number, message = self.message(arg)
            self.ok("%d %d" % (number, message.octets))
            return
        live = self.live_messages()
        self.ok("%d messages" % len(live),
                ["%d %d" % (number, message.octets) for number, message in live])

    def pop_UIDL(self, arg: bytes) -> None:
        """UIDL [n]: the unique-id of one message, or of each message."""
        if arg:
            number, message = self.message(arg)
            self.ok("%d %s" % (number, uidl_of(message.stored.id)))
            return
        self.ok("Unique-ids follow", ["%d %s" % (number, uidl_of(message.stored.id))
                                      for number, message in self.live_messages()])

    def pop_RETR(self, arg: bytes) -> None:
        """RETR n: send a message."""
        _, message = self.message(arg)
        self._send_message(message)
        message.retrieved = True

    def pop_TOP(self, arg: bytes) -> None:
        """TOP n lines: send a message's headers and its first lines of body."""
        words = arg.split()
        if len(words) != 2 or not words[1].isdigit():
            raise Reply("-ERR", "", "Syntax: TOP message lines")
        _, message = self.message(words[0])
        self._send_message(message, int(words[1]))

    def pop_DELE(self, arg: bytes) -> None:
        """DELE n: mark a message to be removed at QUIT."""
        number, message = self.message(arg)
        message.deleted = True
        self.ok("Message %d deleted" % number)

    def pop_RSET(self, arg: bytes) -> None:
        """RSET: unmark the messages marked deleted."""
        for message in self.require_maildrop().messages:
            message.deleted = False
        self.ok("%d messages" % len(self.maildrop.messages))

    def pop_NOOP(self, arg: bytes) -> None:
        """NOOP: do nothing."""
        self.require_maildrop()
        self.ok()


# --- HTTP server ----------------------------------------------------------------------

HTTP_SNIPPET_CHARS = 250            # Mailpit's summary snippet length
HTTP_SEARCH_TEXT_CHARS = 16384      # body text kept per message for plain-word search
HTTP_PARSE_LIMIT = 64 * 1024 * 1024     # bytes of one message file the web page reads
HTTP_HEADERS_LIMIT = 1024 * 1024    # bytes read for a message's header block alone
HTTP_EVENT_LOG = 1000               # recent new/delete events kept for event streams
HTTP_SCAN_BATCH_S = 0.1             # waiters woken by a delivery scan at most this often,
HTTP_SCAN_SHARE = 0.25              # and spend at most about this share of the time scanning,
HTTP_SCAN_BATCH_MAX_S = 1.0         # but never wait longer than this to pass a delivery on
ID_TIME_RE = re.compile(r"(\d{9,11})\.(?:M(\d{1,6}))?")    # Maildir names start with the time
SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s?(k|kb|m|mb)?")
CID_RE = re.compile(r"""\bcid:([^"'\s<>()]+)""", re.I)
HTML_TOKEN_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)?[^<>]*>?|[^<]+")
HTML_BREAK_TAGS = frozenset(("br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6",
                             "table", "blockquote", "pre", "hr"))
HTTP_UNSAFE_INLINE = frozenset(("text/html", "text/xml", "application/xhtml+xml", "image/svg+xml",
                                "application/xml", "text/xsl"))     # never shown inline (Mailpit)
HTTP_API_CSP = "default-src 'none'; sandbox; frame-ancestors 'none'"


@dataclass
class MailEntry:
    """One message ID with its copies (one per mailbox), as the web page lists it."""
    id: str
    created: float              # time received: from the ID, else the file's mtime
    copies: tuple               # StoredMessage, one per mailbox holding the message

    @property
    def read(self) -> bool:
        """Read when every copy has the Maildir S flag."""
        return all("S" in copy.flags for copy in self.copies)

    @property
    def mailboxes(self) -> list:
        return [copy.mailbox for copy in self.copies]

    def sort_key(self) -> tuple:
        return (self.created, self.id)


def scoped(entry: MailEntry, scope) -> Optional[MailEntry]:
    """The entry limited to the mailboxes in scope (None: every mailbox); None if none."""
    if scope is None or entry is None:
        return entry
    copies = tuple(copy for copy in entry.copies if copy.mailbox in scope)
    if len(copies) == len(entry.copies):
        return entry
    return MailEntry(entry.id, entry.created, copies) if copies else None


class MessageIndex:
    """Every message ID of the maildirs, newest first, for the web page and the API.

    The maildirs stay the only source of truth; this is a cache rebuilt from them. A scan
    stats each mailbox's new/ and cur/ and lists a folder again only when its mtime changed
    (or changed so recently that a later change could share the timestamp), so a request
    over 10,000 messages costs a few system calls. A message is parsed once, when its
    summary is first needed. Deliveries in this process wake waiters at once through
    notify_new(); mail written by other processes is seen by the next scan, which waiters
    run every scan_interval_s.
    """

    def __init__(self, maildir: Maildir, scan_interval_s: float):
        self.maildir = maildir
        self.scan_interval_s = scan_interval_s
        self.lock = threading.Lock()            # one scan at a time; guards the fields below
        self.folders = {}           # mailbox -> (Maildir.folder_signature, [StoredMessage])
        self.entries = []           # MailEntry, newest first
        self.by_id = {}
        self.summaries = {}         # message ID -> parsed summary fields (parsed once)
        self.created = {}           # message ID -> mtime, for names without a time
        self.broken = {}            # mailbox -> the error last logged for it
        self.events = []            # (seq, "new" or "delete", ID, frozenset of mailboxes)
        self.seq = 0
        self.scanned = False
        self.scanned_at = 0.0       # time.monotonic() when the last scan ended
        self.scan_cost_s = 0.0      # how long it took
        self.scanned_notice = -1    # the notice count when the last scan began
        self.changed = threading.Condition()    # new mail, deletions, close
        self.notices = 0
        self.closed = False
        self.started = time.monotonic()
        self.stats = {"MessagesDeleted": 0, "SMTPAccepted": 0, "SMTPAcceptedSize": 0}

    def scan(self, seen: Optional[int] = None) -> tuple:
        """Bring the index up to date with the disk; return (entries newest first, by_id).

        A waiter woken by notice `seen` passes it: a scan that began after that notice
        already shows the change, so the other waiters woken with it reuse that scan.
        """
        with self.lock:
            if seen is not None and self.scanned_notice >= seen:
                return self.entries, self.by_id
            began = self.notices        # every change noticed so far is on disk now
            started = time.monotonic()
            mailboxes = self.maildir.mailboxes()
            changed = not self.scanned
            for mailbox in set(self.folders) - set(mailboxes):
                del self.folders[mailbox]
                changed = True
            for mailbox in set(self.broken) - set(mailboxes):
                del self.broken[mailbox]
            for mailbox in mailboxes:
                cached = self.folders.get(mailbox)
                try:
                    stamps = self.maildir.folder_signature(mailbox)
                    if cached is not None and stamps is not None and cached[0] == stamps:
                        continue
                    messages = self.maildir.messages(mailbox)
                except OSError as exc:      # cur/ a file, EACCES: skip it, list the others
                    self._unreadable(mailbox, exc)
                    continue
                if self.broken.pop(mailbox, None) is not None:
                    log.info("http mailbox %s readable again", mailbox)
                if cached is not None:      # keep the known objects: their IDs are parsed
                    known = {(m.folder, m.name): m for m in cached[1]}
                    messages = [known.get((m.folder, m.name), m) for m in messages]
                if cached is None or len(messages) != len(cached[1]) \
                        or any(a is not b for a, b in zip(messages, cached[1])):
                    changed = True
                self.folders[mailbox] = (stamps, messages)
            if changed and self._rebuild() and self.poke() == began + 1:
                began += 1              # no other notice came meanwhile, only our own
            self.scanned_notice, self.scanned_at = began, time.monotonic()
            self.scan_cost_s = self.scanned_at - started
            return self.entries, self.by_id

    def _unreadable(self, mailbox: str, exc: OSError) -> None:
        """Log a mailbox that cannot be listed, once per distinct error; its last listing stays."""
        problem = "%s: %s" % (exc.__class__.__name__, exc.strerror or exc)
        if self.broken.get(mailbox) != problem:
            self.broken[mailbox] = problem
            log.warning("http cannot list mailbox %s: %s", mailbox, problem)

    def _rebuild(self) -> bool:
        """Group the listed files by ID, sort newest first and log what came and went;
        True when an event was logged (the caller wakes the waiters)."""
        copies = {}
        for mailbox in sorted(self.folders):
            for message in self.folders[mailbox][1]:
                copies.setdefault(message.id, []).append(message)
        entries = []
        for message_id, found in copies.items():
            entry = self.by_id.get(message_id)      # unchanged entries are reused, not rebuilt
            if entry is None or len(entry.copies) != len(found) \
                    or any(a is not b for a, b in zip(entry.copies, found)):
                entry = MailEntry(message_id, self._created(message_id, found[0]), tuple(found))
            entries.append(entry)
        entries.sort(key=MailEntry.sort_key, reverse=True)
        by_id = {entry.id: entry for entry in entries}
        logged = self.seq
        if self.scanned:
            for entry in reversed(entries):
                if entry.id not in self.by_id:
                    self._log_event("new", entry.id, entry.mailboxes)
            for message_id, entry in self.by_id.items():
                if message_id not in by_id:
                    self._log_event("delete", message_id, entry.mailboxes)
        for cache in (self.summaries, self.created):
            # list() copies the keys at once: request threads add parsed summaries meanwhile.
            for message_id in [key for key in list(cache) if key not in by_id]:
                cache.pop(message_id, None)
        self.entries, self.by_id, self.scanned = entries, by_id, True
        return self.seq != logged

    def _created(self, message_id: str, message: StoredMessage) -> float:
        match = ID_TIME_RE.match(message_id)
        if match:
            return int(match.group(1)) + int(match.group(2) or 0) / 1e6
        if message_id not in self.created:
            try:
                self.created[message_id] = os.stat(message.path).st_mtime
            except OSError:
                self.created[message_id] = time.time()
        return self.created[message_id]

    def _log_event(self, kind: str, message_id: str, mailboxes: list) -> None:
        self.seq += 1
        self.events.append((self.seq, kind, message_id, frozenset(mailboxes)))
        del self.events[:-HTTP_EVENT_LOG]

    def events_after(self, seq: int) -> list:
        with self.lock:
            return [event for event in self.events if event[0] > seq]

    # Waking waiters: a counter of notices under a condition, so no wake-up is lost.
    def poke(self) -> int:
        with self.changed:
            self.notices += 1
            self.changed.notify_all()
            return self.notices

    def notify_new(self, size: int) -> None:
        """Count a delivery of this process and wake the waiters."""
        with self.changed:
            self.stats["SMTPAccepted"] += 1
            self.stats["SMTPAcceptedSize"] += size
        self.poke()

    def wait_for_change(self, seen: int, timeout_s: float) -> int:
        """Wait until a notice newer than seen, close, or the timeout; return the latest notice."""
        with self.changed:
            if self.notices == seen and not self.closed:
                self.changed.wait(max(0.0, timeout_s))
            return self.notices

    def settle(self) -> int:
        """Pause a woken waiter a little after the last scan; return the latest notice.

        A burst of deliveries then costs one scan per interval, not one per delivery per
        waiter (a scan re-lists every folder changed in the last seconds, and over a big
        maildir takes a while: the interval grows with it, so SMTP keeps the CPU).
        """
        interval_s = self.scan_cost_s * (1 - HTTP_SCAN_SHARE) / HTTP_SCAN_SHARE
        interval_s = min(max(HTTP_SCAN_BATCH_S, interval_s), HTTP_SCAN_BATCH_MAX_S)
        pause = self.scanned_at + interval_s - time.monotonic()
        if pause > 0 and not self.closed:
            time.sleep(pause)
        return self.notices

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def warm(self) -> None:
        """Parse every summary once, newest first, so the first search needs no parsing."""
        try:
            for entry in self.scan()[0]:
                if self.closed:
                    return
                self.parsed(entry)
        except OSError as exc:
            log.warning("http index warm-up stopped: %s", exc)
        except Exception as exc:        # a bug: one log line, never a thread traceback
            log.error("http index warm-up failed: %s", exc.__class__.__name__)
            log.debug("traceback", exc_info=True)

    # Reading and changing messages.
    def read(self, entry: MailEntry, limit: int = HTTP_PARSE_LIMIT) -> Optional[tuple]:
        """(StoredMessage, its first limit bytes) of the first copy still on disk, or None."""
        def read_file(current):
            with open(current.path, "rb") as file:
                return current, file.read(limit)
        for copy in entry.copies:
            found = self.maildir.follow(copy, read_file)
            if found is not None:
                return found
        return None

    def parsed(self, entry: MailEntry) -> Optional[dict]:
        """The summary fields of a message, parsed once; None if its files are gone."""
        fields = self.summaries.get(entry.id)
        if fields is None:
            loaded = self.read(entry)
            if loaded is None:
                return None
            fields = summary_fields(parse_message_safely(entry.id, loaded[1], checksums=False))
            self.summaries[entry.id] = fields
        return fields

    def summary(self, entry: MailEntry) -> Optional[dict]:
        """Mailpit's MessageSummary of an entry, plus its Mailboxes; None if it is gone."""
        fields = self.parsed(entry)
        if fields is None:
            return None
        summary = {"ID": entry.id, "MessageID": fields["MessageID"], "Read": entry.read}
        summary.update((key, fields[key]) for key in ("From", "To", "Cc", "Bcc", "ReplyTo", "Subject"))
        summary["Bcc"] = fields["Bcc"] + envelope_only(fields, entry.mailboxes)
        summary.update(Created=rfc3339(entry.created), Username="", Tags=[], Size=fields["Size"],
                       Attachments=fields["Attachments"], Snippet=fields["Snippet"],
                       Mailboxes=entry.mailboxes)
        return summary

    def set_read(self, entries: list, read: bool) -> None:
        """Add or remove the S flag on every copy of the entries."""
        def change(current):
            flags = current.flags.replace("S", "") + ("S" if read else "")
            if sorted(flags) != sorted(current.flags) or current.folder != "cur":
                self.maildir.set_flags(current, flags)
            return True
        for entry in entries:
            for copy in entry.copies:
                self.maildir.follow(copy, change)

    def delete(self, entries: list) -> int:
        """Remove every copy of the entries from disk; return how many messages went."""
        count = 0
        for entry in entries:
            removed = [self.maildir.remove(copy) for copy in entry.copies]
            count += any(removed)
        with self.changed:
            self.stats["MessagesDeleted"] += count
        self.poke()
        return count


def rfc3339(when) -> str:
    """An RFC 3339 time with milliseconds and a numeric offset (+00:00 for a timestamp)."""
    if not isinstance(when, datetime.datetime):
        when = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    return when.isoformat(timespec="milliseconds")


def envelope_only(fields: dict, mailboxes: list) -> list:
    """Mailboxes that got a copy without being in To, Cc or Bcc: blind copies, as Mailpit shows them."""
    named = {address["Address"].lower() for key in ("To", "Cc", "Bcc") for address in fields[key]}
    return [{"Name": "", "Address": mailbox} for mailbox in mailboxes if mailbox not in named]


# Message parsing. The email package is imported only here, by the web page's requests.

def _clean_text(text: str) -> str:
    """Turn undecodable bytes kept as surrogates back into text (UTF-8, else replaced)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _unfold(value: str) -> str:
    """A header value on one line (RFC 5322 2.2.3), as Go's textproto returns it."""
    return re.sub(r"\r?\n[ \t]*", " ", value).strip()


def decode_bytes(data: bytes, charset: Optional[str]) -> str:
    """Decode text in its declared charset; unknown or wrong charsets fall back to UTF-8, then Latin-1."""
    for candidate in (charset, "utf-8"):
        if candidate:
            try:
                return data.decode(candidate)
            except (LookupError, UnicodeDecodeError):
                pass
    return data.decode("latin-1")


def decode_header_text(value: str) -> str:
    """A header value as text: unfolded, RFC 2047 encoded words decoded, never an exception."""
    import email.errors
    import email.header
    value = _unfold(value)
    try:
        chunks = email.header.decode_header(value)
    except (email.errors.HeaderParseError, ValueError, LookupError):
        return _clean_text(value)
    text = []
    for data, charset in chunks:
        if isinstance(data, str):
            text.append(_clean_text(data))
        elif charset is None:
            text.append(_clean_text(data.decode("raw-unicode-escape")))
        else:
            text.append(decode_bytes(data, charset))
    return "".join(text)


def parse_addresses(values: list) -> list:
    """Mailpit's [{"Name", "Address"}] list of address headers (empty entries dropped)."""
    import email.utils
    found = []
    for name, address in email.utils.getaddresses([_unfold(value) for value in values]):
        if name or address:
            found.append({"Name": decode_header_text(name), "Address": _clean_text(address)})
    return found


def parse_date(value: Optional[str]) -> Optional[datetime.datetime]:
    """The Date header as an aware datetime (no zone means UTC), or None when unparsable."""
    import email.utils
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(_unfold(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.timezone.utc)


def html_to_text(markup: str) -> str:
    """Plain text of an HTML part (for Text and Snippet when a message has no text part).

    One linear pass over the tags, so hostile markup costs no more than its length.
    """
    import html
    out = []
    skipping = None
    for match in HTML_TOKEN_RE.finditer(markup[:HTTP_PARSE_LIMIT // 8]):
        token = match.group(0)
        if not token.startswith("<"):
            if skipping is None:
                out.append(token)
            continue
        tag = (match.group(2) or "").lower()
        if skipping is not None:
            if match.group(1) and tag == skipping:
                skipping = None
            continue
        if tag in ("script", "style", "head", "title") and not match.group(1):
            skipping = tag
        elif tag in HTML_BREAK_TAGS:
            out.append("\n")
    text = html.unescape("".join(out))
    lines = (" ".join(line.split()) for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


@lru_cache(maxsize=None)
def _raw_policy():
    """A compat32 policy that returns header values exactly as stored (decoded by minimail)."""
    import email.policy

    class RawHeaders(email.policy.Compat32):
        def header_fetch_parse(self, name, value):
            return value
    return RawHeaders()


def _leaf_parts(part, path: tuple = (), related: bool = False):
    """Yield (PartID, part, inside multipart/related) for every leaf, PartIDs like 1.2."""
    if part.get_content_maintype() == "multipart" and part.is_multipart():
        inner = part.get_content_subtype() == "related"
        for number, child in enumerate(part.get_payload(), 1):
            yield from _leaf_parts(child, path + (number,), inner)
    else:
        yield ".".join(map(str, path)) or "1", part, related


def _part_content(part) -> bytes:
    """The decoded content of a leaf part; an attached message is returned whole."""
    if part.is_multipart():             # message/rfc822 and friends
        try:
            return b"".join(bytes(inner) for inner in part.get_payload())
        except (TypeError, ValueError, LookupError, UnicodeError):
            return b""
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def parse_message(data: bytes, checksums: bool = True) -> dict:
    """Parse a stored message into Mailpit's Message fields, plus its leaf parts by PartID.

    Malformed MIME never raises: the email package records defects and carries on, and
    every decoding step falls back to replacement characters. Without checksums (list
    summaries), attachments are only counted and sized.
    """
    import email
    message = email.message_from_bytes(data, policy=_raw_policy())
    header = message.get
    fields = {
        "MessageID": _unfold(header("Message-ID", "")).strip("<>"),
        "Subject": decode_header_text(header("Subject", "")),
        "ReturnPath": _unfold(header("Return-Path", "")).strip("<>"),
        "Size": len(data),
    }
    addresses = {key: parse_addresses(message.get_all(name, []))
                 for key, name in (("From", "From"), ("To", "To"), ("Cc", "Cc"), ("Bcc", "Bcc"),
                                   ("ReplyTo", "Reply-To"))}
    fields.update(addresses, From=(addresses["From"] or [None])[0], Date=parse_date(header("Date")))
    unsubscribe = _clean_text(_unfold(header("List-Unsubscribe", "")))
    fields["ListUnsubscribe"] = {
        "Header": unsubscribe, "Links": re.findall(r"<([^<>]+)>", unsubscribe), "Errors": "",
        "HeaderPost": _clean_text(_unfold(header("List-Unsubscribe-Post", "")))}
    text = html = None
    attachments, inline, parts = [], [], {}
    for part_id, part, related in _leaf_parts(message):
        content_type = part.get_content_type()
        if content_type.startswith("multipart/"):       # no boundary: shown as text
            content_type = "text/plain"
        elif not MIME_TYPE_RE.fullmatch(content_type):  # folded or odd: never into an HTTP header
            content_type = "application/octet-stream"
        disposition = part.get_content_disposition()
        filename = decode_header_text(part.get_filename() or "")
        content = _part_content(part)
        parts[part_id] = (content_type, filename, content)
        if disposition != "attachment" and not filename and content_type in ("text/plain", "text/html"):
            body = decode_bytes(content, part.get_content_charset())
            if content_type == "text/plain" and text is None:
                text = body
                continue
            if content_type == "text/html" and html is None:
                html = body
                continue
        content_id = _unfold(part.get("Content-ID", "")).strip("<>")
        described = {"PartID": part_id, "FileName": filename, "ContentType": content_type,
                     "ContentID": _clean_text(content_id), "Size": len(content)}
        if checksums:
            import hashlib      # loads OpenSSL: only a message being viewed pays
            described["Checksums"] = {"MD5": hashlib.md5(content).hexdigest(),
                                      "SHA1": hashlib.sha1(content).hexdigest(),
                                      "SHA256": hashlib.sha256(content).hexdigest()}
        if disposition != "attachment" and (disposition == "inline" or (related and content_id)):
            inline.append(described)
        else:
            attachments.append(described)
    fields.update(Text=text if text is not None else html_to_text(html or ""), HTML=html or "",
                  Inline=inline, Attachments=attachments, Headers=message.items(), Parts=parts)
    return fields


def parse_message_safely(message_id: str, data: bytes, checksums: bool = True) -> dict:
    """parse_message, or a placeholder of the right size for a message the email package
    cannot take (deep nesting, odd charsets): logged, never a 500."""
    try:
        return parse_message(data, checksums)
    except (LookupError, ValueError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        log.error("http cannot parse message %s: %s", message_id, exc.__class__.__name__)
        log.debug("traceback", exc_info=True)
        fields = parse_message(b"Subject: (unparsable message)\n\n")
        fields["Size"] = len(data)
        return fields


def summary_fields(fields: dict) -> dict:
    """The part of a parsed message the list and search need, kept in the index."""
    kept = {key: fields[key] for key in ("MessageID", "From", "To", "Cc", "Bcc", "ReplyTo",
                                         "Subject", "Size")}
    kept["Attachments"] = len(fields["Attachments"])
    kept["Inline"] = len(fields["Inline"])
    kept["Snippet"] = " ".join(fields["Text"][:HTTP_SNIPPET_CHARS * 4].split())[:HTTP_SNIPPET_CHARS]

    def names(*keys):
        found = [fields[key] for key in keys if key == "From"] + [
            address for key in keys if key != "From" for address in fields[key]]
        return " ".join("%s %s" % (item["Name"], item["Address"]) for item in found if item).lower()
    kept["search"] = {
        "from": names("From"), "to": names("To"), "cc": names("Cc"), "bcc": names("Bcc"),
        "reply-to": names("ReplyTo"), "subject": fields["Subject"].lower(),
        "message-id": fields["MessageID"].lower(),
        "text": " ".join([names("From", "To", "Cc", "Bcc", "ReplyTo"), fields["Subject"],
                          fields["MessageID"], fields["Text"][:HTTP_SEARCH_TEXT_CHARS]]
                         + [item["FileName"] for item in fields["Attachments"]]).lower(),
    }
    return kept


# Search, with Mailpit's syntax: words and "quoted phrases" (all must match), prefixes
# from: to: cc: bcc: reply-to: addressed: subject: message-id: mailbox:, is:read, is:unread,
# has:attachment, has:inline, larger:SIZE, smaller:SIZE; a leading - or ! negates a term.
# Inside double quotes, \" and \\ stand for " and \ (a mailbox name may hold a quote).
SEARCH_PREFIXES = ("from:", "to:", "cc:", "bcc:", "reply-to:", "addressed:", "subject:",
                   "message-id:", "mailbox:", "larger:", "smaller:")
SEARCH_MAX_TERMS = 64               # distinct terms in one query: each costs a pass over the mail


def _search_tokens(query: str) -> list:
    """Split a query on spaces outside double quotes, dropping the quotes (Mailpit's ArgsParser)."""
    tokens, current, quoted = [], [], False
    chars = iter(query)
    for char in chars:
        if char == "\\" and quoted:
            following = next(chars, "")
            current.append(following if following in ('"', "\\") else char + following)
        elif char == '"':
            quoted = not quoted
        elif char.isspace() and not quoted:
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        tokens.append("".join(current))
    return tokens


def parse_search(query: str) -> list:
    """Compile a search into a list of distinct (negated, kind, value) terms; ValueError
    for more than SEARCH_MAX_TERMS."""
    terms = []
    for token in _search_tokens(query):
        negated = len(token) > 1 and token[0] in "-!"
        if negated:
            token = token[1:]
        lowered = token.lower()
        prefix = next((p for p in SEARCH_PREFIXES if lowered.startswith(p)), None)
        if prefix in ("larger:", "smaller:"):
            match = SIZE_RE.fullmatch(lowered[len(prefix):].strip())
            if match:
                unit = {"k": 1024, "kb": 1024, "m": 1 << 20, "mb": 1 << 20}.get(match.group(2), 1)
                terms.append((negated, prefix, float(match.group(1)) * unit))
                continue
            prefix = None
        if prefix == "mailbox:":        # exact, never dropped: an empty name matches nothing
            terms.append((negated, prefix, lowered[len(prefix):]))
        elif prefix is not None:
            if lowered[len(prefix):].strip():
                terms.append((negated, prefix, lowered[len(prefix):].strip()))
        elif lowered in ("is:read", "is:unread", "has:attachment", "has:attachments",
                         "has:inline", "has:inlines"):
            terms.append((negated, lowered.rstrip("s") if lowered.startswith("has:") else lowered, None))
        elif lowered.strip():
            terms.append((negated, "text", lowered))
    terms = list(dict.fromkeys(terms))
    if len(terms) > SEARCH_MAX_TERMS:
        raise ValueError("more than %d search terms" % SEARCH_MAX_TERMS)
    return terms


def search_matches(terms: list, entry: MailEntry, index: MessageIndex) -> bool:
    """True when the entry meets every term; messages are parsed only when a term needs it."""
    for negated, kind, value in terms:
        if kind in ("is:read", "is:unread"):
            hit = entry.read == (kind == "is:read")
        elif kind == "mailbox:":
            hit = value in entry.mailboxes          # a mailbox's name, exactly
        else:
            fields = index.parsed(entry)
            if fields is None:
                return False
            search = fields["search"]
            if kind == "has:attachment":
                hit = fields["Attachments"] > 0
            elif kind == "has:inline":
                hit = fields["Inline"] > 0
            elif kind == "larger:":
                hit = fields["Size"] > value
            elif kind == "smaller:":
                hit = fields["Size"] < value
            elif kind == "to:":         # envelope recipients count too: mail often lacks To:
                hit = value in search["to"] or any(value in m for m in entry.mailboxes)
            elif kind == "addressed:":
                hit = any(value in search[key] for key in ("from", "to", "cc", "bcc", "reply-to")) \
                    or any(value in mailbox for mailbox in entry.mailboxes)
            else:
                hit = value in search[kind.rstrip(":")]
        if hit == negated:
            return False
    return True


def _http_error(status: int, text: str, **headers) -> Reply:
    reply = Reply(status, "", text)
    reply.headers = [(name.replace("_", "-"), value) for name, value in headers.items()]
    return reply


def _canonical_header(name: str) -> str:
    """Go's CanonicalMIMEHeaderKey, which Mailpit's headers endpoint uses (Message-Id)."""
    return "-".join(word[:1].upper() + word[1:].lower() for word in name.split("-"))


class WebRequests:
    """The web page and the Mailpit-compatible API, on http.server (SPEC 8).

    Mixed into WebHandler (http.server.BaseHTTPRequestHandler) by web_handler_class(), so
    a run without --http never imports http.server. Routes map a path pattern and a
    method to a web_* method; errors are raised as Reply(status, "", text).
    """

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"    # errors always carry a status line (no HTTP/0.9)
    server_version = "minimail/" + __version__
    max_body_bytes = 1 << 20            # PUT and DELETE bodies
    sse_keepalive_s = 15.0              # a comment line keeps idle event streams open
    wait_default_s = 30.0               # SPEC 8: /api/v1/wait
    wait_max_s = 300.0
    too_many_connections = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                            b"Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
                            b"Too many connections\n")
    routes = tuple((re.compile(pattern), methods) for pattern, methods in (
        (r"/", {"GET": "web_page"}),
        (r"/view/([^/]+)\.html", {"GET": "web_view_html"}),
        (r"/livez|/readyz", {"GET": "web_health"}),
        (r"/api/v1/messages", {"GET": "web_messages", "PUT": "web_set_read",
                               "DELETE": "web_delete"}),
        (r"/api/v1/message/([^/]+)", {"GET": "web_message"}),
        (r"/api/v1/message/([^/]+)/headers", {"GET": "web_headers"}),
        (r"/api/v1/message/([^/]+)/raw", {"GET": "web_raw"}),
        (r"/api/v1/message/([^/]+)/part/([^/]+)", {"GET": "web_part"}),
        (r"/api/v1/search", {"GET": "web_search", "DELETE": "web_delete_search"}),
        (r"/api/v1/info", {"GET": "web_info"}),
        (r"/api/v1/mailboxes", {"GET": "web_mailboxes"}),
        (r"/api/v1/wait", {"GET": "web_wait"}),
        (r"/api/v1/events", {"GET": "web_events"}),
    ))

    def setup(self):
        self.config = self.server.config
        self.app = self.server.app
        self.index = self.app.mail_index
        self.timeout = self.config.timeout     # each read and write on the connection
        self.sid = self.server.next_session_id()
        self.sock = self.request
        self.needs_auth = not self.config.is_loopback(self.server.server_address[0])
        super().setup()
        with self.server.lock:
            self.server.handlers.add(self)

    def finish(self):
        with self.server.lock:
            self.server.handlers.discard(self)
        try:
            super().finish()
        except OSError:
            pass

    def handle(self):
        log.debug("%s http connect from %s", self.sid, self.client_address[0])
        try:
            super().handle()
        except OSError as exc:
            log.info("%s http connection lost: %s", self.sid, exc.__class__.__name__)

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):      # http.server's name and signature
        log.info("%s http %s", self.sid, format % args)

    def log_request(self, code="-", size="-"):
        if isinstance(code, int):       # HTTPStatus prints as its name before Python 3.11
            code = int(code)
        log.info("%s http %s %s %s", self.sid, getattr(self, "command", None),
                 getattr(self, "path", "")[:200], code)

    def do_GET(self):
        self.serve()

    def do_PUT(self):
        self.serve()

    def do_POST(self):
        self.serve()

    def do_DELETE(self):
        self.serve()

    def serve(self) -> None:
        """Check origin and credentials, route the request, and answer (errors included)."""
        import urllib.parse
        length = self.headers.get("Content-Length", "0").strip() or "0"
        self.body_read = length == "0" and "Transfer-Encoding" not in self.headers
        url = urllib.parse.urlsplit(self.path)
        self.query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        try:
            if self.command in ("PUT", "POST", "DELETE"):
                self.check_origin()
            self.scope = self.authorize() if url.path not in ("/livez", "/readyz") else None
            for pattern, methods in self.routes:
                match = pattern.fullmatch(url.path)
                if match:
                    if self.command not in methods:
                        raise _http_error(405, "Method not allowed\n", Allow=", ".join(methods))
                    args = [urllib.parse.unquote(arg) for arg in match.groups()]
                    getattr(self, methods[self.command])(*args)
                    return
            raise _http_error(404, "404 page not found\n")
        except Reply as reply:
            self.send(reply.code, reply.text, headers=getattr(reply, "headers", ()))
        except (ConnectionError, socket.timeout, TimeoutError):
            raise                       # the client is gone: handle() logs one line
        except Exception as exc:        # a bug or a disk error costs one reply, not the connection
            log.error("%s http %s failed: %s", self.sid, self.command, exc.__class__.__name__)
            log.debug("traceback", exc_info=True)
            self.send(500, "Internal error\n")

    def check_origin(self) -> None:
        """Refuse state changes from other sites (SPEC 8: no CSRF)."""
        expected = "http://%s" % self.headers.get("Host", "").lower()
        if self.headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site":
            raise _http_error(403, "Cross-site request refused\n")
        origin = self.headers.get("Origin")
        referer = self.headers.get("Referer")
        if origin is not None:
            if origin.strip().lower() != expected:
                raise _http_error(403, "Cross-origin request refused\n")
        elif referer is not None:
            referer = referer.strip().lower()
            if referer != expected and not referer.startswith(expected + "/"):
                raise _http_error(403, "Cross-origin request refused\n")

    def check_host(self) -> None:
        """Without logins, answer only requests addressed to an IP address, localhost or our
        hostname: a page whose name rebinds to 127.0.0.1 cannot read or delete the mail."""
        host = self.headers.get("Host", "").strip().lower()
        name = host.rpartition(":")[0] if re.search(r":\d+$", host) else host
        name = name.strip("[]")
        if not name or name in ("localhost", self.config.hostname.lower()) \
                or name.endswith(".localhost"):
            return
        try:
            ipaddress.ip_address(name)
        except ValueError:
            raise _http_error(403, "Host not allowed\n") from None

    def authorize(self):
        """The mailboxes this request may see (None: all); HTTP Basic off loopback (RFC 7617)."""
        if not self.needs_auth:
            self.check_host()
            return None
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            username, sep, password = decoded.partition(b":")
            account = self.app.check_login(username, password, False) if sep else False
            if account:
                return frozenset((account,))
            log.info("%s http auth failed for %r", self.sid, username[:64])
            time.sleep(self.config.auth_failure_delay)
        raise _http_error(401, "Authentication required\n",
                          WWW_Authenticate='Basic realm="minimail", charset="UTF-8"')

    # Output.
    def send(self, status: int, body, content_type: str = "text/plain; charset=utf-8",
             headers=(), csp: str = HTTP_API_CSP) -> None:
        """Send a whole response; an unread request body closes the connection afterwards."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_security_headers(csp)
        for name, value in headers:
            self.send_header(name, value)
        if not self.body_read:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def send_security_headers(self, csp: str) -> None:
        self.send_header("Content-Security-Policy", csp)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")

    def send_json(self, data) -> None:
        body = json.dumps(data, ensure_ascii=False).encode("utf-8", "replace")
        self.send(200, body, "application/json")

    def ok(self) -> None:
        self.send(200, "ok")

    # Input.
    def read_body(self) -> bytes:
        """The request body, bounded; chunked uploads are refused (411)."""
        if "Transfer-Encoding" in self.headers:
            raise _http_error(411, "Content-Length required\n")
        length = self.headers.get("Content-Length", "0").strip() or "0"
        if not (length.isascii() and length.isdigit()):     # isdigit() alone takes '²'
            raise _http_error(400, "Bad Content-Length\n")
        if int(length) > self.max_body_bytes:
            raise _http_error(413, "Request body too large\n")
        data = self.rfile.read(int(length))
        if len(data) < int(length):
            raise ConnectionResetError("request body cut short")
        self.body_read = True
        return data

    def read_ids_body(self) -> dict:
        """Parse a JSON object or a form body into IDs, Read and Search (400 if unparsable).

        An empty body gives no IDs, which means every message, as in Mailpit; a body that
        cannot be parsed is an error, never "everything".
        """
        import urllib.parse
        data = self.read_body()
        try:
            text = data.decode("utf-8").strip()
            if not text:
                return {"IDs": [], "Read": False, "Search": ""}
            if text.startswith("{"):
                body = json.loads(text)
                fields = {key.lower(): value for key, value in body.items()}
            else:
                pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True)
                fields = {}
                for key, value in pairs:
                    key = key.lower()
                    if key == "ids":
                        fields.setdefault("ids", []).extend(v for v in value.split(",") if v)
                    elif key == "read":
                        fields["read"] = value.lower() in ("true", "1", "yes", "on")
                    else:
                        fields[key] = value
        except (ValueError, RecursionError):     # UnicodeDecodeError, JSONDecodeError too
            raise _http_error(400, "Cannot parse the request body\n") from None
        # A missing or null IDs means every message; any other non-list is an error.
        ids = fields.get("ids")
        ids = [] if ids is None else ids
        read = fields.get("read", False)
        search = fields.get("search")
        search = "" if search is None else search
        if not isinstance(ids, list) or not all(isinstance(item, str) for item in ids) \
                or not isinstance(read, bool) or not isinstance(search, str):
            raise _http_error(400, "IDs must be a list of strings, Read a boolean, Search a string\n")
        if ids and search:
            raise _http_error(400, "You may specify either IDs or a search query, not both\n")
        return {"IDs": ids, "Read": read, "Search": search}

    # Lookups, limited to the mailboxes this request may see.
    def entries(self, seen: Optional[int] = None) -> list:
        entries = self.index.scan(seen)[0]
        if self.scope is None:
            return entries
        return [entry for entry in (scoped(entry, self.scope) for entry in entries) if entry]

    def entry(self, message_id: str) -> MailEntry:
        """The entry of an ID or of "latest"; 404 when there is none."""
        if message_id == "latest":
            entries = self.entries()
            found = entries[0] if entries else None
        else:
            found = scoped(self.index.scan()[1].get(message_id), self.scope)
        if found is None:
            raise _http_error(404, "404 page not found\n")
        return found

    def load(self, message_id: str) -> tuple:
        """(entry, parsed message) of an ID; 404 when it is gone."""
        entry = self.entry(message_id)
        loaded = self.index.read(entry)
        if loaded is None:
            raise _http_error(404, "404 page not found\n")
        return entry, parse_message_safely(entry.id, loaded[1])

    def search_terms(self, query: str) -> list:
        """parse_search, with too many terms a 400."""
        try:
            return parse_search(query)
        except ValueError as exc:
            raise _http_error(400, "Error: %s\n" % exc) from None

    def matching(self, query: str) -> list:
        terms = self.search_terms(query)
        return [entry for entry in self.entries() if search_matches(terms, entry, self.index)]

    def summaries(self, everything: list, matched: list) -> dict:
        """Mailpit's MessagesSummary envelope for one page of matched entries."""
        start = _int_param(self.query.get("start"), 0)
        limit = _int_param(self.query.get("limit"), 50)
        page = [summary for summary in (self.index.summary(entry) for entry in matched[start:start + limit])
                if summary is not None]
        unread = sum(1 for entry in everything if not entry.read)
        return {"total": len(everything), "unread": unread, "count": len(page),
                "messages_count": len(matched),
                "messages_unread": sum(1 for entry in matched if not entry.read),
                "start": start, "tags": [], "messages": page}

    def search_query(self) -> str:
        query = self.query.get("query", "").strip()
        if not self.search_terms(query):    # blank, or only quotes: never "everything"
            raise _http_error(400, "Error: no search query\n")
        return query

    def matching_copies(self, query: str) -> list:
        """The entries a query matches, limited to the copies in the mailboxes it names
        (mailbox:X), so acting on one mailbox's list never touches another mailbox."""
        named = {value for negated, kind, value in self.search_terms(query)
                 if kind == "mailbox:" and not negated}
        return [entry for entry in (scoped(entry, named or None) for entry in self.matching(query))
                if entry is not None]

    # Routes.
    def web_page(self) -> None:
        nonce = base64.b64encode(os.urandom(18)).decode("ascii")
        csp = ("default-src 'none'; script-src 'nonce-%s'; style-src 'nonce-%s'; img-src 'self' data:; "
               "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'" % (nonce, nonce))
        self.send(200, HTTP_PAGE.replace("__NONCE__", nonce), "text/html; charset=utf-8", csp=csp)

    def web_view_html(self, message_id: str) -> None:
        """The HTML part alone, for the page's sandboxed iframe: no scripts, no remote content."""
        import urllib.parse
        entry, fields = self.load(message_id)
        parts = {item["ContentID"]: item["PartID"] for item in fields["Inline"] + fields["Attachments"]
                 if item["ContentID"]}

        def local(match):
            part_id = parts.get(urllib.parse.unquote(match.group(1)))
            if part_id is None:
                return match.group(0)
            return "/api/v1/message/%s/part/%s" % (urllib.parse.quote(entry.id), urllib.parse.quote(part_id))
        markup = '<base target="_blank">' + CID_RE.sub(local, fields["HTML"])
        remote = " https: http:" if self.query.get("remote") == "1" else ""
        # The sandbox makes this document's origin opaque, so 'self' would not match the
        # page that frames it: name the page's origin instead.
        host = self.headers.get("Host", "")
        ancestor = "http://" + host if re.fullmatch(r"[A-Za-z0-9.\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?", host) \
            else "'none'"
        csp = ("sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
               "img-src 'self' data:%s; style-src 'unsafe-inline'%s; font-src data:%s; "
               "frame-ancestors %s; form-action 'none'" % (remote, remote, remote, ancestor))
        self.send(200, markup, "text/html; charset=utf-8", csp=csp)

    def web_health(self) -> None:
        self.ok()

    def web_messages(self) -> None:
        entries = self.entries()
        self.send_json(self.summaries(entries, entries))

    def web_search(self) -> None:
        query = self.search_query()
        self.send_json(self.summaries(self.entries(), self.matching(query)))

    def web_delete_search(self) -> None:
        self.index.delete(self.matching_copies(self.search_query()))
        self.ok()

    def web_set_read(self) -> None:
        body = self.read_ids_body()
        self.index.set_read(self.selected(body), body["Read"])
        self.ok()

    def web_delete(self) -> None:
        self.index.delete(self.selected(self.read_ids_body()))
        self.ok()

    def selected(self, body: dict) -> list:
        """The entries a body names: its Search, else its IDs, else (neither given) all."""
        if body["Search"]:
            return self.matching_copies(body["Search"])
        return self.by_ids(body["IDs"]) if body["IDs"] else self.entries()

    def by_ids(self, ids: list) -> list:
        """The entries of the given IDs; unknown IDs are skipped, as Mailpit does."""
        by_id = self.index.scan()[1]
        return [entry for entry in (scoped(by_id.get(message_id), self.scope) for message_id in ids)
                if entry is not None]

    def web_message(self, message_id: str) -> None:
        """Mailpit's Message, with Read true: reading it over HTTP sets the S flag (SPEC 8)."""
        entry, fields = self.load(message_id)
        self.index.set_read([entry], True)
        message = {"ID": entry.id, "MessageID": fields["MessageID"], "Read": True}
        for key in ("From", "To", "Cc", "Bcc", "ReplyTo", "ReturnPath", "Subject", "ListUnsubscribe"):
            message[key] = fields[key]
        message["Bcc"] = fields["Bcc"] + envelope_only(fields, entry.mailboxes)
        message.update(Date=rfc3339(fields["Date"] or entry.created), Created=rfc3339(entry.created),
                       Tags=[], Username="", Text=fields["Text"], HTML=fields["HTML"],
                       Size=fields["Size"], Inline=fields["Inline"], Attachments=fields["Attachments"],
                       Mailboxes=entry.mailboxes)
        self.send_json(message)

    def web_headers(self, message_id: str) -> None:
        """Every header as {"Name": [values]}, names in Go's canonical form, sorted."""
        import email.parser
        loaded = self.index.read(self.entry(message_id), HTTP_HEADERS_LIMIT)    # no body parsed
        if loaded is None:
            raise _http_error(404, "404 page not found\n")
        parsed = email.parser.BytesHeaderParser(policy=_raw_policy()).parsebytes(loaded[1])
        headers = {}
        for name, value in parsed.items():
            headers.setdefault(_canonical_header(name), []).append(_clean_text(_unfold(value)))
        self.send_json(dict(sorted(headers.items())))

    def web_raw(self, message_id: str) -> None:
        """The stored file as text/plain, streamed; ?dl=1 downloads it as ID.eml."""
        import urllib.parse
        entry = self.entry(message_id)
        opened = None
        for copy in entry.copies:
            opened = self.app.maildir.follow(copy, lambda current: open(current.path, "rb"))
            if opened is not None:
                break
        if opened is None:
            raise _http_error(404, "404 page not found\n")
        with opened:
            size = os.fstat(opened.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(size))
            self.send_security_headers(HTTP_API_CSP)
            if self.query.get("dl") == "1":
                # A file name may hold quotes or control characters: never raw into a header.
                self.send_header("Content-Disposition",
                                 'attachment; filename="%s.eml"' % urllib.parse.quote(entry.id))
            if not self.body_read:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            for block in iter(lambda: opened.read(READ_BLOCK), b""):
                self.wfile.write(block[:size])
                size -= len(block[:size])
                if size <= 0:
                    break

    def web_part(self, message_id: str, part_id: str) -> None:
        """One part's decoded content; types a browser would run are sent as downloads."""
        import urllib.parse
        part = self.load(message_id)[1]["Parts"].get(part_id)
        if part is None:
            raise _http_error(404, "404 page not found\n")
        content_type, filename, content = part
        disposition = "inline"
        if content_type in HTTP_UNSAFE_INLINE:
            content_type, disposition = "application/octet-stream", "attachment"
        name = urllib.parse.quote(filename or part_id)
        self.send(200, content, content_type,
                  headers=[("Content-Disposition", '%s; filename="%s"' % (disposition, name))])

    def web_info(self) -> None:
        """Mailpit's AppInformation (the maildir root stands for the database)."""
        entries = self.entries()
        size = 0
        for entry in entries:
            for copy in entry.copies:
                try:
                    size += os.stat(copy.path).st_size
                except OSError:
                    pass
        with self.index.changed:
            stats = dict(self.index.stats)
        stats.update(Uptime=int(time.monotonic() - self.index.started), Memory=_memory_bytes(),
                     SMTPRejected=0, SMTPIgnored=0)
        self.send_json({"Version": __version__, "LatestVersion": "disabled",
                        "Database": self.app.maildir.root, "DatabaseSize": size,
                        "Messages": len(entries), "Unread": sum(1 for entry in entries if not entry.read),
                        "Tags": {}, "RuntimeStats": stats})

    def web_mailboxes(self) -> None:
        """Beyond Mailpit: each mailbox with its total and unread counts, for the page."""
        entries = self.entries()
        counts = {}
        for entry in entries:
            for copy in entry.copies:
                total, unread = counts.get(copy.mailbox, (0, 0))
                counts[copy.mailbox] = (total + 1, unread + ("S" not in copy.flags))
        self.send_json({"total": len(entries), "unread": sum(1 for entry in entries if not entry.read),
                        "mailboxes": [{"Name": name, "Total": total, "Unread": unread}
                                      for name, (total, unread) in sorted(counts.items())]})

    def web_wait(self) -> None:
        """Beyond Mailpit (SPEC 8): the newest match now, or the first to arrive, or 408."""
        try:
            timeout_s = float(self.query.get("timeout", self.wait_default_s))
        except ValueError:
            raise _http_error(400, "timeout must be a number of seconds\n") from None
        if not 0 <= timeout_s < float("inf"):
            raise _http_error(400, "timeout must be a number of seconds\n")
        deadline = time.monotonic() + min(timeout_s, self.wait_max_s)
        terms = self.search_terms(self.query.get("query", ""))
        after = self.query.get("after")
        after_key = self.entry(after).sort_key() if after else None
        seen = self.index.notices
        fresh = None                # a notice to reuse a scan for, after a wake-up
        while True:
            entries = self.entries(fresh)
            for entry in entries:
                if after_key is not None and entry.sort_key() <= after_key:
                    break
                if search_matches(terms, entry, self.index):
                    summary = self.index.summary(entry)
                    if summary is not None:
                        self.send_json(summary)
                        return
            if entries and (after_key is None or entries[0].sort_key() > after_key):
                after_key = entries[0].sort_key()   # from now on, only arrivals can match
            remaining = deadline - time.monotonic()
            if self.index.closed:
                raise _http_error(503, "Server stopping\n")
            if remaining <= 0:
                raise _http_error(408, "No matching message arrived in time\n")
            woke = self.index.wait_for_change(seen, min(remaining, self.index.scan_interval_s))
            fresh = self.index.settle() if woke != seen else None
            seen = woke if fresh is None else fresh

    def web_events(self) -> None:
        """Beyond Mailpit (SPEC 8): server-sent events `new` (a summary) and `delete` ({"IDs"})."""
        self.index.scan()
        seq = self.index.seq
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_security_headers(HTTP_API_CSP)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"retry: 2000\n\n")
        last_write = time.monotonic()
        seen = self.index.notices
        while not self.index.closed:
            woke = self.index.wait_for_change(seen, self.index.scan_interval_s)
            if woke != seen:        # a notice: batched, and one scan serves every stream
                seen = self.index.settle()
                self.index.scan(seen)
            else:                   # the timeout: look for mail from other processes
                self.index.scan()
            events = self.index.events_after(seq)
            by_id = self.index.by_id    # as new as the events: another scan may have logged them
            out = []
            deleted = []
            for seq, kind, message_id, mailboxes in events:
                if self.scope is not None and not mailboxes & self.scope:
                    continue
                if kind == "delete":
                    deleted.append(message_id)
                    continue
                if deleted:
                    out.append(_sse("delete", {"IDs": deleted}))
                    deleted = []
                entry = scoped(by_id.get(message_id), self.scope)
                summary = self.index.summary(entry) if entry is not None else None
                if summary is not None:
                    out.append(_sse("new", summary))
            if deleted:
                out.append(_sse("delete", {"IDs": deleted}))
            if not out and time.monotonic() - last_write >= self.sse_keepalive_s:
                out.append(b": keepalive\n\n")
            if out:
                self.wfile.write(b"".join(out))
                last_write = time.monotonic()


def _sse(event: str, data) -> bytes:
    return ("event: %s\ndata: %s\n\n" % (event, json.dumps(data, ensure_ascii=False))).encode("utf-8", "replace")


def _int_param(text: Optional[str], default: int) -> int:
    """A positive integer query parameter; anything else means the default (as Mailpit)."""
    value = int(text) if text and text.isascii() and text.isdigit() and len(text) < 10 else 0
    return value if value > 0 else default


def _memory_bytes() -> int:
    """Resident memory of this process (Linux), else 0."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@lru_cache(maxsize=None)
def web_handler_class():
    """Build WebHandler on first use, so a run without --http never imports http.server."""
    import http.server

    class WebHandler(WebRequests, http.server.BaseHTTPRequestHandler):
        """One HTTP connection: http.server parses requests, WebRequests answers them."""

    return WebHandler


HTTP_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<title>minimail</title>
<style nonce="__NONCE__">
:root { --line: #e3e6ea; --muted: #6b7280; --accent: #2563eb; --bg: #f7f8fa; --sel: #e8f0fe; }
* { box-sizing: border-box; }
html, body { height: 100%; margin: 0; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111827;
  display: grid; grid-template-rows: 48px 1fr; grid-template-columns: 220px minmax(320px, 38%) 1fr; }
header { grid-column: 1 / 4; display: flex; align-items: center; gap: 12px; padding: 0 12px;
  background: #1f2937; color: #fff; }
header h1 { font-size: 17px; margin: 0 16px 0 0; font-weight: 600; letter-spacing: .3px; }
header input { flex: 1; max-width: 560px; padding: 6px 10px; border-radius: 6px; border: 0; font: inherit; }
header .live { font-size: 12px; color: #9ca3af; margin-left: auto; }
header .live.on::before { content: "\25CF  "; color: #34d399; }
button { font: inherit; font-size: 13px; padding: 4px 10px; border-radius: 6px; border: 1px solid #d1d5db;
  background: #fff; color: #111827; cursor: pointer; }
button:hover { background: #f3f4f6; }
button.danger { color: #b91c1c; }
header button { background: #374151; color: #fff; border-color: #4b5563; }
header button:hover { background: #4b5563; }
nav { background: var(--bg); border-right: 1px solid var(--line); overflow-y: auto; padding: 8px 0; }
nav a { display: flex; justify-content: space-between; padding: 6px 14px; color: inherit; text-decoration: none;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; cursor: pointer; }
nav a span:first-child { overflow: hidden; text-overflow: ellipsis; }
nav a:hover { background: #eef0f3; }
nav a.current { background: var(--sel); font-weight: 600; }
nav .count { color: var(--muted); font-size: 12px; padding-left: 8px; }
nav .count b { color: var(--accent); }
#list { display: flex; flex-direction: column; border-right: 1px solid var(--line); min-height: 0; }
#list .bar { display: flex; align-items: center; gap: 8px; padding: 6px 10px; border-bottom: 1px solid var(--line);
  font-size: 12px; color: var(--muted); }
#list .bar .grow { flex: 1; }
#rows { overflow-y: auto; flex: 1; }
.row { padding: 8px 12px; border-bottom: 1px solid var(--line); cursor: pointer; display: grid;
  grid-template-columns: 1fr auto; gap: 2px 10px; }
.row:hover { background: #f9fafb; }
.row.current { background: var(--sel); }
.row .from, .row .subject, .row .snippet, .row .to { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.row .from { font-weight: 400; }
.row.unread .from, .row.unread .subject { font-weight: 650; }
.row.unread .from::before { content: ""; display: inline-block; width: 7px; height: 7px; border-radius: 50%;
  background: var(--accent); margin-right: 6px; vertical-align: middle; }
.row .date, .row .size { color: var(--muted); font-size: 12px; text-align: right; white-space: nowrap; }
.row .snippet, .row .to { color: var(--muted); font-size: 12px; grid-column: 1 / 3; }
.badge { font-size: 11px; font-weight: 400; color: var(--muted); border: 1px solid var(--line);
  border-radius: 8px; padding: 0 6px; margin-left: 6px; vertical-align: 1px; }
.empty { padding: 40px 20px; text-align: center; color: var(--muted); }
main { overflow: hidden; display: flex; flex-direction: column; min-height: 0; min-width: 0; }
#view { display: flex; flex-direction: column; height: 100%; min-height: 0; }
.head { padding: 14px 18px 8px; border-bottom: 1px solid var(--line); }
.head h2 { margin: 0 0 8px; font-size: 18px; font-weight: 600; word-break: break-word; }
.head table { border-collapse: collapse; font-size: 13px; }
.head th { text-align: right; color: var(--muted); font-weight: 400; padding: 1px 10px 1px 0; vertical-align: top; }
.head td { word-break: break-word; }
.actions { display: flex; gap: 6px; flex-wrap: wrap; margin-top: 10px; align-items: center; }
.tabs { display: flex; gap: 2px; padding: 0 18px; border-bottom: 1px solid var(--line); }
.tabs button { border: 0; border-bottom: 2px solid transparent; border-radius: 0; background: none; padding: 8px 12px; }
.tabs button.current { border-bottom-color: var(--accent); color: var(--accent); }
.tabs button:disabled { color: #c0c4cc; cursor: default; }
.atts { padding: 8px 18px; border-bottom: 1px solid var(--line); display: flex; flex-wrap: wrap; gap: 6px; }
.atts a { font-size: 12px; padding: 3px 8px; border: 1px solid var(--line); border-radius: 12px; color: inherit;
  text-decoration: none; background: var(--bg); }
.atts a:hover { border-color: var(--accent); }
.body { flex: 1 1 auto; min-height: 0; overflow: auto; display: flex; flex-direction: column; }
.body > * { flex: none; }
.body > iframe { flex: 1 1 auto; width: 100%; min-height: 320px; border: 0; display: block; background: #fff; }
.body pre { margin: 0; padding: 14px 18px; white-space: pre-wrap; word-break: break-word;
  font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.body table { border-collapse: collapse; margin: 10px 18px; font-size: 12px; }
.body td { border-bottom: 1px solid var(--line); padding: 3px 8px; vertical-align: top; word-break: break-word; }
.body td:first-child { color: var(--muted); white-space: nowrap; }
.note { font-size: 12px; color: var(--muted); }
</style>
</head>
<body>
<header>
  <h1>minimail</h1>
  <input id="search" type="search" placeholder="Search: words, from:, to:, subject:, is:unread, has:attachment" autocomplete="off">
  <button id="readall" type="button">Mark all read</button>
  <button id="delall" type="button">Delete all</button>
  <span id="live" class="live">offline</span>
</header>
<nav id="boxes"></nav>
<section id="list">
  <div class="bar"><span id="range" class="grow"></span>
    <button id="prev" type="button" title="Newer">&#8249;</button><button id="next" type="button" title="Older">&#8250;</button></div>
  <div id="rows"></div>
</section>
<main id="main"><div class="empty">Select a message</div></main>
<script nonce="__NONCE__">
"use strict";
const PAGE = 50;
const state = { box: "", query: "", start: 0, total: 0, current: null, tab: "html", messages: [] };
const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}
function api(path, options) {
  return fetch(path, options).then((response) => {
    if (!response.ok) throw new Error(response.status + " " + response.statusText);
    return response;
  });
}
const enc = encodeURIComponent;
function who(address) {
  if (!address) return "";
  return address.Name ? address.Name + " <" + address.Address + ">" : address.Address;
}
function short(address) { return address ? (address.Name || address.Address) : ""; }
function list(addresses) { return (addresses || []).map(who).join(", "); }
function size(bytes) {
  if (bytes < 1024) return bytes + " B";
  if (bytes < 1048576) return (bytes / 1024).toFixed(1) + " kB";
  return (bytes / 1048576).toFixed(1) + " MB";
}
function when(text, long) {
  const date = new Date(text);
  if (isNaN(date)) return text;
  if (long) return date.toLocaleString();
  const today = new Date();
  return date.toDateString() === today.toDateString()
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { year: "numeric", month: "short", day: "numeric" });
}

function searchText() {
  const parts = [];
  if (state.box) parts.push("mailbox:\"" + state.box.replace(/[\\"]/g, "\\$&") + "\"");
  if (state.query) parts.push(state.query);
  return parts.join(" ");
}

function loadBoxes() {
  return api("/api/v1/mailboxes").then((r) => r.json()).then((data) => {
    const nav = $("boxes");
    nav.replaceChildren();
    const total = data.total, unread = data.unread;
    const entry = (name, label, count, fresh) => {
      const link = el("a", name === state.box ? "current" : "");
      link.append(el("span", "", label));
      const counter = el("span", "count");
      if (fresh) { counter.append(el("b", "", fresh)); counter.append(" / "); }
      counter.append(String(count));
      link.append(counter);
      link.title = label;
      link.addEventListener("click", () => { state.box = name; state.start = 0; loadBoxes(); loadList(); });
      nav.append(link);
    };
    entry("", "All mail", total, unread);
    data.mailboxes.forEach((box) => entry(box.Name, box.Name, box.Total, box.Unread));
    document.title = (unread ? "(" + unread + ") " : "") + "minimail";
  }).catch(() => {});
}

function loadList() {
  const query = searchText();
  const url = query
    ? "/api/v1/search?query=" + enc(query) + "&start=" + state.start + "&limit=" + PAGE
    : "/api/v1/messages?start=" + state.start + "&limit=" + PAGE;
  return api(url).then((r) => r.json()).then((data) => {
    state.total = data.messages_count;
    state.messages = data.messages;
    if (data.messages.length === 0 && state.start > 0) { state.start = Math.max(0, state.start - PAGE); return loadList(); }
    renderList();
  }).catch((error) => { $("rows").replaceChildren(el("div", "empty", "Cannot load messages: " + error.message)); });
}

function renderList() {
  const rows = $("rows");
  rows.replaceChildren();
  if (!state.messages.length) rows.append(el("div", "empty", searchText() ? "No matching messages" : "No messages yet"));
  state.messages.forEach((message) => {
    const row = el("div", "row" + (message.Read ? "" : " unread") + (message.ID === state.current ? " current" : ""));
    row.dataset.id = message.ID;
    row.append(el("div", "from", short(message.From) || "(no sender)"));
    row.append(el("div", "date", when(message.Created)));
    const subject = el("div", "subject", message.Subject || "(no subject)");
    if (message.Attachments) subject.append(el("span", "badge", message.Attachments > 1 ? message.Attachments + " files" : "1 file"));
    row.append(subject);
    row.append(el("div", "size", size(message.Size)));
    row.append(el("div", "to", "To: " + ((message.To || []).map(short).join(", ") || message.Mailboxes.join(", "))));
    if (message.Snippet) row.append(el("div", "snippet", message.Snippet));
    row.addEventListener("click", () => { location.hash = message.ID; });
    rows.append(row);
  });
  const end = Math.min(state.start + state.messages.length, state.total);
  $("range").textContent = state.total ? (state.start + 1) + "\u2013" + end + " of " + state.total : "";
  $("prev").disabled = state.start === 0;
  $("next").disabled = end >= state.total;
}

function openMessage(id) {
  state.current = id;
  document.querySelectorAll(".row").forEach((row) => row.classList.toggle("current", row.dataset.id === id));
  if (!id) { $("main").replaceChildren(el("div", "empty", "Select a message")); return; }
  api("/api/v1/message/" + enc(id)).then((r) => r.json()).then((message) => {
    if (state.current !== id) return;
    renderMessage(message);
    const row = document.querySelector(".row.unread[data-id=\"" + CSS.escape(id) + "\"]");
    if (row) { row.classList.remove("unread"); loadBoxes(); }
  }).catch(() => { $("main").replaceChildren(el("div", "empty", "This message no longer exists")); });
}

function renderMessage(message) {
  const view = el("div", "");
  view.id = "view";
  const head = el("div", "head");
  head.append(el("h2", "", message.Subject || "(no subject)"));
  const table = el("table");
  const line = (label, value) => {
    if (!value) return;
    const tr = el("tr");
    tr.append(el("th", "", label));
    tr.append(el("td", "", value));
    table.append(tr);
  };
  line("From", who(message.From));
  line("To", list(message.To));
  line("Cc", list(message.Cc));
  line("Bcc", list(message.Bcc));
  line("Reply-To", list(message.ReplyTo));
  line("Date", when(message.Date, true));
  line("Mailboxes", message.Mailboxes.join(", "));
  line("Size", size(message.Size));
  head.append(table);
  const actions = el("div", "actions");
  const del = el("button", "danger", "Delete");
  del.addEventListener("click", () => {
    api("/api/v1/messages", { method: "DELETE", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ IDs: [message.ID] }) }).then(() => { location.hash = ""; refresh(); });
  });
  const unread = el("button", "", "Mark unread");
  unread.addEventListener("click", () => {
    api("/api/v1/messages", { method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ IDs: [message.ID], Read: false }) }).then(refresh);
  });
  const download = el("a", "", "Download .eml");
  download.href = "/api/v1/message/" + enc(message.ID) + "/raw?dl=1";
  actions.append(del, unread, download);
  head.append(actions);
  view.append(head);

  const files = (message.Attachments || []).concat(message.Inline || []);
  if (files.length) {
    const atts = el("div", "atts");
    files.forEach((file) => {
      const link = el("a", "", (file.FileName || file.ContentID || "part " + file.PartID) + " (" + size(file.Size) + ")");
      link.href = "/api/v1/message/" + enc(message.ID) + "/part/" + enc(file.PartID);
      link.download = file.FileName || "";
      atts.append(link);
    });
    view.append(atts);
  }
  const tabs = el("div", "tabs");
  const body = el("div", "body");
  const show = (tab) => {
    state.tab = tab;
    tabs.querySelectorAll("button").forEach((b) => b.classList.toggle("current", b.dataset.tab === tab));
    body.replaceChildren();
    if (tab === "html") {
      const frame = el("iframe");
      frame.setAttribute("sandbox", "allow-popups allow-popups-to-escape-sandbox");
      frame.setAttribute("referrerpolicy", "no-referrer");
      frame.title = "HTML part";
      frame.src = "/view/" + enc(message.ID) + ".html";
      body.append(frame);
    } else if (tab === "text") {
      body.append(el("pre", "", message.Text));
    } else if (tab === "headers") {
      api("/api/v1/message/" + enc(message.ID) + "/headers").then((r) => r.json()).then((headers) => {
        const table = el("table");
        Object.keys(headers).forEach((name) => headers[name].forEach((value) => {
          const tr = el("tr");
          tr.append(el("td", "", name), el("td", "", value));
          table.append(tr);
        }));
        body.replaceChildren(table);
      });
    } else {
      api("/api/v1/message/" + enc(message.ID) + "/raw").then((r) => r.text()).then((text) => {
        const limit = 1048576;
        body.replaceChildren(el("pre", "", text.length > limit ? text.slice(0, limit) + "\n\u2026 (download the .eml for the rest)" : text));
      });
    }
  };
  [["html", "HTML", !message.HTML], ["text", "Text", false], ["headers", "Headers", false], ["raw", "Raw", false]]
    .forEach(([tab, label, disabled]) => {
      const button = el("button", "", label);
      button.dataset.tab = tab;
      button.disabled = disabled;
      button.addEventListener("click", () => show(tab));
      tabs.append(button);
    });
  view.append(tabs, body);
  $("main").replaceChildren(view);
  show(state.tab === "html" && !message.HTML ? "text" : state.tab);
}

let pending = null;
function refresh() {
  clearTimeout(pending);
  pending = setTimeout(() => { loadBoxes(); loadList(); }, 150);
}

$("prev").addEventListener("click", () => { state.start = Math.max(0, state.start - PAGE); loadList(); });
$("next").addEventListener("click", () => { state.start += PAGE; loadList(); });
let typing = null;
$("search").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => { state.query = $("search").value.trim(); state.start = 0; loadList(); }, 250);
});
$("readall").addEventListener("click", () => {
  const query = searchText();
  api("/api/v1/messages", { method: "PUT", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(query ? { Search: query, Read: true } : { Read: true }) }).then(refresh);
});
$("delall").addEventListener("click", () => {
  const query = searchText();
  const what = query ? state.total + " matching message(s)" : "ALL " + state.total + " message(s)";
  if (!confirm("Delete " + what + "?")) return;
  const done = query ? api("/api/v1/search?query=" + enc(query), { method: "DELETE" })
    : api("/api/v1/messages", { method: "DELETE" });
  done.then(() => { location.hash = ""; refresh(); });
});
window.addEventListener("hashchange", () => openMessage(decodeURIComponent(location.hash.slice(1))));

const events = new EventSource("/api/v1/events");
events.addEventListener("open", () => { $("live").textContent = "live"; $("live").classList.add("on"); });
events.addEventListener("error", () => { $("live").textContent = "reconnecting"; $("live").classList.remove("on"); });
events.addEventListener("new", refresh);
events.addEventListener("delete", (event) => {
  const ids = JSON.parse(event.data).IDs;
  if (ids.indexOf(state.current) >= 0) location.hash = "";
  refresh();
});

loadBoxes();
loadList().then(() => { if (location.hash.length > 1) openMessage(decodeURIComponent(location.hash.slice(1))); });
</script>
</body>
</html>
"""


# --- Application ----------------------------------------------------------------------

LISTENERS = (
    ("smtp", SMTPHandler),
    ("submission", SMTPHandler),
    ("pop3", POP3Handler),
)


class App:
    """Build, start and stop every listener from one Config (used by main() and tests)."""

    def __init__(self, config: Config):
        self.config = config
        self.maildir = Maildir(config.maildir)
        self.queue = Queue(self.maildir.root)
        self.ids = MessageIds(config.hostname)
        self.relay = Relay(self)
        self.mailbox_locks = MailboxLocks()
        self.resolver = Resolver(config)
        self.tls_context = None
        self.servers = {}
        self.threads = []
        self.mail_index = None      # the web page's MessageIndex, while HTTP is on

    def start(self) -> None:
        """Validate the config, bind every listener and start serving; ConfigError if not possible."""
        self.check_config()
        try:
            os.makedirs(self.maildir.root, exist_ok=True)
        except OSError as exc:
            raise ConfigError("cannot create maildir %s: %s" % (self.maildir.root, exc.strerror)) from None
        self.maildir.clean_tmp()
        if self.config.tls_cert:
            self.tls_context = self._load_tls()
        listeners = list(LISTENERS)
        if self.config.http is not None:        # http.server is imported only when needed
            self.mail_index = MessageIndex(self.maildir, self.config.http_scan_interval)
            listeners.append(("http", web_handler_class()))
        try:
            for name, handler in listeners:
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
        if self.mail_index is not None:
            thread = threading.Thread(target=self.mail_index.warm, name="http-index", daemon=True)
            thread.start()
            self.threads.append(thread)
        self.relay.start()

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

    @property
    def pop3_port(self) -> int:
        return self.address("pop3")[1]

    @property
    def http_port(self) -> int:
        return self.address("http")[1]

    def notify_new(self, size: int) -> None:
        """Tell waiting web clients that a message was just stored (called after commit)."""
        if self.mail_index is not None:
            self.mail_index.notify_new(size)

    def check_login(self, username: bytes, password: bytes, loopback: bool):
        """The mailbox an account logs in to, None for a dev-sink login, False if refused.

        With no accounts configured, a loopback client may log in with anything (SPEC 4/5).
        """
        import hmac     # loads OpenSSL's hashes (3 MB): only when someone logs in
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

    def store_generated(self, sender: str, address: str, data: bytes) -> str:
        """Store a message minimail wrote itself (a bounce, in wire form) for address:
        into its mailbox when local, else into the queue. Return its ID."""
        config = self.config
        local, domain = parse_mailbox(address)
        folder = folder_name(local, domain)
        is_local = domain in config.local_domains or config.catch_all
        if is_local and (not is_safe_folder(folder) or config.accounts and not config.catch_all
                         and folder not in config.accounts):
            folder = "postmaster@%s" % normalize_domain(config.domains[0])   # tell postmaster
        message_id = self.ids.new()
        received = "Received: by %s (minimail) id %s for <%s>;\n\t%s\n" % (
            config.hostname, message_id, address, rfc5322_date())
        copy = _Copy(folder, mailbox_header(sender, folder, received)) if is_local \
            else _Copy(None, received.encode("utf-8"))
        writer = MessageWriter(self.maildir, self.queue, message_id, [copy])
        writer.open(max(config.max_size, len(data)))
        writer.write(data)          # a write error is kept for commit(), which cleans up
        writer.finish()
        stored = writer.commit()
        if not is_local:
            try:
                self.relay.enqueue(QueueEntry(
                    message_id, sender, time.time(), [QueueRecipient(address, domain)],
                    smtputf8=not address.isascii(), eight_bit=writer.eight_bit, size=writer.size))
            except OSError:
                for path in stored:
                    _unlink_quietly(path)
                raise
        return message_id

    def stop(self) -> None:
        """Stop listening, close live connections and wait (bounded) for their threads."""
        if self.mail_index is not None:
            self.mail_index.close()         # ends event streams and long waits at once
        for server in self.servers.values():
            server.shutdown()
            server.server_close()
        for server in self.servers.values():
            server.close_connections(wait_s=5.0)
        for thread in self.threads:
            thread.join(5.0)
        self.relay.stop()
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


# --- Command line ---------------------------------------------------------------------

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
    parser = _Parser(prog="minimail.py", description="A small mail server: SMTP into Maildir, relay, POP3, "
                     "and a web page with a Mailpit-compatible API.",
                     formatter_class=_HelpFormatter)
    add = parser.add_argument
    add("--domain", action="append", metavar="NAME",
        help="a local domain; repeatable (default: localhost)")
    add("--maildir", default="./maildir", metavar="DIR", help="root of all mailboxes")
    add("--smtp", default="127.0.0.1:1025", type=_typed(parse_addr), metavar="ADDR",
        help="SMTP listener: HOST:PORT, [IPv6]:PORT, PORT or off")
    add("--submission", default="off", type=_typed(parse_addr), metavar="ADDR",
        help="submission listener (AUTH required before MAIL)")
    add("--http", default="127.0.0.1:8025", type=_typed(parse_addr), metavar="ADDR",
        help="web page and Mailpit-compatible JSON API; off disables")
    add("--pop3", default="127.0.0.1:1110", type=_typed(parse_addr), metavar="ADDR",
        help="POP3 listener")
    add("--hostname", default=socket.gethostname(), metavar="NAME",
        help="name in the greeting, EHLO and Received:")
    add("--user", action="append", default=[], type=_typed(parse_account),
        metavar="ADDRESS:PASSWORD", help="an account; repeatable")
    add("--users", metavar="FILE", help="accounts file, one ADDRESS:PASSWORD a line")
    add("--relay-from", action="append", default=[], type=_typed(_parse_cidr), metavar="CIDR",
        help="client network that may relay without AUTH; repeatable")
    add("--catch-all", action="store_true",
        help="store mail for every domain locally instead of relaying")
    add("--smarthost", type=_typed(_parse_host_port), metavar="HOST:PORT",
        help="send all outbound mail through this server instead of MX hosts")
    add("--smarthost-auth", type=_typed(_parse_credentials), metavar="USER:PASSWORD",
        help="AUTH for the smarthost (sent only inside TLS or to a loopback host)")
    add("--mx-port", type=int, default=25, metavar="PORT", help="port of MX hosts when relaying")
    add("--retry-delay", type=_typed(parse_time), default="300s", metavar="TIME",
        help="first retry of a queued message; delays double, at most 4000 s")
    add("--queue-lifetime", type=_typed(parse_time), default="5d", metavar="TIME",
        help="bounce queued mail older than this")
    add("--tls-cert", metavar="FILE", help="certificate (PEM) for STARTTLS and STLS")
    add("--tls-key", metavar="FILE", help="private key (PEM) for STARTTLS and STLS")
    add("--max-size", type=int, default=26214400, metavar="BYTES", help="largest message")
    add("--max-connections", type=int, default=100, metavar="N",
        help="concurrent connections per listener")
    add("--timeout", type=_typed(parse_time), default="300s", metavar="TIME",
        help="longest wait for a client's command or data")
    _add_dns_option(parser)
    add("-q", "--quiet", action="store_true", help="log warnings and errors only")
    add("-v", "--verbose", action="store_true", help="log protocol traffic too")
    return parser


def _parse_host_port(text: str) -> tuple:
    """A server to connect to: HOST:PORT or [IPv6]:PORT, with a real port."""
    address = None if text == "off" or text.isdigit() else parse_addr(text)
    if address is None or address[1] == 0:
        raise ValueError("bad address %r (use HOST:PORT)" % text)
    return address


def _parse_credentials(text: str) -> tuple:
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise ValueError("bad credentials %r (use USER:PASSWORD)" % text)
    return user, password


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
    if not 0 < args.mx_port < 65536:
        raise ValueError("--mx-port must be a port number")
    if args.smarthost_auth and not args.smarthost:
        raise ValueError("--smarthost-auth needs --smarthost")
    if not args.hostname or CONTROL_RE.search(args.hostname) \
            or any(char.isspace() for char in args.hostname):   # it goes into the greeting and Received:
        raise ValueError("bad --hostname %r (no spaces or control characters)" % args.hostname)
    return Config(
        domains=domains, maildir=args.maildir, smtp=args.smtp, submission=args.submission,
        http=args.http, pop3=args.pop3,
        hostname=args.hostname, users=tuple(users), relay_from=tuple(args.relay_from),
        catch_all=args.catch_all, tls_cert=args.tls_cert, tls_key=args.tls_key,
        max_size=args.max_size, max_connections=args.max_connections, timeout=args.timeout,
        smarthost=args.smarthost, smarthost_auth=args.smarthost_auth, mx_port=args.mx_port,
        retry_delay=args.retry_delay, queue_lifetime=args.queue_lifetime, dns=tuple(args.dns))


class LogLineHandler(logging.Handler):
    """Write each log record as one line with a single write() and no lock.

    logging's StreamHandler holds a lock across the write system call; with a thread per
    connection, every session then queues behind whichever thread is writing. One
    write() of a line is atomic for pipes (up to PIPE_BUF) and for files.
    """

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def handle(self, record) -> bool:
        if self.filter(record):
            self.emit(record)
            return True
        return False

    def emit(self, record) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)


def serve(argv: list) -> int:
    """Run the server until SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # The log format names no process or thread: skip looking them up for every record.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    handler = LogLineHandler(sys.stderr.fileno())
    handler.setFormatter(logging.Formatter("%(asctime)s minimail %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    app = App(config)
    app.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    signal.signal(signal.SIGUSR1, lambda signum, frame: app.relay.flush())
    for name in app.servers:
        print("minimail: %s listening on %s" % (name, format_addr(app.address(name))),
              file=sys.stderr, flush=True)
    print("minimail: mail stored in %s" % app.maildir.root, file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    app.stop()
    return 0


def list_queue(argv: list) -> int:
    """The `queue` command: print the outbound queue (SPEC 2)."""
    parser = _Parser(prog="minimail.py queue", description="List queued outbound mail.")
    parser.add_argument("--maildir", default="./maildir", metavar="DIR",
                        help="root of all mailboxes (default: ./maildir)")
    args = parser.parse_args(argv)
    queue = Queue(os.path.abspath(args.maildir))
    try:
        message_ids = queue.ids()
    except OSError as exc:          # --maildir names a file, or .queue is unreadable
        raise UsageError("cannot read the queue in %s: %s" % (args.maildir, exc.strerror or exc)) from None
    now = time.time()
    for message_id in message_ids:
        entry = queue.load(message_id)
        if entry is None:
            continue
        print("%s %ds <%s>" % (entry.id, max(0, now - entry.created), entry.sender))
        for rcpt in entry.recipients:
            next_try = "%ds" % max(0, math.ceil(entry.next_try - now)) if rcpt.pending else "-"
            state = "bounced" if rcpt.state == "failed" else rcpt.state
            print("  %s %s %d %s %s" % (rcpt.address, state, rcpt.attempts, next_try,
                                        rcpt.last_error or "-"))
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


COMMANDS = {"serve": serve, "mx": print_mx, "queue": list_queue}


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
