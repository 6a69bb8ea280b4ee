"""How the download stage fetches one URL: img2dataset's fetch, with the rules a hostile URL list needs.

img2dataset opens every URL with ``urllib.request.urlopen``; :func:`opener` is what it gets:
- re-checks every redirect target: only http and https are followed (urllib would follow ftp:);
- resolves the host itself and connects only to an address it has checked: public, or of a kind
  listed in ``download.allowed_networks`` (``loopback``, ``private``, ``link_local``, ``reserved``),
  for the first request and for every redirect, so DNS cannot point a URL list at the cluster's
  own network (no second lookup to rebind between the check and the connection);
- reports ``Retry-After`` with a 429 or 503, for the retry pass;
``pipeline.downloader`` installs it in img2dataset's download processes and adds the per-host cap.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request

ALLOWED_SCHEMES = ("http", "https")
NETWORK_KINDS = ("loopback", "private", "link_local", "reserved")


class RefusedFetch(OSError):
    """A request the policy does not make; the message is the download error recorded for the row."""


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    allowed_networks: tuple[str, ...] = ("loopback",)
    per_host: int = 0  # concurrent requests to one host per download process; 0: no cap

    def check(self, ip: str, host: str) -> None:
        kind = network_kind(ip)
        if kind and kind not in self.allowed_networks:
            raise RefusedFetch(f"refused address {ip} of {host!r}: {kind} (download.allowed_networks)")


def network_kind(ip: str) -> str:
    """"" for a public address, else its kind (one of NETWORK_KINDS)."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])  # an IPv6 scope id is not part of the address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link_local"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return "reserved"  # 0.0.0.0 reaches this machine
    if address.is_global:
        return ""
    return "private" if address.is_private else "reserved"


def _checked_connection(policy: FetchPolicy, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **_):
    """socket.create_connection, to an address of ``host`` that the policy allows."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        try:
            policy.check(sockaddr[0], host)
            sock = socket.socket(family, kind, proto)
        except OSError as err:
            error = err
            continue
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            error = err
    raise error or OSError(f"getaddrinfo returned nothing for {host!r}")


def _connection_class(base, policy: FetchPolicy):
    def make(host, **kwargs):
        connection = base(host, **kwargs)
        connection._create_connection = functools.partial(_checked_connection, policy)
        return connection

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self.policy = policy

    def http_open(self, req):
        return self.do_open(_connection_class(http.client.HTTPConnection, self.policy), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self.policy = policy

    def https_open(self, req):
        return self.do_open(_connection_class(http.client.HTTPSConnection, self.policy), req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            fp.close()
            raise RefusedFetch(f"refused redirect to a {scheme}: URL (only {', '.join(ALLOWED_SCHEMES)} are fetched)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _RetryAfterHandler(urllib.request.BaseHandler):
    """A 429 or 503 error names its Retry-After (seconds or an HTTP date), read by the retry pass."""

    def _error(self, req, fp, code, msg, headers):
        raise urllib.error.HTTPError(req.full_url, code, f"{msg} (Retry-After: {headers.get('Retry-After', '')})", headers, fp)

    http_error_429 = http_error_503 = _error


def opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_HTTPHandler(policy), _HTTPSHandler(policy), _RedirectHandler(), _RetryAfterHandler())
