"""Broker URL parsing shared by the adapters: hosts, typed query options, secret redaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

#: Query parameters whose values are secrets (matched as substrings of the lower-cased name).
_SECRET_PARAMS = ("password", "secret", "token", "passphrase")


def redact_url(url: str) -> str:
    """``url`` with its password, and query values that look like secrets, replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(k) for k, _ in pairs):
            query = urlencode([(k, "***" if _is_secret(k) else v) for k, v in pairs], safe="*")
    return parts._replace(netloc=netloc, query=query).geturl()


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(s in lowered for s in _SECRET_PARAMS)


@dataclass
class BrokerUrl:
    """A parsed broker URL. ``options`` are consumed with the ``pop_*`` helpers; whatever is left
    at the end is unknown (see :meth:`reject_unknown`)."""

    url: str
    scheme: str
    username: str | None
    password: str | None
    hosts: list[tuple[str, int]]
    path: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def redacted(self) -> str:
        """The URL safe to log."""
        return redact_url(self.url)

    def _bad(self, message: str) -> ValueError:
        return ValueError(f"{message} in broker URL {self.redacted!r}")

    def pop_str(self, name: str, default: str | None = None) -> str | None:
        """Take option ``name`` as text."""
        return self.options.pop(name, default)

    def pop_float(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        """Take option ``name`` as a number of at least ``minimum`` (exclusive when 0)."""
        raw = self.options.pop(name, None)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._bad(f"option {name}={raw!r} is not a number") from None
        if value < minimum or (minimum == 0 and value <= 0) or value != value:
            raise self._bad(f"option {name}={raw!r} is out of range")
        return value

    def pop_int(self, name: str, default: int | None, *, minimum: int = 0) -> int | None:
        """Take option ``name`` as an integer of at least ``minimum``."""
        raw = self.options.pop(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self._bad(f"option {name}={raw!r} is not an integer") from None
        if value < minimum:
            raise self._bad(f"option {name}={raw!r} must be >= {minimum}")
        return value

    def reject_unknown(self, known: str) -> None:
        """Raise ``ValueError`` naming options nobody took; ``known`` lists the accepted ones."""
        if self.options:
            names = ", ".join(sorted(self.options))
            raise self._bad(f"unknown option(s) {names} (known: {known})")


def parse_url(url: str, *, default_port: int, schemes: tuple[str, ...]) -> BrokerUrl:
    """Split ``scheme://[user[:password]@]host[:port][,host2[:port]]/path?options``.

    Several comma-separated hosts are allowed (Kafka bootstrap servers). Repeated options are
    an error, so a typo cannot silently win.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ValueError(f"expected a {'/'.join(schemes)}:// URL, got {redact_url(url)!r}")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts: list[tuple[str, int]] = []
    for item in filter(None, hostlist.split(",")):
        host, port = _split_host(item, default_port, url)
        hosts.append((host, port))
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise ValueError(f"option {key} is given twice in broker URL {redact_url(url)!r}")
        options[key] = value
    return BrokerUrl(url, scheme, username, password, hosts, unquote(parts.path), options)


def _split_host(item: str, default_port: int, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ValueError(f"empty host in broker URL {redact_url(url)!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in broker URL {redact_url(url)!r}")
    return host, int(port_text)
