"""The torchx component: AppDef construction (no launch) and one real ``torchx run -s local_cwd``
of 2 gloo ranks on a slice of MovieLens-100k (3 steps, then Recall@K on gathered embeddings)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.components import train

ROOT = Path(__file__).resolve().parents[1]


def test_component_single_host_uses_a_free_rendezvous_port() -> None:
    app = train("train.max_steps=3", nproc_per_node=2, config="configs/movielens_100k.toml",
                sharding_types="table_wise,column_wise", max_restarts=2, eval=True)  # fmt: skip
    (role,) = app.roles
    cmd = role.args[1]
    assert role.entrypoint == "bash" and role.num_replicas == 1
    assert "--rdzv_endpoint localhost:0" in cmd and "--nproc_per_node 2" in cmd
    assert "--max_restarts 2" in cmd and "-m launch.train_dist" in cmd
    assert "--sharding-types table_wise,column_wise" in cmd and "--eval" in cmd
    assert cmd.endswith("train.device=cpu train.max_steps=3")


def test_component_multi_host_and_gpu() -> None:
    app = train(nnodes=2, nproc_per_node=8, device="cuda", max_retries=3, image="repo/st:1")
    (role,) = app.roles
    assert role.num_replicas == 2 and role.max_retries == 3 and role.image == "repo/st:1"
    assert role.resource.gpu == 8  # one GPU per rank
    # bash expands the first host's address exported by the scheduler (torchx macro rank0_env)
    assert "--rdzv_endpoint $${${rank0_env}:=localhost}:29500" in role.args[1]


def _dryrun(scheduler: str, cfg: dict):
    """torchx's dry run of the 2-host GPU job on ``scheduler``: what it would submit (no cluster)."""
    from torchx.runner import get_runner

    app = train(nnodes=2, nproc_per_node=8, device="cuda", gpu=8, max_restarts=2, image="repo/st:1",
                checkpoint_dir="/shared/ckpt", python="/shared/st/.venv/bin/python")
    with get_runner() as runner:
        return runner.dryrun(app, scheduler, cfg=cfg)


def test_same_component_on_slurm_without_code_changes() -> None:
    script = str(_dryrun("slurm", {"partition": "gpu", "time": "04:00:00"}))
    # one heterogeneous group per host, 8 GPUs each, the partition and time limit passed through
    assert script.count("#SBATCH --job-name=trainer-") == 2 and "#SBATCH hetjob" in script
    assert "--partition=gpu --time=04:00:00" in script and "--gpus-per-task=8" in script
    # every host runs torchrun meeting at the first host's address, then the entry point on nccl
    assert script.count("--rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500") == 2
    assert script.count("/shared/st/.venv/bin/python -m torch.distributed.run") == 2
    assert "--nnodes 2 --nproc_per_node 8 --max_restarts 2" in script
    assert "-m launch.train_dist" in script and "--checkpoint-dir /shared/ckpt train.device=cuda" in script


def test_same_component_on_kubernetes_without_code_changes() -> None:
    import re

    pytest.importorskip("kubernetes")  # requirements/cpu.txt installs it; the client only, no cluster
    job = _dryrun("kubernetes", {"queue": "default", "namespace": "ml"}).request.resource
    # a Volcano job in the queue, one task (pod) per host, each with the image and 8 GPUs
    assert job["kind"] == "Job" and job["spec"]["schedulerName"] == "volcano" and job["spec"]["queue"] == "default"
    tasks = job["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["trainer-0", "trainer-1"]
    for task in tasks:
        (container,) = task["template"].spec.containers
        assert container.image == "repo/st:1" and container.resources.limits["nvidia.com/gpu"] == "8"
        cmd = container.command[-1]
        # torchrun on every host, meeting at the first host's address that the scheduler exports
        assert re.search(r"--rdzv_endpoint \$\{\w+:=localhost\}:29500 ", cmd), cmd
        assert "--nnodes 2 --nproc_per_node 8 --max_restarts 2" in cmd
        assert "-m launch.train_dist" in cmd and cmd.endswith("train.device=cuda")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "tpu"}, "device must be"),
        ({"nproc_per_node": 0}, "must be >= 1"),
        ({"resume": "maybe"}, "resume must be"),
        ({"table_lr": -1.0}, "table_lr must be"),
    ],
)
def test_component_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train(**kwargs)


def _movielens_or_skip() -> None:
    from silvertorch.data.fetch import movielens_100k_dir

    if not (movielens_100k_dir() / "ml-100k.inter").is_file():
        pytest.skip("MovieLens-100k is not fetched (`make data`)")


def test_torchx_local_cwd_launch_trains_two_gloo_ranks(tmp_path: Path) -> None:
    _movielens_or_skip()
    torchx = Path(sys.executable).with_name("torchx")
    if not torchx.is_file() and shutil.which("torchx") is None:
        pytest.skip("the torchx CLI is not installed in this environment")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    out_dir = tmp_path / "run"
    cmd = [
        str(torchx if torchx.is_file() else "torchx"), "run", "-s", "local_cwd",
        "launch/components.py:train", "--nproc_per_node", "2",
        "--config", "configs/movielens_100k.toml", "--table_optimizer", "adagrad",
        "--table_lr", "0.05", "--eval", "True", "--",
        "train.max_steps=3", "data.max_users=60", "train.batch_size=128",
        f"train.out_dir={out_dir}", "train.progress=false", "joint.enabled=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "done: step 3, epoch 0, world size 2" in log, log[-4000:]
    assert "eval: recall@10=" in log
    ckpt = out_dir / "dcp" / "step_000000003"
    assert (ckpt / ".metadata").is_file() and (ckpt / "meta.json").is_file()
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
