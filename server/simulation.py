"""The Flower backend of ``fedmerge simulate``.

The ServerApp and ClientApps in Flower's simulation runtime (Ray).

:func:`flower_backend` runs :func:`fedmerge.pipeline.execute` in a ServerApp next to one
ClientApp per party, with Flower's and Ray's own output hidden unless asked for
(:func:`runtime_output`), SIGTERM left to fedmerge (:func:`ray_keeps_sigterm_handler`) and an
immediate, clean exit after Ctrl-C (:func:`leave_after_interrupt`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, cast

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmerge.errors import FedmergeError
from fedmerge.protocol import FederationConfig
from server.app import StoppableGrid, reply_logger, run_federation

if TYPE_CHECKING:
    from fedmerge.pipeline import RoundResult
    from fedmerge.runs.rundir import RunDir


def server_app(config: FederationConfig, holder: dict) -> ServerApp:
    """A ServerApp that runs `config` via :func:`fedmerge.pipeline.execute`.

    Its outcome goes into `holder`.

    ``holder["stop"]`` (a ``threading.Event``) ends its waits for the parties (see
    :class:`StoppableGrid`).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            watched = StoppableGrid(grid, holder["stop"], reply_logger(config, holder["run"].log))
            # a Grid by delegation: StoppableGrid passes everything but the waits to `grid`
            holder["results"] = run_federation(config, cast(Grid, watched), context, holder["run"])
        except BaseException as err:  # noqa: BLE001 - handed back to the caller of run_simulation
            holder["error"] = err

    return app


def flower_backend(
    config: FederationConfig, verbose: bool = False, ray_address: str | None = None
) -> Callable[[RunDir], list[RoundResult]]:
    """A callable for :func:`fedmerge.pipeline.simulate`: the run in Flower's simulation runtime.

    The runtime is Ray: a local one, or the running cluster at `ray_address` (its head's
    ``HOST:PORT``; default: ``RAY_ADDRESS`` if set), whose nodes then host the parties, each with
    ``client_cpus`` / ``client_gpus`` of a node.

    Flower's and Ray's own log lines and warnings are hidden unless `verbose`
    (:func:`runtime_output`); a failure of the runtime itself is raised as one
    :class:`FedmergeError` that quotes Flower's error.
    """
    from flwr.simulation import run_simulation

    from clients.app import app as client_app

    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_ray_address(address)

    def run(run_dir: RunDir) -> list[RoundResult]:
        holder: dict = {"run": run_dir, "stop": threading.Event()}
        backend: dict[str, Any] = {
            "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus}
        }
        run_dir.log(
            "runtime_start", backend="flower", nodes=config.n_parties, ray=address or "local"
        )
        with runtime_output(verbose) as (init_args, errors):
            # "local": a new local Ray, never the last cluster `ray start` made on this machine
            # (Ray's default, even when that cluster is gone: ray.init then waits for it)
            backend["init_args"] = init_args | {"address": address or "local"}
            try:
                with ray_keeps_sigterm_handler():
                    run_simulation(
                        server_app(config, holder),
                        client_app,
                        num_supernodes=config.n_parties,
                        backend_config=backend,
                    )
            except KeyboardInterrupt:
                # the ServerApp's thread stops at its next wait for the parties
                holder["stop"].set()
                raise
            except Exception as err:
                failed = holder.get("error")  # the ServerApp's own error, if it had one
                # the ServerApp's thread may still wait for the parties: it ends at its next wait
                holder["stop"].set()
                if failed is not None:
                    raise failed from None
                raise FedmergeError(
                    "Flower's simulation runtime failed: "
                    f"{_said(errors) or f'{type(err).__name__}: {err}'}; rerun with --verbose to "
                    "see Flower's and Ray's log"
                ) from err
        if "error" in holder:
            raise holder["error"]
        if "results" not in holder:
            raise FedmergeError(
                "the Flower simulation ended without "
                f"results{f' ({_said(errors)})' if errors else ''}; rerun with --verbose to see "
                "Flower's and Ray's log"
            )
        return holder["results"]

    return run


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Refuse a Ray cluster address nothing answers at (Ray itself would wait for it forever).

    `address` is the head's ``HOST:PORT`` (or ``ray://HOST:PORT``); ``auto`` is left to Ray.
    """
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FedmergeError(
            f"Ray address {address!r} is not HOST:PORT; give the head's address as `ray start "
            "--head` prints it, e.g. 10.0.0.1:6379"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise FedmergeError(
            f"no Ray cluster answers at {address} ({err.strerror or err}); start one with `ray "
            f"start --head --port {port}` there, or give its head's address (--ray-address or "
            "RAY_ADDRESS)"
        ) from None


def _said(errors: list[str]) -> str:
    """The first line of Flower's first error message (empty if none)."""
    return next((line.strip() for text in errors for line in text.splitlines() if line.strip()), "")


class _Keep(logging.Handler):
    """Keeps the messages of the records it handles.

    Flower's errors, while its console output is hidden.
    """

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def runtime_output(verbose: bool) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """While inside, Flower's and Ray's own output is hidden (the default) or shown (`verbose`).

    Yields Ray's ``init_args`` for Flower's backend config and a list that collects the messages
    of Flower's errors (to quote in our one-line error). Hidden: Flower's console handler (logger
    ``flwr``, ``flwr/supercore/logger.py``) stops printing, its INFO lines and the deprecation
    warning of ``run_simulation`` included; Ray's driver logs errors only (``logging_level``) and
    its workers' output stays in Ray's session logs (``log_to_driver=False``; ``RAY_DEDUP_LOGS``
    only matters when it is forwarded); warnings raised in Ray's or Flower's modules are ignored.
    Shown: Flower's defaults (INFO, Ray at WARNING, workers' output forwarded), without colour
    codes when stderr is not a terminal. Either way everything is as before on the way out.
    """
    import sys
    import warnings

    from flwr.common.logger import FLOWER_LOGGER, console_handler

    errors: list[str] = []
    if verbose:
        colored, prefix = console_handler.colored, os.environ.get("RAY_COLOR_PREFIX")
        console_handler.colored = sys.stderr.isatty()
        if not sys.stderr.isatty():
            # Ray's "(ClientAppActor pid=...)" prefix without colour codes
            os.environ["RAY_COLOR_PREFIX"] = "0"
        try:
            yield {}, errors
        finally:
            console_handler.colored = colored
            if prefix is None:
                os.environ.pop("RAY_COLOR_PREFIX", None)
            else:
                os.environ["RAY_COLOR_PREFIX"] = prefix
        return
    level, keep = console_handler.level, _Keep(errors)
    console_handler.setLevel(logging.CRITICAL + 1)
    FLOWER_LOGGER.addHandler(keep)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(ray|flwr)(\.|$)")
            yield {"logging_level": "ERROR", "log_to_driver": False}, errors
    finally:
        FLOWER_LOGGER.removeHandler(keep)
        console_handler.setLevel(level)


@contextmanager
def ray_keeps_sigterm_handler() -> Iterator[None]:
    """While inside, Ray's driver leaves the process's SIGTERM handler alone.

    ``ray.init`` installs a SIGTERM handler that exits with ``SystemExit(15)``
    (``ray/_private/worker.py`` lines 1656-1660 in Ray 2.55, in ``init``), and
    starting the head node replaces it by one that kills Ray's processes and exits with
    ``SystemExit(1)`` (``ray/_private/node.py`` lines 527-531, ``_register_shutdown_hooks``).
    Either bypasses :func:`fedmerge.pipeline.simulate`'s handler (SIGTERM as Ctrl-C): the run
    stayed ``running`` and the process aborted (exit 134) on Flower's waiting threads. Both go
    through ``ray._private.utils.set_sigterm_handler``, which does nothing here; Ray's processes
    are stopped by :func:`leave_after_interrupt`, or die with this process (Ray starts them
    with ``PR_SET_PDEATHSIG``).
    """
    import ray._private.utils as ray_utils

    install = ray_utils.set_sigterm_handler  # an AttributeError here: Ray changed, see above
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = install


def leave_after_interrupt(code: int = 130) -> NoReturn:
    """End this process at once after Ctrl-C or SIGTERM stopped a simulation.

    Its record already says ``interrupted``.

    A terminal's Ctrl-C also stops Ray's workers; Flower's runtime threads then wait forever
    for their replies, and a normal exit would wait for those threads. Ray is shut down first.

    Parameters
    ----------
    code : int
        The exit status: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
    """
    import sys

    try:
        # fails when the signal came while Ray was being imported: then nothing of Ray runs yet
        import ray

        ray.shutdown()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
