"""The cluster recipes that cannot run here are checked as far as this machine allows:
the KubeRay RayJob's entrypoint parses with xfer's own CLI parser, the Ray cluster
launcher YAML passes Ray's own schema, and every shell script is valid bash."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def test_rayjob_entrypoint_parses_with_xfers_parser():
    from tune.cli import cmd_tune
    from xfer.cli import build_parser

    doc = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "xfer"
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_tune and args.address == "auto" and args.storage.startswith("s3://")
    assert args.store.startswith("s3://") and args.name == doc["metadata"]["name"]
    # every container that talks to Ray gets the token from the Secret, never a literal
    spec = doc["spec"]
    pods = [spec["submitterPodTemplate"], spec["rayClusterSpec"]["headGroupSpec"]["template"],
            *[g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_bad_entrypoint_would_fail_the_parser(capsys):
    from xfer.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--n_trials", "many"])


def test_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text()))  # as `ray up` does
    validate_config(config)
    assert config["provider"]["type"] == "local"
    with pytest.raises(Exception):
        validate_config(prepare_config({**yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text()),
                                        "max_workers": "two"}))


@pytest.mark.parametrize("script", ["local_cluster.sh", "slurm_ray.sbatch"])
def test_scripts_are_valid_bash(script):
    r = subprocess.run(["bash", "-n", str(CLUSTER / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_local_cluster_usage_errors(tmp_path):
    sh = str(CLUSTER / "local_cluster.sh")
    r = subprocess.run([sh, "start", "--bogus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
    r = subprocess.run([sh, "status", "--dir", str(tmp_path / "none")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "no cluster in" in r.stderr
    r = subprocess.run([sh, "kill-node", "--dir", str(tmp_path / "none")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "worker number" in r.stderr
