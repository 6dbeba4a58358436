"""Client configuration: defaults from the environment, URL checks, the secret key."""

from __future__ import annotations

import base64
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httpx
import tenacity

from ._deadlines import Timeouts
from ._errors import InvalidRequestError
from ._retry import RetryPolicy

__all__ = [
    "DEFAULT_BASE_URL",
    "EnvProxy",
    "env_proxy",
    "http_proxy_settings",
    "missing_socks_error",
    "resolve_retry",
    "Secret",
    "resolve_api_key",
    "resolve_base_url",
    "resolve_model",
    "resolve_timeout",
    "shown_url",
]

DEFAULT_BASE_URL = "http://localhost:8000/v1"

# The connection pool of a client llmstream makes itself. httpx's default of 100
# connections would make stream 101 wait silently for a free one; a streaming gateway
# holds hundreds open. Idle connections stay at httpx's 20: httpcore's pool does work
# per pooled idle connection for every request it opens or closes (a poll of the socket
# and a scan of the pool), which at hundreds of them cost more CPU than the streams
# (benchmarks/PROFILE.md); a new connection to vLLM costs far less than that.
DEFAULT_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=20)
# With this many streams of one client open, a new one asks the server to close its
# connection when it ends (see _chat_request): the pool then holds only live connections.
KEEP_ALIVE_BELOW = 20


class Secret:
    """A string that never shows itself in a repr, str or traceback.

    Example::

        key = Secret("sk-123")
        repr(key)            # "Secret('**********')"
        key.get_secret()     # "sk-123"
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret(self) -> str:
        """The wrapped value."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _env(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


def resolve_base_url(base_url: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The base URL: the argument, else LLMSTREAM_BASE_URL, OPENAI_BASE_URL, then the default.

    Example::

        resolve_base_url(None, {})                   # "http://localhost:8000/v1"
        resolve_base_url("http://gpu-1:8000/v1/")    # "http://gpu-1:8000/v1"
    """
    raw = base_url or _env(environ, "LLMSTREAM_BASE_URL", "OPENAI_BASE_URL") or DEFAULT_BASE_URL
    # Messages show the URL with any credentials masked: they must not reach a log.
    shown = shown_url(raw) if isinstance(raw, str) else raw
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, TypeError) as exc:
        detail = str(exc).replace(raw, shown) if isinstance(raw, str) else exc
        raise InvalidRequestError(f"base_url {shown!r} is not a valid URL: {detail}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidRequestError(
            f"base_url {shown!r} must be an http:// or https:// URL with a host, "
            "for example http://localhost:8000/v1"
        )
    if url.port is not None and not 0 < url.port < 65536:
        raise InvalidRequestError(
            f"base_url {shown!r} has port {url.port}; a port is a number from 1 to 65535"
        )
    if url.userinfo:
        raise InvalidRequestError(
            "base_url must not carry credentials; pass api_key=... (or LLMSTREAM_API_KEY)"
        )
    if url.query or url.fragment or "?" in raw or "#" in raw:
        # Not echoed: a query string is where some servers take a key.
        raise InvalidRequestError(
            "base_url must not have a query string or a fragment (?... or #...): paths such "
            "as /chat/completions are appended to it, so every request would go to a wrong "
            "path. Pass the API key as api_key=... (sent as a Bearer header), and other "
            "request fields in extra_body=... or headers in extra_headers=..."
        )
    return raw.rstrip("/")


def resolve_api_key(api_key: str | None, environ: Mapping[str, str] = os.environ) -> Secret | None:
    """The API key: the argument, else LLMSTREAM_API_KEY, then OPENAI_API_KEY (or none).

    Example::

        resolve_api_key(None, {"OPENAI_API_KEY": "sk-1"})  # Secret('**********')
    """
    if api_key is not None and not isinstance(api_key, str):
        # Its type only: the value may be a key all the same.
        raise InvalidRequestError(
            f"api_key must be a str, got {type(api_key).__name__}; pass the key as text"
        )
    value = api_key or _env(environ, "LLMSTREAM_API_KEY", "OPENAI_API_KEY")
    return Secret(value) if value else None


def resolve_model(model: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The model: the argument, else LLMSTREAM_MODEL; ``None`` means ask the server.

    Example::

        resolve_model(None, {"LLMSTREAM_MODEL": "Qwen/Qwen3-8B"})  # "Qwen/Qwen3-8B"
    """
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError(
            f"model must be a str such as 'Qwen/Qwen3-8B', got {type(model).__name__} {model!r}"
        )
    return model or _env(environ, "LLMSTREAM_MODEL")


def resolve_timeout(timeout: float | Timeouts | None) -> Timeouts:
    """Accept a number of seconds for each phase, or a full :class:`Timeouts`.

    A number applies to connect, first token and idle alike (like httpx's
    ``timeout=5.0``), with no total limit.

    Example::

        resolve_timeout(30.0)                        # 30 s for each phase
        resolve_timeout(Timeouts(first_token=600, total=900))
    """
    if timeout is None:
        return Timeouts()
    if isinstance(timeout, Timeouts):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise InvalidRequestError(
            f"timeout must be a positive number of seconds or a Timeouts, got {timeout!r}"
        )
    seconds = float(timeout)
    return Timeouts(connect=seconds, first_token=seconds, idle=seconds, total=None)


def resolve_retry(retry: RetryPolicy | int | tenacity.BaseRetrying | None) -> RetryPolicy:
    """Accept a policy, a number of retries, or a tenacity ``Retrying`` to take strategies from.

    Example::

        resolve_retry(0)             # no retries
        resolve_retry(5)             # RetryPolicy(max_retries=5)
    """
    if retry is None:
        return RetryPolicy()
    if isinstance(retry, RetryPolicy):
        return retry
    if isinstance(retry, tenacity.BaseRetrying):
        return RetryPolicy.from_tenacity(retry)
    if isinstance(retry, bool) or not isinstance(retry, int):
        raise InvalidRequestError(
            f"retry must be a RetryPolicy, a number of retries or a tenacity Retrying, "
            f"got {retry!r}"
        )
    return RetryPolicy(max_retries=retry)


# The proxy variables httpx reads (its private get_environment_proxies), by the URL
# scheme they serve; "all" serves any scheme that has none of its own.
_PROXY_SCHEMES = ("http", "https", "all")


def shown_url(url: str) -> str:
    """``url`` as it may appear in a message or a log: credentials in it masked.

    Plain string work, so that a URL too malformed to parse is still masked.

    Example::

        shown_url("http://ann:pw@proxy:3128")  # "http://***@proxy:3128"
        shown_url("proxy:3128")                # "proxy:3128"
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc = rest[:end]
    if "@" not in netloc:
        return url
    return f"{scheme}{sep}***@{netloc.rpartition('@')[2]}{rest[end:]}"


@dataclass(frozen=True)
class EnvProxy:
    """A proxy set in the environment: its URL and the variable that set it.

    ``url`` may hold the proxy's credentials: messages use :attr:`shown`, and the
    repr masks them too.

    Example::

        env_proxy("http://gpu-1:8000/v1/models")  # EnvProxy("http://proxy:3128", "HTTP_PROXY")
    """

    url: str
    variable: str

    @property
    def shown(self) -> str:
        """The URL with any credentials masked, for messages."""
        return shown_url(self.url)

    def __repr__(self) -> str:
        return f"EnvProxy({self.shown!r}, {self.variable!r})"


def _variable(scheme: str, value: str) -> str:
    # urllib prefers the lowercase spelling when both are set, as curl does.
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"):
        if os.environ.get(name) == value:
            return name
    return f"{scheme.upper()}_PROXY"  # from the system's settings (macOS, Windows)


def env_proxy(url: str) -> EnvProxy | None:
    """The proxy an httpx client that trusts the environment uses for ``url``, if any.

    httpx keeps its reading of the environment private, so this reads the same
    settings through :func:`urllib.request.getproxies` (``HTTP_PROXY``,
    ``HTTPS_PROXY``, ``ALL_PROXY``) and :func:`urllib.request.proxy_bypass`
    (``NO_PROXY``), as httpx does.

    Example::

        os.environ["HTTP_PROXY"] = "http://proxy:3128"
        env_proxy("http://gpu-1:8000/v1")  # EnvProxy("http://proxy:3128", "HTTP_PROXY")
    """
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    proxies = urllib.request.getproxies()
    for scheme in (target.scheme, "all"):
        value = proxies.get(scheme)
        if value:
            break
    else:
        return None
    host = target.host if target.port is None else f"{target.host}:{target.port}"
    if proxies.get("no") == "*" or urllib.request.proxy_bypass(host):
        return None
    return EnvProxy(value if "://" in value else f"http://{value}", _variable(scheme, value))


def http_proxy_settings(proxy: EnvProxy, transport: str) -> tuple[str, dict[str, str]]:
    """The proxy's URL without credentials, and its credentials as a header for the proxy.

    For the transports that speak to ``http://`` proxies only (``transport`` names one in
    the error for any other kind).

    Example::

        http_proxy_settings(EnvProxy("http://ann:pw@proxy:3128", "HTTP_PROXY"), "aiohttp")
        # ("http://proxy:3128", {"Proxy-Authorization": "Basic YW5uOnB3"})
    """
    try:
        parts = urlsplit(proxy.url)
    except ValueError as exc:  # an unclosed [IPv6 bracket, say
        raise InvalidRequestError(
            f"{proxy.variable}={proxy.shown} is not a valid proxy URL ({exc}). Fix it, add the "
            "server's host to NO_PROXY, or unset it."
        ) from None
    if parts.scheme != "http":
        raise InvalidRequestError(
            f"{proxy.variable}={proxy.shown} names a {parts.scheme} proxy, which the {transport} "
            f"transport cannot use (it speaks to http:// proxies only). Give an http:// "
            "proxy URL, add the server's host to NO_PROXY, or use the default httpx "
            "transport."
        )
    if parts.username is None:
        return proxy.url, {}
    user = unquote(parts.username)
    password = unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc).geturl(), {"Proxy-Authorization": f"Basic {token}"}


def missing_socks_error(exc: ImportError) -> InvalidRequestError:
    """The error for httpx's ImportError when the environment names a SOCKS proxy.

    httpx makes a transport for every proxy in the environment when a client is
    built, whatever URL it will be used for, and a SOCKS one needs ``socksio``.

    Example::

        try:
            http = httpx.AsyncClient()
        except ImportError as exc:
            raise missing_socks_error(exc) from exc
    """
    proxies = urllib.request.getproxies()
    found = [
        (scheme, proxies[scheme])
        for scheme in _PROXY_SCHEMES
        if proxies.get(scheme, "").lower().startswith("socks")
    ]
    who = (
        " and ".join(f"{_variable(scheme, value)}={shown_url(value)}" for scheme, value in found)
        if found
        else "The system's proxy settings"
    )
    return InvalidRequestError(
        f"{who} names a SOCKS proxy, which httpx can use only with the socksio package: "
        'pip install "httpx[socks]". Or unset the variable, or pass an http_client made '
        f"with trust_env=False to ignore the environment's proxies. ({exc})"
    )
