"""Run Ray Serve's HAProxy with every listener on the serving host and a private admin socket.

Ray 2.60 renders HAProxy's configuration from a fixed template in which the Prometheus exporter
(``bind :9101``) and the stats page (``bind *:8404``) listen on every interface, whatever host
Serve's HTTP options name, and the admin socket (``level admin``: it can disable servers and
rewrite the routing) is created mode 666. None of this has a setting. So
:func:`lepton_ray.serve.deploy.enable_haproxy` points ``RAY_SERVE_HAPROXY_BINARY_PATH`` at a small
script that runs this file instead of HAProxy: it copies the configuration Ray wrote, with those
listeners bound to the host of Serve's own HTTP frontend and the socket mode 600, and replaces
itself (``exec``, same pid) with the real HAProxy on the copy. Ray's reloads (``-sf``), health
checks and admin-socket commands see the process they started.

The copy also answers HAProxy's own errors as the endpoint answers its errors, in JSON: no replica
left or a replica that died mid-request (502, 503 and 504, which Ray's template turns into a
plain-text 500) get a 503 ``{"error": ...}`` with ``Retry-After``. And a request whose replica is
killed under it is answered: HAProxy replays it elsewhere where it holds it whole (request bodies
are buffered for that), and otherwise it goes out on a connection of its own, since HAProxy closes
the client's connection without a word when a request on a reused connection fails
(:func:`fresh_connections_for_partial_requests`). HAProxy's buffer is raised to
:data:`MIN_BUFSIZE`, so that headers past the endpoint's own 16 KiB limit reach the endpoint, which
answers them 431 in JSON. A request HAProxy itself cannot parse (malformed, or headers past its
buffer) still gets its built-in HTML 400: HAProxy 2.8 sends that before any ``errorfile`` or
``http-error`` applies (tried both).

Each client connection stays on one replica (:func:`sticky_connections`): Ray's template balances
every request anew (``leastconn`` over pooled connections), so a client's
consecutive requests went round the replicas, 59 replica changes in 60 requests on one keep-alive
connection to three replicas; on a GPU shared by four replicas each request then ran in another
process (ResNet-18 at concurrency 1: 2-3 ms added over plain uvicorn with four replicas, under 1 ms
with one). Connections are spread over the replicas by a consistent hash of the client's port,
as a Kubernetes Service spreads them at random; a replica that is down or draining loses its
connections' next requests to the others.

When Serve listens on every interface (``host="0.0.0.0"``) the side listeners are left as Ray
wrote them. A configuration with a wildcard listener this file does not know is refused (exit 1,
one line in HAProxy's stderr log): a newer template must be looked at, not served blindly.

Standard library only, and run as a file (not ``-m``): it sits on HAProxy's start-up path.
"""

from __future__ import annotations

import os
import re
import sys

_FRONTEND = re.compile(r"^frontend http_frontend\n[ \t]+bind (\S+):(\d+)[ \t]*$", re.MULTILINE)
_SIDE_LISTENERS = re.compile(
    r"^((?:frontend prometheus|listen stats)\n[ \t]+bind )\*?:(\d+)[ \t]*$", re.MULTILINE
)
_WILDCARD_BIND = re.compile(r"^[ \t]+bind (?:\*|0\.0\.0\.0|::|\[::\])?:\d+", re.MULTILINE)
_SOCKET_MODE = re.compile(r"^([ \t]*stats socket \S+ mode )666\b", re.MULTILINE)
_ERROR_FILES = re.compile(r"^([ \t]*errorfile 50[234] )\S+[ \t]*$", re.MULTILINE)
_BUFSIZE = re.compile(r"^([ \t]*tune\.bufsize )(\d+)[ \t]*$", re.MULTILINE)
BUFFER_REQUEST = "    option http-buffer-request\n"
"""In the HTTP frontend (not gRPC's, whose streams must flow): HAProxy receives a request's whole
body (up to its buffer) before it picks a replica. Without it, a body that arrives after the
headers goes out unbuffered and ``retry-on`` cannot replay it (HAProxy keeps a copy for L7
retries only of a request complete when first sent)."""
MIN_BUFSIZE = 32768
"""HAProxy's buffer (Ray writes 16384, of which 1024 are kept for rewrites): room for the
endpoint's 16 KiB header limit, so that the endpoint answers oversized headers itself (431)."""


_BODY = b'{"error": "no model replica could answer (one stopped or is starting): retry shortly"}'
UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)
"""HAProxy's answer when it has no replica to give a request to (an ``errorfile``)."""


class UnsafeConfig(ValueError):
    """The configuration has a listener on every interface that this file does not rewrite."""


FRESH = "-fresh"
"""Suffix of the copy of an application's backend that never reuses a connection to a replica."""
_USE_BACKEND = re.compile(r"^([ \t]+)use_backend (\S+) if (is_\S+)[ \t]*$", re.MULTILINE)
_CHECKED_SERVER = re.compile(r"^([ \t]+server (\S+) \S+) check\b.*?( backup)?[ \t]*$")
_PARTIAL = (
    "    # lepton_ray: a request HAProxy does not hold whole (body past its buffer, or chunked)\n"
    "    # cannot be replayed; it goes out on a fresh connection, so that if its replica dies it\n"
    "    # still gets an answer (HAProxy closes a reused connection's client without one).\n"
    "    http-request set-var(txn.lepton_body_size) req.body_size\n"
    "    acl lepton_partial req.body_len,sub(txn.lepton_body_size) lt 0\n"
    "    acl lepton_partial req.hdr(transfer-encoding) -m found\n"
)


def _app_backend(section: str) -> str | None:
    """The name of the backend ``section`` when it is one of Ray's application backends (it
    reuses connections to its replicas and health-checks every server), else None."""
    head, _, body = section.partition("\n")
    if not head.startswith("backend "):
        return None
    servers = [ln for ln in body.splitlines() if ln.strip().startswith("server ")]
    if "http-reuse always" not in body or not servers:
        return None
    if not all(_CHECKED_SERVER.match(ln) for ln in servers):
        return None
    return head.split()[1]


STICKY = "    balance hash src_port\n    hash-type consistent\n"
"""How an application backend picks a replica instead of Ray's ``leastconn`` per request: by the
client connection (its source port, consistently hashed), so a connection's requests all go to
one replica. Connections to the replicas stay pooled (``http-reuse always``), a replica that
leaves the ring moves only its own connections, and a retry avoids the replica that failed.
(Not HAProxy's bounded-load ``hash-balance-factor``: with few requests in flight it leaves
some replicas no slot, so an idle connection's requests moved between replicas.)"""


def sticky_connections(config: str) -> str:
    """``config`` where each of Ray's application backends sends every request of a client
    connection to one replica (:data:`STICKY`), instead of balancing each request.

    Why: at concurrency 1 a client's requests otherwise went round the replicas, each request to
    another process (on a shared GPU, another CUDA context). A replica that is down, in
    maintenance or draining leaves the ring (its connections' requests go to the next replica),
    and a request that fails is retried elsewhere as before (``retry-on``, ``redispatch``).
    """
    sections = re.split(r"(?m)^(?=\S)", config)
    return "".join(
        section.replace("    http-reuse always\n", "    http-reuse always\n" + STICKY, 1)
        if _app_backend(section)
        else section
        for section in sections
    )


def fresh_connections_for_partial_requests(config: str) -> str:
    """``config`` where a request HAProxy cannot replay goes to a copy of its application's
    backend (``<name>-fresh``) that opens a new connection to the replica for every request.

    Why: HAProxy answers nothing, and closes the client's connection, when a request that went
    out on a reused connection to a replica fails (the replica was killed): its rule for
    keep-alive failures, so that the client retries. A request it holds whole it replays
    instead (``retry-on``, :data:`BUFFER_REQUEST`), on another replica or Serve's fallback
    proxy; one with a body past the buffer it cannot. On a connection of its own, such a request
    gets HAProxy's error, which :func:`localize` makes the endpoint's JSON 503.

    The copy has the backend's servers, tracking their health checks, and closes each
    connection after its response (``option http-server-close``); only backends that reuse
    connections and whose every server is health-checked are copied (Ray's application
    backends). Ray's own bookkeeping reads only the backends it wrote.
    """
    sections = re.split(r"(?m)^(?=\S)", config)  # each section, its indented lines with it
    out, copied = [], set()
    for section in sections:
        out.append(section)
        name = _app_backend(section)
        if name is None:
            continue
        lines = section.partition("\n")[2].splitlines()
        copy = [f"backend {name}{FRESH}", "    option http-server-close"]
        for line in lines:
            word = line.strip().split(" ", 1)[0]
            if word in ("", "#", "http-reuse", "http-check", "default-server") or (
                line.strip().startswith("option httpchk")
            ):
                continue
            server = _CHECKED_SERVER.match(line)
            if server:
                line = f"{server.group(1)} track {name}/{server.group(2)}{server.group(3) or ''}"
            copy.append(line)
        out.append("\n".join(copy) + "\n")
        copied.add(name)
    config = "".join(out)

    def route(m: re.Match) -> str:
        indent, name, acl = m.groups()
        if name not in copied:
            return m.group(0)
        return f"{indent}use_backend {name}{FRESH} if {acl} lepton_partial\n{m.group(0)}"

    config = _USE_BACKEND.sub(route, config)
    first = re.search(rf"^[ \t]+use_backend \S+{FRESH} ", config, re.MULTILINE)
    if first is not None:  # the ACL before the first rule that names it
        config = config[: first.start()] + _PARTIAL + config[first.start() :]
    return config


def localize(config: str, error_file: str | None = None) -> str:
    """``config`` with the Prometheus and stats listeners on the HTTP frontend's host, the admin
    socket mode 600, a buffer of at least :data:`MIN_BUFSIZE`, request bodies buffered
    (:data:`BUFFER_REQUEST`), client connections kept on one replica (:func:`sticky_connections`)
    and, given ``error_file`` (holding :data:`UNAVAILABLE`), HAProxy's
    502, 503 and 504 answered from it.

    >>> cfg = "frontend prometheus\\n    bind :9101\\nfrontend http_frontend\\n    bind 127.0.0.1:8000"
    >>> localize(cfg).splitlines()[1]
    '    bind 127.0.0.1:9101'
    """
    config = _SOCKET_MODE.sub(r"\g<1>600", config)
    if BUFFER_REQUEST not in config:
        config = _FRONTEND.sub(lambda m: m.group(0) + "\n" + BUFFER_REQUEST.rstrip("\n"), config)
        config = sticky_connections(fresh_connections_for_partial_requests(config))
    config = _BUFSIZE.sub(lambda m: f"{m.group(1)}{max(int(m.group(2)), MIN_BUFSIZE)}", config)
    if error_file is not None:
        config = _ERROR_FILES.sub(lambda m: m.group(1) + error_file, config)
    frontend = _FRONTEND.search(config)
    if frontend is None:
        raise UnsafeConfig("no 'frontend http_frontend' bind line: cannot tell the serving host")
    host = frontend.group(1)
    if host in ("*", "0.0.0.0", "::", "[::]"):
        return config  # Serve itself listens on every interface: so may its side listeners
    config = _SIDE_LISTENERS.sub(lambda m: f"{m.group(1)}{host}:{m.group(2)}", config)
    left = _WILDCARD_BIND.search(config)
    if left is not None:
        raise UnsafeConfig(f"a listener on every interface that is not rewritten: {left.group(0)}")
    return config


def main(argv: list[str]) -> None:
    """``haproxy_local.py REAL_HAPROXY ARGS...``: exec the real HAProxy on a localized copy of
    the ``-f`` configuration, with ARGS otherwise unchanged."""
    real, args = argv[1], list(argv[2:])
    if "-f" in args and args.index("-f") + 1 < len(args):
        at = args.index("-f") + 1
        error_file = f"{args[at]}.503.http"
        with open(error_file, "wb") as f:
            f.write(UNAVAILABLE)
        with open(args[at]) as f:
            try:
                text = localize(f.read(), error_file)
            except UnsafeConfig as exc:
                print(
                    f"lepton_ray haproxy_local: refusing to start HAProxy: {exc}", file=sys.stderr
                )
                sys.exit(1)
        local = f"{args[at]}.local"
        with open(f"{local}.tmp", "w") as f:
            f.write(text)
        os.replace(f"{local}.tmp", local)
        args[at] = local
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main(sys.argv)
