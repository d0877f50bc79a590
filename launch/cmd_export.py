"""``silvertorch export --config CFG --checkpoint CKPT --out DIR [overrides]``: a trained checkpoint
-> one versioned serving artifact directory (:mod:`silvertorch.export`), verified after writing.

Exit codes: 0 written and verified; 2 bad config or arguments (including an existing ``--out``
without ``--force``); 1 unusable checkpoint, missing data, or an artifact that fails verification (or whose exported programs do not reproduce the eager modules).
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
                        help="skip the torch.export programs (tensors + manifest only)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def run(args: argparse.Namespace) -> int:
    from silvertorch.config import ConfigError
    from silvertorch.export import ArtifactError
    from train.checkpoint import CheckpointError
    from train.config import load_train_config
    from train.export import export_artifact, summary

    try:
        cfg = load_train_config(args.config, args.overrides)
        result = export_artifact(cfg, args.checkpoint, args.out, progress=cfg.train.progress,
                                 overwrite=args.force, export_programs=not args.no_programs)
    except (ConfigError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, ArtifactError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(result))
    if not all(result.program_checks.values()):
        print("error: an exported program does not reproduce the eager modules", file=sys.stderr)
        return 1
    return 0
