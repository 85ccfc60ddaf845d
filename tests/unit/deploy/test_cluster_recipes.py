"""The cluster recipes in deploy/cluster/ (and deploy/runtime_env.yaml) hold together: they parse,
the launcher file passes Ray's own schema, the RayJob runs a run file of this repository that
validates, and both offer the GPUs and the shared run directory that run needs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from common import config as config_lib
from common import config_loading
from deploy.launch import plan

ROOT = Path(__file__).resolve().parents[3]
CLUSTER = ROOT / "deploy" / "cluster"
REFERENCE = ROOT / "deploy" / "configs" / "pythia-410m.yaml"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def gpus_needed(run_file: Path) -> int:
    return int(sum(b.get("GPU", 0) for b in plan(config_loading.load(run_file)).bundles))


def test_reference_run_file_validates_without_a_gpu():
    cfg = config_loading.load(REFERENCE)
    assert config_lib.validate(cfg) == []
    assert cfg.model.name == "EleutherAI/pythia-410m-deduped"
    assert cfg.rollout.rewards == ("explicit_pos",)
    assert cfg.cluster.device == "gpu" and gpus_needed(REFERENCE) == 3


def test_cluster_launcher_file_passes_rays_schema():
    import jsonschema
    import ray.autoscaler

    (launcher,) = load_all(CLUSTER / "ray-cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)  # what `ray up` checks first
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    assert types[launcher["head_node_type"]]["resources"].get("GPU", 0) == 0  # no GPU work there
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    started = sum(t["resources"]["GPU"] * t.get("min_workers", 0) for t in gpu_types)
    assert started >= gpus_needed(REFERENCE)
    assert sum(t.get("min_workers", 0) for t in types.values()) <= launcher["max_workers"]
    assert ".venv" in launcher["rsync_exclude"]


def test_rayjob_runs_a_valid_run_file_on_enough_gpus_with_a_shared_run_dir():
    job, claim = load_all(CLUSTER / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True

    words = shlex.split(spec["entrypoint"])
    train = words.index("deploy.train")
    assert words[train - 2 : train] == ["python", "-m"]
    run_file = ROOT / words[train + 1]
    assert run_file.is_file(), f"the entrypoint's run file {run_file} is not in the repository"
    assert config_lib.validate(config_loading.load(run_file)) == []
    run_dir = words[words.index("--run-dir") + 1]
    assert run_dir.startswith("/")

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]

    def limit(group: dict, key: str) -> int:
        (container,) = group["template"]["spec"]["containers"]
        return int(container.get("resources", {}).get("limits", {}).get(key, 0))

    assert limit(head, "nvidia.com/gpu") == 0
    gpus = sum(g["minReplicas"] * limit(g, "nvidia.com/gpu") for g in groups)
    assert gpus >= gpus_needed(run_file)

    # The run directory is on the claim's volume in the head (the driver) and in every worker
    # (the learner's pod).
    for pod in [head, *groups]:
        spec_ = pod["template"]["spec"]
        volumes = {v["name"] for v in spec_["volumes"] if
                   v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]}
        (container,) = spec_["containers"]
        mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in volumes]
        assert any(run_dir.startswith(m.rstrip("/") + "/") for m in mounts), pod
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_runtime_env_keeps_the_venv_and_runs_out_of_the_upload():
    env = yaml.safe_load((ROOT / "deploy" / "runtime_env.yaml").read_text())
    assert set(env) <= {"excludes", "env_vars", "pip", "uv", "conda", "py_modules", "working_dir"}
    for heavy in (".venv/", ".git/", "runs/", "wandb/"):
        assert heavy in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray refuses other types


def test_every_run_file_validates():
    for run_file in sorted((ROOT / "deploy" / "configs").glob("*.yaml")):
        assert config_lib.validate(config_loading.load(run_file)) == [], run_file.name


# Recipe, its model's shape (the hub config.json's sizes, without the download), the memory of
# the GPUs it is written for.
SHARDED = [("pythia-1.4b.yaml", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=8192, vocab_size=50304), 1.41e9, 24),
           ("pythia-6.9b.yaml", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                     intermediate_size=16384, vocab_size=50432), 6.86e9, 80)]


@pytest.mark.parametrize(("name", "shape", "params", "gpu_gb"), SHARDED)
def test_a_sharded_recipe_fits_its_learner_state_on_its_gpus(name, shape, params, gpu_gb):
    """Float32 weights, gradients and two AdamW moments (16 bytes a parameter) outgrow one of
    the recipe's GPUs: its ranks must bring each GPU's share under 40% of it, leaving room for
    activations. The parameter count comes from transformers (on the meta device)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    run_file = ROOT / "deploy" / "configs" / name
    cfg = config_loading.load(run_file)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**shape, rotary_pct=0.25))
    counted = sum(p.numel() for p in model.parameters())
    assert counted == pytest.approx(params, rel=0.01)
    state_gb = 16 * counted / 1e9
    assert state_gb > 0.4 * gpu_gb  # the precondition: one rank would not do
    assert state_gb / cfg.learner.num_ranks < 0.4 * gpu_gb
    assert cfg.learner.num_gpus == 1 and gpus_needed(run_file) == 8  # one node of eight
