"""``difflab serve``: a local web app over the run folders, converted folders and cascade files named on its
command line (docs/serve.md). Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install 'difflab[serve]'``.

- :mod:`difflab.serve.models`: the served models (and noisy classifiers) by name, and the inputs each takes;
- :mod:`difflab.serve.validate`: a request checked against its bounds and its model before it is queued;
- :mod:`difflab.serve.jobs`: the queue, one job at a time per model, cancellable at every sampling step;
- :mod:`difflab.serve.sampling`: a job's work through :func:`difflab.generate.draw_samples`, and its command;
- :mod:`difflab.serve.gallery`: the results on disk;
- :mod:`difflab.serve.app`: the routes; ``static/``: the page (plain HTML, JS and CSS).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

__all__ = ["serve", "is_loopback", "LOOPBACK_HOSTS"]

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (0 = a free port), got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e} (--port 0 picks a free port)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(paths, *, host: str = "127.0.0.1", port: int = 8000, gallery: str | os.PathLike = "difflab-gallery",
          limits=None, log_level: str = "warning") -> None:
    """Serve ``paths`` (run folders, converted folders, cascade files, noisy classifiers) until interrupted.
    Everything is checked before the port is opened; a host other than loopback prints a warning."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"difflab serve needs the serve extra ({e.name} is missing): pip install 'difflab[serve]'") \
            from None
    from difflab.serve.app import create_app
    from difflab.serve.gallery import Gallery
    from difflab.serve.models import Registry

    registry = Registry(list(paths))
    results = Gallery(gallery)
    loopback = is_loopback(host)
    app = create_app(registry, results, limits, allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    sock = _bind(host, port)
    actual = sock.getsockname()[1]
    if not loopback:
        print(f"difflab: warning: serving on {host}, not loopback: anyone who can reach port {actual} of this "
              "machine can run the models, fill its CPU and read and delete the gallery (no login, no TLS); the "
              "default --host 127.0.0.1 serves this machine only", file=sys.stderr, flush=True)
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = ", ".join(registry.models) + (f"; classifiers: {', '.join(registry.classifiers)}"
                                          if registry.classifiers else "")
    print(f"difflab serve: http://{shown}:{actual}/ (models: {names}; gallery: {results.root})", flush=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
