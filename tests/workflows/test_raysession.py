"""A Ray that `sae` starts itself listens on 127.0.0.1 only (every server of every Ray process, metrics
export included) and keeps token auth on. Runs in a fresh process: the test session's own Ray is
started by fixtures, not by ensure_ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, time, psutil, ray
from workflows.raysession import ensure_ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
ensure_ray()
node = ray._private.worker._global_node
session = node.get_session_dir_path()
ray.get(ray.remote(lambda: 1).remote())  # a worker process is running too
time.sleep(2)  # the dashboard agent opens its metrics port after the raylet
procs = {psutil.Process()} | set(psutil.Process().children(recursive=True))
procs |= {p for p in psutil.process_iter(["cmdline"]) if any(session in a for a in (p.info["cmdline"] or []))}
listening = set()
for p in procs:
    try:
        listening |= {(c.laddr.ip, p.name()) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print(json.dumps({"node_ip": node.node_ip_address, "listening": sorted(listening), "token": is_token_auth_enabled()}))
ray.shutdown()
"""


def test_a_ray_started_by_sae_listens_on_loopback_only_with_token_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["HOME"] = str(tmp_path)  # Ray writes the generated token to ~/.ray/auth_token
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["node_ip"] == "127.0.0.1"
    names = {name for _, name in result["listening"]}
    assert {"gcs_server", "raylet"} <= names, result  # the probe saw Ray's own servers
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in result["listening"]), result["listening"]
    assert result["token"] is True
