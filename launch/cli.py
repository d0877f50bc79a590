"""``silvertorch`` console script: train / eval / validate-config / demo / build-index / compare-joint,
plus the plugged subcommands of ``PLUGGED_COMMANDS`` (export / serve / plan), one module each.

Thin on purpose: parse arguments, call ``train/``, print, and map errors to exit codes
(2 = bad config or arguments, 1 = unusable checkpoint or missing data).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="silvertorch", description="SilverTorch: Index-as-Model retrieval for recommendation"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="TOML run config (configs/*.toml)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides")

    p = sub.add_parser("train", help="train a two-tower model")
    with_config(p)
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")

    p = sub.add_parser("eval", help="evaluate a checkpoint against the popularity baseline")
    with_config(p)
    p.add_argument("--checkpoint", required=True)

    p = sub.add_parser("validate-config", help="check a config and print it resolved")
    with_config(p)

    p = sub.add_parser("demo", help="train, evaluate, and show recommendations for one user")
    with_config(p)
    p.add_argument(
        "--user", default=None, help="raw user id to show (default: first with 5+ held-out items)"
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--compare", action="store_true",
                   help="also train the two-stage baseline and print joint vs two-stage (minutes)")

    p = sub.add_parser("build-index", help="build and save a RetrievalModel from a checkpoint")
    with_config(p)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (train or joint)")
    p.add_argument("--out", required=True, help="where to write the model (torch.save file)")

    p = sub.add_parser("compare-joint", help="joint training vs the two-stage baseline, evaluated")
    with_config(p)
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="train both recipes at each seed and report mean ± sd (default: train.seed)")

    for name, (module, help_text) in PLUGGED_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


# Subcommands that live in their own module under launch/: each module defines
# ``add_arguments(parser)`` and ``run(args) -> int`` (exit code). Keeps this file a dispatcher.
PLUGGED_COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("launch.cmd_export", "export a checkpoint as one versioned serving artifact"),
    "serve": ("launch.cmd_serve", "serve an artifact over HTTP (retrieve, streaming item updates)"),
    "plan": ("launch.cmd_plan", "place the model's tensors on a topology (scale-up first, then out)"),
}


def _validate(args: argparse.Namespace) -> int:
    from silvertorch.config import to_dict
    from train.builders import check_features, load_dataset
    from train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    try:
        dataset = load_dataset(cfg.data)
    except FileNotFoundError as err:
        print(f"note: feature names not checked against the data ({err})", file=sys.stderr)
    else:
        check_features(cfg, dataset)
    print("OK")
    print(_to_toml(to_dict(cfg)))
    return 0


def _to_toml(data: dict, prefix: str = "") -> str:
    """Resolved config as TOML-ish text (tables of tables printed as [[arrays]])."""
    import json

    scalars, tables, arrays = [], [], []
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            tables.append(_to_toml(v, name))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.extend(f"[[{name}]]\n" + _to_toml(x).strip() + "\n" for x in v)
        elif v is not None:
            scalars.append(f"{k} = {json.dumps(v)}")
        else:
            scalars.append(f"# {k} = (unset)")
    head = [f"[{prefix}]"] if prefix and scalars else []
    return "\n".join(head + scalars + [""] + tables + arrays).strip() + "\n"


def _run(args: argparse.Namespace) -> int:
    from silvertorch.config import ConfigError
    from train.config import load_train_config

    if args.command in PLUGGED_COMMANDS:
        return int(importlib.import_module(PLUGGED_COMMANDS[args.command][0]).run(args))
    if args.command == "validate-config":
        return _validate(args)
    cfg = load_train_config(args.config, args.overrides)
    if args.command == "train":
        from train.evaluate import compare_with_popularity

        if cfg.joint.enabled:
            from train.joint import train_joint

            if args.resume:
                raise ConfigError("joint.enabled", "a joint run does not resume; set joint.enabled=false")
            result = train_joint(cfg)
        else:
            from train.loop import train

            result = train(cfg, resume=args.resume)
        print(f"trained {result.step} steps in {result.seconds:.1f}s -> {result.checkpoint}")
        print(compare_with_popularity(result.model, result.dataset, cfg.eval)[2])
    elif args.command == "eval":
        from train.builders import load_dataset
        from train.evaluate import compare_with_popularity, load_trained_model

        dataset = load_dataset(cfg.data)
        model = load_trained_model(cfg, args.checkpoint, dataset)
        print(compare_with_popularity(model, dataset, cfg.eval)[2])
    elif args.command == "demo":
        from train.demo import run_demo

        print(run_demo(cfg, user=args.user, resume=args.resume, compare=args.compare))
    elif args.command == "build-index":
        from train.build_index import build_index

        model, path = build_index(cfg, args.checkpoint, args.out, progress=cfg.train.progress)
        ivf = model.index.ivf
        print(f"wrote {path}: {ivf.ntotal} items, nlist {ivf.nlist}, {cfg.joint.index_dtype}, "
              f"tasks {model.overarch.tasks}")
    elif args.command == "compare-joint":
        from train.compare_joint import compare_joint, compare_joint_seeds

        print(compare_joint_seeds(cfg, args.seeds)[2] if args.seeds else compare_joint(cfg)[2])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from silvertorch.config import ConfigError
    from train.checkpoint import CheckpointError

    try:
        return _run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
