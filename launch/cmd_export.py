"""``silvertorch export --config CFG --checkpoint CKPT --out DIR [overrides]``: a trained checkpoint
-> one versioned serving artifact directory (:mod:`silvertorch.export`), verified after writing.

With ``--plan sharding_plans/X.json`` (a ``silvertorch plan`` output) or ``--shards N`` it writes a
**sharded** serving artifact instead (:mod:`silvertorch.export_sharded`: the item index split into
the plan's shards, one part per shard, every part loaded back and verified); serve it with
``silvertorch serve DIR`` (one rank per shard, started for you).

Exit codes: 0 written and verified; 2 bad config or arguments (including an existing ``--out``
without ``--force``, a plan made for another model, ``--shards`` contradicting the plan); 1
unusable checkpoint, missing data, or an artifact that fails verification (or whose exported
programs do not reproduce the eager modules).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="TOML run config (configs/*.toml)")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (train or joint)")
    parser.add_argument("--out", required=True, help="artifact directory to create")
    parser.add_argument("--force", action="store_true", help="replace an existing artifact at --out")
    parser.add_argument("--no-programs", action="store_true",
                        help="skip the torch.export programs (tensors + manifest only; unsharded only)")
    parser.add_argument("--plan", default=None,
                        help="write a sharded artifact for this placement plan (sharding_plans/*.json)")
    parser.add_argument("--shards", type=int, default=None,
                        help="write a sharded artifact with N item shards (no plan needed)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def run(args: argparse.Namespace) -> int:
    from silvertorch.config import ConfigError
    from silvertorch.export import ArtifactError
    from train.checkpoint import CheckpointError
    from train.config import load_train_config

    sharded = args.plan is not None or args.shards is not None
    try:
        cfg = load_train_config(args.config, args.overrides)
        if sharded:
            from train.export import export_sharded_artifact, sharded_summary

            result = export_sharded_artifact(cfg, args.checkpoint, args.out, plan=args.plan,
                                             num_shards=args.shards, progress=cfg.train.progress,
                                             overwrite=args.force)
        else:
            from train.export import export_artifact, summary

            result = export_artifact(cfg, args.checkpoint, args.out, progress=cfg.train.progress,
                                     overwrite=args.force, export_programs=not args.no_programs)
    except (CheckpointError, ArtifactError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        if not sharded:  # the single-process export has no ValueError of the caller's making
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    if sharded:
        print(sharded_summary(result))
        return 0
    print(summary(result))
    if not all(result.program_checks.values()):
        print("error: an exported program does not reproduce the eager modules", file=sys.stderr)
        return 1
    return 0
