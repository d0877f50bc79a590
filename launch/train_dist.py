"""Entry point of one rank of a sharded training job (what torchrun / torchx start per process).

    torchrun --nproc_per_node 2 -m launch.train_dist --config configs/movielens_100k.toml \\
        [section.key=value ...] [--resume auto|never|require] [--sharding-types table_wise,column_wise]
        [--topology configs/topologies/NAME.toml] [--checkpoint-dir DIR] [--keep 2]
        [--table-optimizer auto|adagrad|rowwise_adagrad|sgd|adam] [--table-lr LR]
        [--timeout-s 300] [--eval] [--export runs/NAME/checkpoint.pt]

or through the torchx component ``launch/components.py:train``. Reads RANK / WORLD_SIZE / LOCAL_RANK
/ MASTER_ADDR / MASTER_PORT from the environment. ``--resume auto`` (default) continues from the
latest complete checkpoint when there is one, which is what a torchelastic restart needs.
Exit codes: 0 done, 2 bad config / arguments, 1 unusable checkpoint or a failed peer (the error is
printed with the rank).

Fault-injection hook for tests (``tests/test_distributed_elastic.py``): ``SILVERTORCH_STEP_DELAY_S``
= seconds every rank sleeps after each optimizer step (default 0: off), so that a test can SIGKILL
a rank in the middle of a tiny run. It changes timing only, never what is computed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

__all__ = ["build_parser", "main"]

STEP_DELAY_ENV = "SILVERTORCH_STEP_DELAY_S"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.train_dist", description="one rank of sharded training")
    p.add_argument("--config", required=True, help="TOML run config (configs/*.toml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", choices=["auto", "never", "require"], default="auto")
    p.add_argument("--sharding-types", default=None,
                   help="comma-separated sharding types allowed for every table "
                        "(default: the model-parallel types valid on the device; the planner picks)")  # fmt: skip
    p.add_argument("--topology", default=None, help="placement-planner topology file")
    p.add_argument("--checkpoint-dir", default=None, help="DCP root (default: train.out_dir/dcp)")
    p.add_argument("--keep", type=int, default=2, help="complete checkpoints to keep")
    p.add_argument("--timeout-s", type=float, default=300.0, help="collective timeout (seconds)")
    p.add_argument("--table-optimizer", default="auto",
                   choices=["auto", "adam", "adagrad", "rowwise_adagrad", "sgd"],
                   help="fused optimizer of the embedding tables (auto: the config's where FBGEMM "
                        "has it; Adam is GPU-only)")  # fmt: skip
    p.add_argument("--table-lr", type=float, default=None,
                   help="table learning rate (default: optim.embedding_lr or optim.lr)")
    p.add_argument("--eval", action="store_true", help="Recall@K / NDCG@K after training")
    p.add_argument("--export", default=None,
                   help="also write the weights as a single-process checkpoint here (for "
                        "`silvertorch eval / build-index / export`)")  # fmt: skip
    return p


def step_delay() -> float:
    """Seconds to sleep after each step (``SILVERTORCH_STEP_DELAY_S``, test hook; 0 = off)."""
    raw = os.environ.get(STEP_DELAY_ENV, "").strip()
    try:
        delay = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{STEP_DELAY_ENV} must be a number of seconds >= 0, got {raw!r}") from None
    if not delay >= 0:  # also refuses nan
        raise ValueError(f"{STEP_DELAY_ENV} must be a number of seconds >= 0, got {raw!r}")
    return delay


def _slow_down_steps(seconds: float) -> None:
    """Make every ``DistTrainer.train_step`` of this process sleep ``seconds`` after the step."""
    from train.distributed import DistTrainer

    step = DistTrainer.train_step

    def slowed(self: DistTrainer, batch: object) -> dict[str, float]:
        stats = step(self, batch)
        time.sleep(seconds)
        return stats

    DistTrainer.train_step = slowed  # type: ignore[method-assign]


@record  # torchelastic: the failing rank's traceback goes to the error file and the job summary
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    import torch

    from silvertorch.config import ConfigError
    from silvertorch.distributed.process_group import destroy_distributed, init_distributed
    from train.checkpoint import CheckpointError
    from train.config import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.keep < 1:
        print(f"error: --keep must be >= 1, got {args.keep}", file=sys.stderr)
        return 2
    try:
        delay = step_delay()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if delay > 0:
        _slow_down_steps(delay)
    types = [t.strip() for t in args.sharding_types.split(",")] if args.sharding_types else None
    from train.distributed import DistOptions, train_distributed

    ctx = init_distributed(torch.device(cfg.train.device).type, timeout_s=args.timeout_s)
    try:
        options = DistOptions(sharding_types=types, topology=args.topology,
                              checkpoint_dir=args.checkpoint_dir, keep=args.keep,
                              table_optimizer=args.table_optimizer, table_lr=args.table_lr)  # fmt: skip
        trainer, result = train_distributed(cfg, ctx, resume=args.resume, options=options)
        if ctx.is_main:
            print(f"done: step {result.step}, epoch {result.epoch}, world size {ctx.world_size}, "
                  f"checkpoint {result.checkpoint}", flush=True)  # fmt: skip
        if args.export:
            from train.dist_export import export_checkpoint

            written = export_checkpoint(trainer, args.export)
            if ctx.is_main:
                print(f"exported: {written}", flush=True)
        if args.eval:
            from train.dist_eval import evaluate_distributed

            metrics = evaluate_distributed(trainer.model.module, trainer.dataset, cfg.eval, ctx.device)
            if ctx.is_main:
                print("eval: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
        # every rank reaches the end before any tears the group down: a rank that destroys its
        # process group while a peer still works (e.g. rank 0's evaluation) was seen to abort the
        # peer at exit ("terminate called without an active exception")
        torch.distributed.barrier()
        return 0
    except (ConfigError, ValueError) as err:
        print(f"error (rank {ctx.rank}): {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"error (rank {ctx.rank}): {err}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
