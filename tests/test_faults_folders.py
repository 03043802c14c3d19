"""Run folders and checkpoint folders without launching anything:
pruning spares the tag just written and the one ``latest`` names, manifests make ``--resume auto``
fall back past an incomplete tag, the run-folder lock names its holder and a stale one is taken
over, ``wandb.mode=online`` without a key fails before anything is built, resume settings are
checked from the manifest (item 7), and ``launch/lifecycle/supervise.py`` reports the ranks' exit code."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest

from tritower.launch.checkpoint.checkpointer import prune
from tritower.launch.checkpoint.manifest import check_manifest, data_identity, pick_resume, write_manifest
from tritower.launch.experiments import get_experiment
from tritower.launch.lifecycle.run_lock import RunLock
from tritower.launch.lifecycle.supervise import ranks_exit_code
from tritower.launch.metrics.wandb_logger import check_wandb_login


def _tag(folder: Path, step: int, *, manifest: bool = True, world_size: int = 2) -> Path:
    tag = folder / f"step{step:08d}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"o" * 50)
    if manifest:
        write_manifest(tag, {"step": step, "world_size": world_size, "model": {"embed_dim": 32}})
    return tag


def test_prune_spares_the_tag_just_written_and_latest(tmp_path: Path) -> None:
    # Another run's steps 160/180/200 and this run's first save, step 4.
    for step in (160, 180, 200, 4):
        _tag(tmp_path, step)
    (tmp_path / "latest").write_text("step00000004")
    removed = prune(tmp_path, keep_last=3, protect=("step00000004",))
    assert (tmp_path / "step00000004").is_dir() and removed == []
    prune(tmp_path, keep_last=1)  # even unprotected: latest's tag survives
    assert (tmp_path / "step00000004").is_dir()


def test_resume_auto_falls_back_past_an_incomplete_newest_tag(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        _tag(tmp_path, step)
    (tmp_path / "latest").write_text("step00000008")
    (tmp_path / "step00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # one rank's file lost
    with open(tmp_path / "step00000006" / "mp_rank_00_model_states.pt", "r+b") as cut:
        cut.truncate(10)  # cut short
    _tag(tmp_path, 10, manifest=False)  # a save that never finished its manifest
    target, manifest, warnings = pick_resume("auto", tmp_path)
    assert target == (tmp_path, "step00000004") and manifest["step"] == 4
    assert [w.split(":")[0] for w in warnings[:3]] == [f"skipping checkpoint {tmp_path / t}" for t in
                                                       ("step00000010", "step00000008", "step00000006")]  # fmt: skip
    assert "lost zero_pp_rank_1" in warnings[1] and "has 10 bytes" in warnings[2]
    with pytest.raises(ValueError, match="lost zero_pp_rank_1"):  # named explicitly: refused, not skipped
        pick_resume(str(tmp_path / "step00000008"), tmp_path)


def test_resume_mismatches_are_found_from_the_manifest(tmp_path: Path) -> None:
    manifest = json.loads((_tag(tmp_path, 2) / "manifest.json").read_text())
    check_manifest(manifest, "x", world_size=1, model={"embed_dim": 32})  # 1 rank reads both data ranks
    with pytest.raises(ValueError, match="written by 2 ranks, this run has 4: .* laid out for 2 data ranks"):
        check_manifest(manifest, "x", world_size=4, model={"embed_dim": 32})
    for stage in (0, 3):  # no universal conversion; DeepSpeed's ZeRO-3 universal load of the optimizer state
        manifest["training"] = {"zero_stage": stage}
        with pytest.raises(ValueError, match=f"ZeRO-{stage} checkpoints are not resharded"):
            check_manifest(manifest, "x", world_size=1, model={"embed_dim": 32})
        check_manifest(manifest, "x", world_size=2, model={"embed_dim": 32})  # the same world size loads
    with pytest.raises(ValueError, match="model.embed_dim=32 there, 64 here"):
        check_manifest(manifest, "x", world_size=2, model={"embed_dim": 64})


def test_resume_with_another_data_stream_is_found_from_the_manifest(tmp_path: Path) -> None:
    config = get_experiment("clip_test").to_dict()
    tag = _tag(tmp_path, 2)
    write_manifest(tag, {"step": 2, "world_size": 2, "data": data_identity(config)})
    manifest = json.loads((tag / "manifest.json").read_text())

    def check(section: str, **changes: object) -> None:
        changed = copy.deepcopy(config)
        changed[section].update(changes)
        check_manifest(manifest, "x", world_size=2, model={}, data=data_identity(changed))

    check("data", num_workers=1, train_shards="builtin")  # 0 workers is one inline worker; "" is builtin
    check("data", builtin_eval_samples=9, batch_size=64)  # not part of the training stream's position
    with pytest.raises(ValueError, match=r"data.train_shards='' there, '/data/\{0..9\}.tar' here"):
        check("data", train_shards="/data/{0..9}.tar")
    with pytest.raises(ValueError, match="data.num_workers=0 there, 2 here"):
        check("data", num_workers=2)
    with pytest.raises(ValueError, match="train.seed=0 there, 7 here.*pass them to resume it"):
        check("train", seed=7)
    with pytest.raises(ValueError, match="data.builtin_seed=0 there, 1 here"):
        check("data", builtin_seed=1)


def test_lock_names_a_live_holder_and_takes_over_a_stale_one(tmp_path: Path) -> None:
    holder = RunLock(tmp_path)
    assert holder.acquire() == ""
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    holder.release()
    assert not (tmp_path / "lock").exists()
    # A holder that died without cleaning up (kill -9): a pid that is no process on this host.
    pid = max(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()) + 100000
    (tmp_path / "lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "start": "1"}))
    taken = RunLock(tmp_path)
    assert "took over the stale lock of pid" in taken.acquire()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    taken.release()
    # Another host's lock cannot be judged from here: refused, naming it.
    (tmp_path / "lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(RuntimeError, match="pid 1 on host elsewhere"):
        RunLock(tmp_path).acquire()


def test_wandb_online_without_a_key_fails_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(RuntimeError, match="wandb login"):
        check_wandb_login("online")
    check_wandb_login("offline")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    check_wandb_login("online")


def test_a_busy_master_port_fails_at_once_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from tritower.launch.config import ConfigError
    from tritower.launch.lifecycle.dist_env import check_master_port

    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
        with pytest.raises(ConfigError, match=f"master port {port} is already in use"):
            check_master_port()
    check_master_port()  # free again

    # The run before on this port left its closed connections in TIME_WAIT: the store binds it.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore sets it
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first: its end waits in TIME_WAIT
            client.recv(1)
    with socket.socket() as plain, pytest.raises(OSError):  # a bind without SO_REUSEADDR refuses it
        plain.bind(("", port))
    check_master_port()


def test_an_unwritable_checkpoint_folder_and_a_reused_folder_fail_naming_the_fix(tmp_path: Path) -> None:
    from tritower.launch.config import ConfigError
    from tritower.launch.experiments import clip_test
    from tritower.launch.loop.run_setup import _check_run_folder

    cfg = clip_test()
    (tmp_path / "file").write_text("")  # runs as root here: a path under a file is what cannot be written
    with pytest.raises(ConfigError, match="cannot write checkpoints to .* pass a writable --train.output_dir"):
        _check_run_folder(cfg, tmp_path / "file" / "run", world_size=2)
    _tag(tmp_path / "run" / "checkpoints", 200)
    with pytest.raises(ConfigError, match="already holds checkpoints of an earlier run .*--resume auto"):
        _check_run_folder(cfg, tmp_path / "run", world_size=2)


def test_the_supervisor_reports_the_ranks_code_only_when_every_rank_wrote_one(tmp_path: Path) -> None:
    def written(*codes: int, world_size: int = 2) -> int | None:
        folder = tmp_path / "-".join(map(str, codes))
        folder.mkdir()
        for rank, code in enumerate(codes):
            (folder / f"rank{rank}").write_text(f"{code} {world_size}\n")
        return ranks_exit_code(folder)

    assert written(75, 75) == 75  # every rank checkpointed for a signal: requeue
    assert written(0, 0) == 0
    assert written(2, 75) == 2  # a config error on one rank; the launcher stopped the other
    assert written(3, 3) == 3  # diverged
    assert written(75) is None  # rank 1 never wrote (killed): the command's own status then
    assert written(0, 75, world_size=2) == 75
