"""torchx components: ``train`` launches sharded training (``launch/train_dist.py``) with torchrun.

Local (CPU, gloo; the working directory is the "image")::

    torchx run -s local_cwd launch/components.py:train --nproc_per_node 2 \\
        --config configs/movielens_100k.toml [-- section.key=value ...]

The same component runs on other torchx schedulers without code changes: pick the scheduler with
``-s``, give it an image that contains this repository and its environment, and pass the scheduler's
own options with ``-cfg`` (see docs/distributed.md)::

    torchx run -s kubernetes -cfg queue=default,namespace=ml launch/components.py:train \\
        --image registry.example.com/silvertorch:0.1 --nnodes 2 --nproc_per_node 8 --gpu 8 \\
        --device cuda --config configs/movielens_100k.toml --checkpoint_dir /mnt/shared/ckpt
    torchx run -s slurm -cfg partition=gpu,time=02:00:00 launch/components.py:train ...

Restarts: ``max_restarts`` = torchelastic restarts of the whole worker group inside one torchrun
(a rank died: every rank is stopped and started again, resuming from the latest checkpoint);
``max_retries`` = the scheduler relaunching the role (a node was lost). Either way the entry point
resumes (``--resume auto``) with no progress lost beyond the last checkpoint.
"""

# no `from __future__ import annotations`: torchx reads the parameter types at runtime

import shlex
from typing import Dict, Optional

import torchx.specs as specs

__all__ = ["train"]

ENTRY_MODULE = "launch.train_dist"
_ENDPOINT = object()  # placeholder for the rendezvous endpoint in the command


def train(
    *overrides: str,
    config: str = "configs/movielens_100k.toml",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    device: str = "cpu",
    resume: str = "auto",
    sharding_types: Optional[str] = None,
    topology: Optional[str] = None,
    checkpoint_dir: Optional[str] = None,
    timeout_s: float = 300.0,
    table_optimizer: str = "auto",
    table_lr: float = 0.0,
    eval: bool = False,
    export: Optional[str] = None,
    max_restarts: int = 0,
    max_retries: int = 0,
    image: str = "silvertorch:latest",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    python: str = "python",
) -> specs.AppDef:
    """Sharded two-tower training with TorchRec DistributedModelParallel (torchrun per node).

    Args:
        overrides: ``section.key=value`` config overrides (after ``--``).
        config: run config (TOML), a path inside the image / working directory.
        nnodes: hosts (replicas of the role); nproc_per_node: ranks per host.
        device: "cpu" (gloo) or "cuda" (nccl, one GPU per rank).
        resume: "auto" (latest checkpoint if any), "never", "require".
        sharding_types: comma-separated types allowed for every table (default: planner's choice
            among those valid on the device).
        topology: placement-planner topology file for TorchRec's planner.
        checkpoint_dir: DCP root visible to every host (default: train.out_dir/dcp).
        timeout_s: collective timeout; a dead rank fails its peers within this.
        table_optimizer: fused optimizer of the tables ("auto", "adagrad", "rowwise_adagrad",
            "sgd", "adam" (GPU only)); table_lr: its learning rate (0 = the config's).
        eval: Recall@K / NDCG@K after training.
        export: also write the weights as a single-process checkpoint at this path.
        max_restarts: torchelastic restarts of the worker group (torchrun --max-restarts).
        max_retries: scheduler-level retries of the role.
        image: container image with the repository (ignored by local_cwd, which uses the cwd).
        cpu, gpu, memMB, h: resources per host (h: a named host type of the scheduler).
        env: extra environment variables.
        rdzv_port: c10d rendezvous port on the first host (multi-node only; one host uses a free port).
        python: the interpreter inside the image (or the venv's, locally).
    """
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes and nproc_per_node must be >= 1, got {nnodes} and {nproc_per_node}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if resume not in ("auto", "never", "require"):
        raise ValueError(f"resume must be 'auto', 'never' or 'require', got {resume!r}")
    if device == "cuda" and gpu < nproc_per_node:
        gpu = nproc_per_node  # one GPU per rank
    if nnodes == 1:
        endpoint = "localhost:0"  # one agent: torchrun picks a free port
    else:  # the scheduler exports the first host's address as TORCHX_RANK0_HOST (the macro)
        endpoint = f"$${{{specs.macros.rank0_env}:=localhost}}:{rdzv_port}"
    torchrun = [
        python, "-m", "torch.distributed.run",
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", _ENDPOINT,
        "--rdzv_id", specs.macros.app_id,
        "--nnodes", str(nnodes),
        "--nproc_per_node", str(nproc_per_node),
        "--max_restarts", str(max_restarts),
        "--tee", "3",
        "-m", ENTRY_MODULE,
        "--config", config, "--resume", resume, "--timeout-s", str(timeout_s),
    ]  # fmt: skip
    if sharding_types:
        torchrun += ["--sharding-types", sharding_types]
    if topology:
        torchrun += ["--topology", topology]
    if checkpoint_dir:
        torchrun += ["--checkpoint-dir", checkpoint_dir]
    if table_optimizer != "auto":
        torchrun += ["--table-optimizer", table_optimizer]
    if table_lr < 0:
        raise ValueError(f"table_lr must be >= 0 (0 = the config's), got {table_lr}")
    if table_lr > 0:
        torchrun += ["--table-lr", str(table_lr)]
    if eval:
        torchrun.append("--eval")
    if export:
        torchrun += ["--export", export]
    torchrun += [f"train.device={device}", *overrides]
    # bash must expand the multi-node endpoint, so it is the one unquoted word
    command = " ".join(endpoint if a is _ENDPOINT else shlex.quote(a) for a in torchrun)
    role_env = {"LOGLEVEL": "WARNING", "PYTHONUNBUFFERED": "1", **(env or {})}
    return specs.AppDef(
        name="silvertorch-train",
        roles=[
            specs.Role(
                name="trainer",
                image=image,
                entrypoint="bash",
                args=["-c", command],
                num_replicas=nnodes,
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
                env=role_env,
                port_map={"c10d": rdzv_port},
                max_retries=max_retries,
            )
        ],
    )
