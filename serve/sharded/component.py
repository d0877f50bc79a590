"""torchx component: ``serve`` launches the sharded server (``python -m serve.sharded.worker``) with
torchrun, one rank per item shard (times the replicas)::

    torchx run -s local_cwd serve/sharded/component.py:serve --artifact out/sharded \\
        --nproc_per_node 2 --port 8000

Every rank loads its part of the sharded artifact; each replica's rank 0 answers HTTP on
``port + replica``. ``max_restarts`` > 0 lets torchelastic restart the whole group when a rank dies
(the leader reports 503 on ``/healthz`` until then). Other schedulers: as ``launch/components.py``.
"""

# no `from __future__ import annotations`: torchx reads the parameter types at runtime

import shlex
from typing import Dict, Optional

import torchx.specs as specs

__all__ = ["serve"]

ENTRY_MODULE = "serve.sharded.worker"


def serve(
    artifact: str,
    plan: Optional[str] = None,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    device: str = "cpu",
    host: str = "0.0.0.0",
    port: int = 8000,
    timeout_s: float = 30.0,
    heartbeat_s: float = 5.0,
    max_batch_size: int = 64,
    max_wait_ms: float = 2.0,
    max_restarts: int = 0,
    port_file: Optional[str] = None,
    state_dir: str = "runs/serve_state",
    compaction_threshold: int = 0,
    image: str = "silvertorch:latest",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    python: str = "python",
) -> specs.AppDef:
    """Sharded retrieval server: one rank per item shard of a sharded artifact.

    Args:
        artifact: sharded artifact directory (``silvertorch export --plan PLAN``).
        plan: refuse the artifact unless it was exported for this plan JSON.
        nnodes: hosts; nproc_per_node: ranks per host (world = shards x replicas).
        device: "cpu" (gloo) or "cuda" (nccl, one GPU per rank).
        host / port: where each replica's leader listens (replica g on port + g).
        timeout_s: collective timeout: a dead rank fails requests within it.
        heartbeat_s: leader ping interval while idle.
        max_batch_size / max_wait_ms: micro-batching of the leader.
        max_restarts: torchelastic restarts of the worker group.
        port_file: the leader writes its bound port there (useful with ``port=0``).
        state_dir: the leader's durable item-update log and every rank's snapshots (replayed at restart).
        compaction_threshold: compact every shard once this many new items or log records came
            since the last snapshot (0 = only on ``POST /v1/admin/compact``).
        image, cpu, gpu, memMB, env, rdzv_port, python: as ``launch/components.py:train``.
    """
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes and nproc_per_node must be >= 1, got {nnodes} and {nproc_per_node}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and gpu < nproc_per_node:
        gpu = nproc_per_node
    endpoint = "localhost:0" if nnodes == 1 else f"$${{{specs.macros.rank0_env}:=localhost}}:{rdzv_port}"
    args = [
        python, "-m", "torch.distributed.run", "--rdzv_backend", "c10d", "--rdzv_endpoint", "@EP@",
        "--rdzv_id", specs.macros.app_id, "--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node),
        "--max_restarts", str(max_restarts), "--tee", "3",
        "-m", ENTRY_MODULE, artifact, "--device", device, "--host", host, "--port", str(port),
        "--timeout-s", str(timeout_s), "--heartbeat-s", str(heartbeat_s),
        "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
        "--state-dir", state_dir, "--compaction-threshold", str(compaction_threshold),
    ]  # fmt: skip
    if plan:
        args += ["--plan", plan]
    if port_file:
        args += ["--port-file", port_file]
    command = " ".join(endpoint if a == "@EP@" else shlex.quote(a) for a in args)
    return specs.AppDef(
        name="silvertorch-serve-sharded",
        roles=[specs.Role(name="server", image=image, entrypoint="bash", args=["-c", command],
                          num_replicas=nnodes, resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB),
                          env={"LOGLEVEL": "WARNING", "PYTHONUNBUFFERED": "1", **(env or {})},
                          port_map={"c10d": rdzv_port, "http": port}, max_retries=0)],
    )
