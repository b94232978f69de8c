"""DistributedDataParallel on the CPU: 2 processes with the gloo backend.

Every stage run happens in a subprocess (`python -c`, its own session, OMP threads 1) so that
the spawned DDP children, signals and kills behave as in a workflow job. The tiny synthetic
dataset of tests/test_stages.py is used; a module fixture trains the reference runs once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from purireid import VIEWS
from conftest import prepare_tiny_dataset, tiny_config as shared_tiny_config
from purireid.config.resolve import deep_merge
from purireid.runtime.distributed import DistContext, launch

TIMEOUT = 600

# 2 epochs x 2 steps of a global batch of 8 (2 pseudo-ids x 4 images); no periodic evaluation.
EPOCHS, ITERS = 2, 2


def tiny_config(data_root: Path, **sections) -> dict:
    # A small lr: Adam's first steps move every weight by about ±lr whatever the gradient's
    # size, so where DDP's rounding flips the sign of a near-zero gradient the weights differ
    # by ~2·lr. With lr 1e-5 that stays far below the differences a real bug would cause.
    base = {"train": {"epochs": EPOCHS, "iters": ITERS, "eval_every": 0, "lr": 1e-5, "batch_size": 16}}
    return shared_tiny_config(data_root, **deep_merge(base, sections))


RUN_STAGE = textwrap.dedent("""
    import sys, yaml
    from purireid.log import setup_logging
    from purireid.stages import extract_teacher_features, train_teacher
    stage, config_file, out, manifest = sys.argv[1:5]
    config = yaml.safe_load(open(config_file))
    setup_logging(out + "/run.log")
    if stage == "teacher":
        train_teacher.run(config, manifest=manifest, model_out=out + "/model.pth", log_jsonl=out + "/log.jsonl",
                          curve_png=out + "/curve.png", state_dir=out + "/state")
    else:
        extract_teacher_features.run(config, manifest=manifest, checkpoint=sys.argv[5], features_out=out + "/features.h5")
""")


def start_stage(out: Path, config: dict, manifest: Path, stage: str = "teacher", *extra: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "config.in.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", RUN_STAGE, stage, str(cfg), str(out), str(manifest), *extra],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(out / "stderr.txt", "ab"))


def run_stage(out: Path, config: dict, manifest: Path, stage: str = "teacher", *extra: str) -> float:
    tic = time.time()
    proc = start_stage(out, config, manifest, stage, *extra)
    code = proc.wait(timeout=TIMEOUT)
    assert code == 0, (out / "stderr.txt").read_text()[-3000:]
    return time.time() - tic


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def epoch_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def runs(dataset) -> dict:
    """The teacher trained by one process (bn_groups 2) and by 2 DDP processes (bn_groups 2), with
    the camera-proxy term on so that its gathered updates are compared too."""
    root, manifest = dataset["root"], dataset["manifest"]
    single = tiny_config(dataset["data_root"], model={"bn_groups": 2}, train={"gpus": 1, "camera_proxy": 0.5})
    ddp = tiny_config(dataset["data_root"], model={"bn_groups": 2}, train={"gpus": 2, "camera_proxy": 0.5})
    seconds = {"single": run_stage(root / "single", single, manifest),
               "ddp": run_stage(root / "ddp", ddp, manifest)}
    print(f"teacher, {EPOCHS} epochs x {ITERS} steps: one process {seconds['single']:.1f} s, "
          f"2 DDP processes {seconds['ddp']:.1f} s")
    return {"single": root / "single", "ddp": root / "ddp", "ddp_config": ddp, "single_config": single}


def test_ddp_training_matches_one_process_with_the_same_bn_groups(runs):
    a, b = weights(runs["single"] / "model.pth"), weights(runs["ddp"] / "model.pth")
    assert a.keys() == b.keys()
    # Same pseudo labels every epoch (so the gathered memories and the sampler agreed), and the
    # logged losses are global-batch means in both runs.
    la, lb = epoch_log(runs["single"]), epoch_log(runs["ddp"])
    assert [r["epoch"] for r in lb] == [None, *range(EPOCHS)]
    assert lb[0]["mAP"] == pytest.approx(la[0]["mAP"], abs=1e-6)
    for ra, rb in zip(la[1:], lb[1:]):
        assert (ra["clusters"], ra["outliers"]) == (rb["clusters"], rb["outliers"])
        for key in ["loss", *(f"ce_{v}" for v in VIEWS), *(f"camproxy_{v}" for v in VIEWS)]:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (rb["epoch"], key)
    # Tolerance. The two runs differ only by float rounding (DDP all-reduces the two half-batch
    # gradients, one process sums the whole batch). Adam divides each gradient by its own
    # running RMS, so a rounding-sized difference in a near-zero gradient can change that
    # parameter's step by up to ~lr, whatever the gradient's scale: the hard bound per element
    # is 2 * lr * steps. Nearly every element must nevertheless agree to ~1e-5.
    steps = EPOCHS * ITERS
    lr = runs["ddp_config"]["train"]["lr"]
    diffs = []
    for key in a:
        if a[key].dtype == torch.long:  # num_batches_tracked
            assert torch.equal(a[key], b[key]), key
            continue
        diff = (a[key].float() - b[key].float()).abs()
        assert diff.max() <= 2 * lr * steps, (key, float(diff.max()))
        if "running_" in key:  # BN statistics: rank 0's share = the first ghost group
            assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-4), (key, float(diff.max()))
        diffs.append(diff.flatten())
    diffs = torch.cat(diffs)
    assert torch.quantile(diffs[:1_000_000], 0.99) < 1e-5, float(torch.quantile(diffs[:1_000_000], 0.99))
    assert diffs.mean() < 1e-6, float(diffs.mean())
    # Only rank 0 writes: one copy of every output, no leftover state.
    assert not (runs["ddp"] / "state" / "state.pth").exists()
    assert (runs["ddp"] / "curve.png").exists() and (runs["ddp"] / "config.yaml").exists()
    assert "starting teacher training (no resume state" in (runs["ddp"] / "run.log").read_text()


def test_ddp_extraction_equals_one_process(dataset, runs):
    checkpoint = runs["single"] / "model.pth"
    root = dataset["root"] / "extract"
    single = tiny_config(dataset["data_root"], train={"gpus": 1})
    ddp = tiny_config(dataset["data_root"], train={"gpus": 2})
    run_stage(root / "single", single, dataset["manifest"], "features", str(checkpoint))
    run_stage(root / "ddp", ddp, dataset["manifest"], "features", str(checkpoint))
    with h5py.File(root / "single" / "features.h5", "r") as fa, h5py.File(root / "ddp" / "features.h5", "r") as fb:
        for name in ("paths", "camids", "pids"):
            assert np.array_equal(fa[name][()], fb[name][()]), name
        assert fa.attrs["checkpoint_sha256"] == fb.attrs["checkpoint_sha256"]
        for view in VIEWS:
            x, y = fa[f"features/{view}"][()], fb[f"features/{view}"][()]
            assert x.shape == y.shape and x.dtype == y.dtype == np.float32
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=view)


def start_stage_until_first_epoch(out, config, manifest):
    """Start the DDP teacher stage and return once its first epoch's resume state is saved."""
    proc = start_stage(out, config, manifest)
    state = out / "state" / "state.pth"
    deadline = time.time() + TIMEOUT
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.exists(), "no epoch state was saved"
    return proc


def test_ddp_resumes_after_the_whole_job_is_killed(dataset, runs, tmp_path):
    """SIGKILL to the process group (parent and both ranks) after an epoch; the rerun resumes."""
    out = tmp_path / "killed"
    proc = start_stage_until_first_epoch(out, runs["ddp_config"], dataset["manifest"])
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    assert not (out / "model.pth").exists(), "the run finished before it could be killed"
    run_stage(out, runs["ddp_config"], dataset["manifest"])
    assert "resuming teacher" in (out / "run.log").read_text()
    reference = weights(runs["ddp"] / "model.pth")
    resumed = weights(out / "model.pth")
    for key in reference:
        assert torch.allclose(reference[key].float(), resumed[key].float(), rtol=0, atol=1e-6), key
    assert [r["epoch"] for r in epoch_log(out)] == [None, *range(EPOCHS)]


def test_sigterm_to_the_parent_stops_the_ranks_and_leaves_resumable_state(dataset, runs, tmp_path):
    """SIGTERM to the launching process only: it forwards it, both ranks stop at the same step."""
    out = tmp_path / "terminated"
    proc = start_stage_until_first_epoch(out, runs["ddp_config"], dataset["manifest"])
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    deadline = time.time() + 30
    while group_alive(proc.pid) and time.time() < deadline:  # the ranks (and mp's helpers) are gone
        time.sleep(0.1)
    assert not group_alive(proc.pid), "DDP children outlived their parent"
    assert not (out / "model.pth").exists(), "the run finished before SIGTERM arrived"
    assert (out / "state" / "state.pth").exists()
    assert "stopping teacher" in (out / "run.log").read_text()
    run_stage(out, runs["ddp_config"], dataset["manifest"])
    reference = weights(runs["ddp"] / "model.pth")
    resumed = weights(out / "model.pth")
    for key in reference:
        assert torch.allclose(reference[key].float(), resumed[key].float(), rtol=0, atol=1e-6), key


@pytest.mark.parametrize("device, gpus, key", [("cuda", 1, "'device'"), ("cuda", 2, "'train.gpus'"),
                                                ("auto", 2, "'train.gpus'")])
def test_gpu_options_on_a_cpu_only_machine_are_clear_errors(dataset, tmp_path, monkeypatch, device, gpus, key):
    from purireid.stages import extract_teacher_features, train_teacher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tiny_config(dataset["data_root"], device=device, train={"gpus": gpus})
    with pytest.raises(RuntimeError, match=key) as info:
        train_teacher.run(config, manifest=dataset["manifest"], model_out=tmp_path / "m.pth",
                          log_jsonl=tmp_path / "l.jsonl", curve_png=tmp_path / "c.png", state_dir=tmp_path / "s")
    assert "no CUDA device" in str(info.value)
    with pytest.raises(RuntimeError, match=key):
        extract_teacher_features.run(config, manifest=dataset["manifest"], checkpoint=tmp_path / "m.pth",
                                     features_out=tmp_path / "f.h5")
    assert not any(tmp_path.iterdir())


def _collectives(out: str, *, ctx: DistContext) -> None:
    """Run in each of 2 gloo processes: the DistContext helpers the trainer relies on."""
    local = torch.arange(3 + ctx.rank, dtype=torch.float32) + 10 * ctx.rank  # uneven sizes
    gathered = ctx.all_gather_cat(local)
    equal = ctx.all_gather_equal(torch.arange(2) + 10 * ctx.rank)  # a step's equal shares, no size exchange
    obj = ctx.broadcast_object({"from": ctx.rank})
    flags = (ctx.any_true(ctx.rank == 1), ctx.any_true(False))
    mean = ctx.all_reduce_mean({"x": float(ctx.rank)})
    buf = torch.nn.BatchNorm1d(2)
    buf.running_mean.fill_(ctx.rank + 1.0)
    ctx.broadcast_buffers(buf)
    shards = [list(DistContext(r, ctx.world_size).shard(7)) for r in range(ctx.world_size)]
    Path(out, f"rank{ctx.rank}.json").write_text(json.dumps({
        "gathered": gathered.tolist(), "equal": equal.tolist(), "obj": obj, "flags": flags, "mean": mean,
        "buffer": buf.running_mean.tolist(), "shards": shards}))


def test_dist_context_collectives_under_gloo(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(_collectives, str(tmp_path), world_size=2, device="cpu")
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["gathered"] == [0, 1, 2, 10, 11, 12, 13]  # rank order, uneven sizes
        assert got["equal"] == [0, 1, 10, 11]
        assert got["obj"] == {"from": 0}
        assert got["flags"] == [True, False]
        assert got["mean"] == {"x": 0.5}
        assert got["buffer"] == [1.0, 1.0]
        assert got["shards"] == [[0, 1, 2, 3], [4, 5, 6]]


def _count_step_reads(out: str, *, ctx: DistContext) -> None:
    """Run in each of 2 gloo processes: host reads made by purireid's code during 2 and 5 steps."""
    import test_training_step as steps

    torch.set_num_threads(1)
    counts = {}
    for n in (2, 5):
        with pytest.MonkeyPatch.context() as patch:
            counts[n] = steps.count_syncs(patch, steps.make_epoch(n, ctx=ctx))
    Path(out, f"rank{ctx.rank}.json").write_text(json.dumps(counts))


def test_a_ddp_step_reads_back_only_the_stop_flag(tmp_path, monkeypatch):
    """Under DDP the only per-step host read is the stop flag, exchanged on the CPU (gloo) so that
    it never waits for the GPU; the all-gathers of the memory update stay on the device."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(_count_step_reads, str(tmp_path), world_size=2, device="cpu")
    for rank in range(2):
        counts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert counts["5"] - counts["2"] == 3, counts  # one flag exchange per step
