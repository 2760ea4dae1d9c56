"""``stage=explore``: a local, read-only web app to browse a run or a sweep (every image in
a grid and a table; sort, filter, search, presets; an image's overlays across layers,
methods and jobs with its metrics and curves). Starlette served by uvicorn, bound to
127.0.0.1 by default; the page calls the same JSON API as scripts (``/api/images``,
``/api/overlay``, ``/api/image``, ``/api/photo``, ``/api/meta``). No torch.
"""

from __future__ import annotations

import logging
import socket
import threading
import webbrowser
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .app import create_app
from .source import Source

log = logging.getLogger(__name__)

__all__ = ["Source", "create_app", "serve"]


def serve(root: str | Path, cfg: Any = None) -> None:
    """Open ``root`` (a run or multirun folder), print ``explore -> http://HOST:PORT/`` and
    serve until interrupted. ``cfg``: the ``explore`` config (host, port, open)."""
    import uvicorn

    host = str(getattr(cfg, "host", None) or "127.0.0.1")
    port = int(getattr(cfg, "port", 0) or 0)
    src = Source(root)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"explore cannot listen on {host}:{port} ({e.strerror}); pick another "
                          "explore.port, or 0 for any free one") from e
    sock.listen(128)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    # The Host header must name this machine (no DNS rebinding); any, when serving a network.
    hosts = ["*"] if host in ("0.0.0.0", "::") else list(dict.fromkeys(
        [host, "127.0.0.1", "localhost"]))
    app = create_app(src, hosts=hosts)
    for line in src.warnings:
        log.warning("explore: %s", line)
    print(f"explore -> {url}", flush=True)
    if getattr(cfg, "open", False):
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        src.close()


def explore_stage(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """``stage=explore``: serve ``run_dir`` until interrupted."""
    if not cfg.get("run_dir"):
        raise ConfigError("stage=explore needs run_dir=<a run folder or a multirun folder>")
    serve(run_dir, cfg.explore)
    return {}
