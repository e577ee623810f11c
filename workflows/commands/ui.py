"""`sae ui`: the MLflow UI for the configured tracking store, bound to 127.0.0.1; with --experiment, the
direct link to that experiment's runs table (MLflow 3 otherwise opens experiments on a GenAI overview)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from workflows.errors import UserError
from workflows.options import add_mlflow_uri_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the tracking store")
    p.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000)")
    p.add_argument("--experiment", help="print the direct link to this experiment's runs table")
    add_mlflow_uri_flag(p)
    p.set_defaults(func=run)


def server_command(uri: str, port: int) -> list[str]:
    from workflows.tracking import _artifact_root

    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    root = _artifact_root(uri)
    if root:  # a local store: experiments made in the UI keep artifacts beside the database, as ours do
        command += ["--default-artifact-root", root, "--no-serve-artifacts"]
    return command


def stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from workflows.tracking import resolve_tracking_uri

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    uri = resolve_tracking_uri(args.mlflow_uri)
    if not uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        raise UserError(f"`sae ui` serves a database store; {uri!r} is not one (a remote server has its own UI)")
    link = runs_link(uri, args.experiment, args.port)
    # The server runs uvicorn (and maybe job workers) as children: its own process group lets us stop all of them.
    # MLflow's job executor serves GenAI features an SAE store does not use; off unless asked for.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = subprocess.Popen(server_command(uri, args.port), env=env, start_new_session=True)
    # A plain SIGTERM would end this process and orphan the server: turn it into an orderly stop.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port}  (Ctrl-C to stop)", flush=True)
    if link:
        print(f"runs of experiment {args.experiment!r}: {link}", flush=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(server)


def runs_link(uri: str, experiment: str | None, port: int) -> str | None:
    """The experiment's runs-table link on this UI (checked before the server starts); None without one."""
    from workflows.links import runs_view_url

    return runs_view_url(uri, experiment, local_ui=f"http://127.0.0.1:{port}") if experiment else None


def stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it has not exited in 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue
