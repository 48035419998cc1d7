"""``placerank serve``: the app under uvicorn. The model, index and local-feature store are
loaded before the socket opens; the startup line prints the URL (the real port with ``--port 0``);
SIGINT / SIGTERM stop accepting, finish the requests in flight, then close the database."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys

from placerank.errors import PlaceRankError
from placerank.serve.service import LocalizeService, ServeConfig


def _check_installed() -> None:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise PlaceRankError(f"placerank serve needs the serve extra: pip install 'placerank[serve]' ({e})") from None


def check_host(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        print(
            f"placerank serve: warning: listening on {host}: anyone who can reach this address can query the "
            "database (put it behind a proxy with TLS for the write endpoints)",
            file=sys.stderr,
        )


def serve(config: ServeConfig, log=print) -> int:
    _check_installed()
    import uvicorn

    from placerank.serve.app import create_app

    check_host(config.host)
    log(f"placerank serve: loading {config.db} ...")
    service = LocalizeService(config, log=log)
    app = create_app(service)
    info = service.info

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown (exit -15 / a
            # KeyboardInterrupt); here a signal is the normal way to stop: exit status 0.
            with super().capture_signals():
                yield
                stopped_by = list(self._captured_signals)
                self._captured_signals.clear()
            if stopped_by:
                log(f"placerank serve: {signal.Signals(stopped_by[0]).name}: finished the requests in flight")

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.should_exit or not self.servers:
                return
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in str(host) else host
            log(
                f"placerank serve: http://{shown}:{port}/ ({info['database']}: {info['database_size']} photos, "
                f"{info['model']}{', rerank ' + config.rerank if config.rerank else ''}; "
                f"writes {'enabled' if service.token else 'disabled'}; precision {info['precision']}, "
                f"compile {info['compile']}); Ctrl-C to stop",
            )
            sys.stdout.flush()

    server = Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=30,
        )
    )
    logging.getLogger("placerank.serve").setLevel(logging.INFO)
    try:
        server.run()
    finally:
        if not server.started:  # the socket never opened (port taken...): lifespan did not close it
            service.close()
    if not server.started:
        raise PlaceRankError(f"cannot listen on {config.host}:{config.port} (is the port in use?)")
    log("placerank serve: stopped")
    return 0
