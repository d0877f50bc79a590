"""torchelastic restarts of sharded training, with a real SIGKILL of one rank (2 gloo ranks, CPU).

The job is the torchx component's own command (``launch/components.py:train``: torchrun with
``--max_restarts N`` running ``launch.train_dist``), started outside torchx with the component's
macros filled in, on a slice of MovieLens-100k (60 users, global batch 64, 24 steps, a DCP
checkpoint every 8 steps, the loss logged every step). ``SILVERTORCH_STEP_DELAY_S`` slows every
step so that the kill lands in the middle of the run; it changes timing, not what is computed.

- ``--max_restarts 1``: rank 1 is SIGKILLed a few steps after the first checkpoint. torchrun stops
  rank 0, starts both again, they resume from the newest complete checkpoint (read once both
  ranks of the first attempt are gone) and finish with rc 0. The
  restarted attempt's first logged step is the checkpoint's step + 1, it ends at the same step as
  an uninterrupted run, and every logged loss and the final weights equal the uninterrupted run's
  (same batches, RNG state in the checkpoint). Tolerance ``ATOL``: both runs compute the same
  float32 function in the same order on the same world size, so they are expected bit-identical;
  1e-6 leaves room for nothing but float noise (a batch replayed out of order or a lost optimizer
  state moves the loss by > 1e-3).
- ``--max_restarts 0``: the same kill ends the whole job with a non-zero rc (bounded by a timeout:
  no hang) and torchrun's summary names the killed rank and the signal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/distributed_movielens.toml"
STEPS, EVERY = 24, 8
OVERRIDES = ["data.max_users=60", "train.batch_size=64", f"train.max_steps={STEPS}",
             f"train.checkpoint_every={EVERY}", "train.log_every=1", "train.progress=false"]  # fmt: skip
DELAY_S = "0.15"  # per step: the kill (2 steps after the first checkpoint) lands ~2 s before the end
ATOL = 1e-6
JOB_TIMEOUT_S = 300  # a hang fails the test instead of blocking CI


def _movielens_or_skip() -> None:
    from silvertorch.data.fetch import movielens_100k_dir

    if not (movielens_100k_dir() / "ml-100k.inter").is_file():
        pytest.skip("MovieLens-100k is not fetched (`make data`)")


def launch(out_dir: Path, max_restarts: int, delay: str | None) -> subprocess.Popen:
    """Start the component's command (bash -> torchrun -> 2 ranks) writing into ``out_dir``."""
    import torchx.specs as specs

    from launch.components import train

    app = train(*OVERRIDES, f"train.out_dir={out_dir}", config=CONFIG, nproc_per_node=2,
                max_restarts=max_restarts, timeout_s=60.0, export=str(out_dir / "exported.pt"),
                python=sys.executable)  # fmt: skip
    values = specs.macros.Values(img_root=str(ROOT), app_id=f"elastic-{out_dir.name}",
                                 replica_id="0", rank0_env="TORCHX_RANK0_HOST")  # fmt: skip
    role = values.apply(app.roles[0])
    env = {**os.environ, **role.env, "OMP_NUM_THREADS": "1"}
    env.pop("SILVERTORCH_STEP_DELAY_S", None)
    if delay is not None:
        env["SILVERTORCH_STEP_DELAY_S"] = delay
    log = open(out_dir.parent / f"{out_dir.name}.log", "w")
    return subprocess.Popen([role.entrypoint, *role.args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def output(out_dir: Path) -> str:
    return (out_dir.parent / f"{out_dir.name}.log").read_text()


def finish(proc: subprocess.Popen, out_dir: Path) -> int:
    """Wait for the job (at most ``JOB_TIMEOUT_S``); on a hang kill its process group and fail."""
    try:
        return proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the job did not end within {JOB_TIMEOUT_S} s:\n{output(out_dir)[-4000:]}")


def log_records(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / "train_log.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]  # skip a torn tail


def latest_step(out_dir: Path) -> int | None:
    pointer = out_dir / "dcp" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step_"))
    except (FileNotFoundError, ValueError):
        return None


def rank_pid(root_pid: int, rank: int) -> int | None:
    """The pid of the ``launch.train_dist`` process with ``RANK=rank`` under ``root_pid`` (/proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    stack, found = [root_pid], None
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launch.train_dist" in cmd and f"RANK={rank}".encode() in env:
            found = pid
    return found


def wait_for(predicate: Any, proc: subprocess.Popen, out_dir: Path, what: str,
             done_ok: bool = False) -> Any:
    """Poll ``predicate`` until it returns non-None; fail if the job ends first (unless
    ``done_ok``) or after ``JOB_TIMEOUT_S``."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (value := predicate()) is None:
        if proc.poll() is not None and not done_ok:
            pytest.fail(f"the job ended (rc {proc.returncode}) before {what}:\n{output(out_dir)[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def kill_rank_after_checkpoint(proc: subprocess.Popen, out_dir: Path, rank: int) -> tuple[int, int, dict[int, int]]:
    """SIGKILL ``rank`` once a checkpoint exists and 2 more steps were logged after it, then wait
    until every rank of that attempt is gone. Returns (the newest complete checkpoint's step left
    by the attempt, last step logged before the kill, {rank: pid} of the attempt)."""

    def ready() -> tuple[int, int] | None:
        ckpt, records = latest_step(out_dir), log_records(out_dir)
        if ckpt is None or not records or records[-1]["step"] < ckpt + 2:
            return None
        return ckpt, records[-1]["step"]

    ckpt, last = wait_for(ready, proc, out_dir, "a checkpoint and 2 more steps")
    pids = {r: rank_pid(proc.pid, r) for r in (0, 1)}
    assert None not in pids.values(), f"launch.train_dist ranks under pid {proc.pid}: {pids}"
    os.kill(pids[rank], signal.SIGKILL)
    # torchrun stops the other rank; a restarted attempt needs seconds (start-up, EVERY steps)
    # before it can write a checkpoint, so `latest` now is what the first attempt left behind
    wait_for(lambda: None if any(alive(p) for p in pids.values()) else True, proc, out_dir,
             "the end of the killed attempt", done_ok=True)  # fmt: skip
    return latest_step(out_dir) or ckpt, last, pids  # type: ignore[return-value]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    from train.checkpoint import read_checkpoint

    payload = read_checkpoint(out_dir / "exported.pt")  # the --export single-process checkpoint
    assert payload["step"] == STEPS
    return payload["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    """The reference: the same job without a kill (and without the delay). -> (step -> loss, weights)."""
    _movielens_or_skip()
    out_dir = tmp_path_factory.mktemp("elastic") / "reference"
    out_dir.mkdir()
    proc = launch(out_dir, max_restarts=0, delay=None)
    assert finish(proc, out_dir) == 0, output(out_dir)[-4000:]
    records = log_records(out_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return {r["step"]: r["loss"] for r in records}, weights(out_dir)


def test_killed_rank_restarts_and_resumes_from_the_last_checkpoint(uninterrupted, tmp_path: Path) -> None:
    ref_losses, ref_weights = uninterrupted
    out_dir = tmp_path / "restarted"
    out_dir.mkdir()
    proc = launch(out_dir, max_restarts=1, delay=DELAY_S)
    ckpt, killed_at, _ = kill_rank_after_checkpoint(proc, out_dir, rank=1)
    rc = finish(proc, out_dir)
    text = output(out_dir)
    assert rc == 0, text[-4000:]
    assert ckpt % EVERY == 0 and ckpt >= EVERY
    # (b) the second attempt resumed from the newest checkpoint and redid only the lost steps
    assert f"resumed from step {ckpt} ({out_dir / 'dcp'})" in text, text[-4000:]
    assert f"done: step {STEPS}, epoch 0, world size 2" in text
    steps = [r["step"] for r in log_records(out_dir)]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:restart] == list(range(1, steps[restart - 1] + 1))  # the killed attempt
    assert ckpt <= steps[restart - 1] < STEPS and killed_at <= steps[restart - 1]
    assert steps[restart:] == list(range(ckpt + 1, STEPS + 1))  # first step = checkpoint + 1
    # (c) the same run as without the kill: every logged loss (both attempts) and the final weights
    for record in log_records(out_dir):
        assert abs(record["loss"] - ref_losses[record["step"]]) <= ATOL, record
    got = weights(out_dir)
    assert got.keys() == ref_weights.keys()
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=ATOL, msg=name)


def test_killed_rank_without_restarts_fails_the_job_cleanly(tmp_path: Path) -> None:
    _movielens_or_skip()
    out_dir = tmp_path / "no_restart"
    out_dir.mkdir()
    proc = launch(out_dir, max_restarts=0, delay=DELAY_S)
    ckpt, _, pids = kill_rank_after_checkpoint(proc, out_dir, rank=1)
    pid = pids[1]
    rc = finish(proc, out_dir)  # bounded: a hang fails after JOB_TIMEOUT_S
    text = output(out_dir)
    assert rc != 0, text[-4000:]
    assert "done: step" not in text and "resumed from step" not in text
    # torchrun's summary names the killed rank, its pid and the signal
    assert "ChildFailedError" in text, text[-4000:]
    assert re.search(rf"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9 \(pid: {pid}\)", text), text[-4000:]
    assert f"Signal 9 (SIGKILL) received by PID {pid}" in text
    assert not alive(pids[0]) and not alive(pids[1])  # torchrun stopped the surviving rank too
    assert latest_step(out_dir) == ckpt  # the last complete checkpoint is intact for a relaunch
