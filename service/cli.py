"""``reward-serve``: parse flags and REWARD_* variables into :class:`ServeSettings`, run uvicorn with the app.

Shutdown on SIGTERM (or Ctrl-C) is graceful: /readyz turns 503 and new scoring requests get 503 at once, every
accepted request is finished and answered, then the server stops and the process exits 0, all within
``--drain-timeout-s``. A second signal stops waiting.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.lifecycle import Lifecycle, Phase
from service.settings import ServeSettings

logger = logging.getLogger("reward.service")


class DrainingServer(uvicorn.Server):
    """uvicorn, but a shutdown signal first drains: the listener stays open (answering 503) until every accepted
    request is answered, and the signal is not re-raised afterwards, so a clean drain exits 0. The drain timeout
    bounds it all: near its end (:attr:`Lifecycle.past_last_call`) what still waits for a forward is refused with
    503 (``refuse_waiting``), and uvicorn's own graceful shutdown gets only the time that is left."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, refuse_waiting: Callable[[], None] = lambda: None):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.refuse_waiting = refuse_waiting
        self._refused = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.phase is not Phase.FAILED and self.lifecycle.begin_drain():
            logger.info(
                "received %s: draining %d accepted request(s) (at most %.0f s)",
                signal.Signals(sig).name,
                self.lifecycle.accepted,
                self.lifecycle.drain_time_left(),
            )
            return
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True  # a second signal: stop waiting for the drain

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.lifecycle.phase is Phase.FAILED:
            return True
        if self.lifecycle.past_last_call and not self._refused:
            self._refused = True
            self.refuse_waiting()
        if self.lifecycle.drained:
            if self.lifecycle.accepted:
                logger.error("drain timeout: %d request(s) still unanswered", self.lifecycle.accepted)
            return True
        return False

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's graceful shutdown gets what is left of the one drain timeout, not a second one
        self.config.timeout_graceful_shutdown = max(0.1, self.lifecycle.drain_time_left())
        await super().shutdown(sockets)


def parse_settings(argv: Sequence[str] | None = None) -> ServeSettings:
    args = list(sys.argv[1:] if argv is None else argv)
    return ServeSettings(_cli_parse_args=args)  # type: ignore[call-arg]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        print(f"reward-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    for name, path in settings.components:
        if not Path(path).is_dir():
            named = f"{name}={path}" if name is not None else path
            if "," in path and all(Path(part).is_dir() for part in path.split(",")):  # --model /a --model /b
                print(f"reward-serve: several --model given ({path}): name every one as NAME=PATH", file=sys.stderr)
                return 2
            print(f"reward-serve: --model {named}: no such checkpoint folder", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    app = create_app(settings)
    runtime = app.state.runtime
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        log_config=None,  # keep the logging configured above
    )
    server = DrainingServer(config, runtime.lifecycle, runtime.refuse_waiting)
    logger.info("reward-serve settings: %s", settings.public_dict())
    server.run()
    code = 0
    if runtime.lifecycle.failure is not None:
        logger.error("exiting: %s", runtime.lifecycle.failure)
        code = 1
    if not settings.opentelemetry:  # (its exporters flush at interpreter exit)
        # Every request is answered and the logs flushed: the interpreter's teardown of torch and the model (seconds
        # on a busy machine) would only count against the drain timeout.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
