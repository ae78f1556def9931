"""The Slurm templates in slurm/, submitted for real to a local cluster (scripts/local_slurm.sh).

The cluster (3 nodes on this machine, so that a heterogeneous job can start) lives in a temporary
folder for this module and is stopped at the end, even when a test fails. Every wait has a hard
timeout. Without Slurm (cannot be installed or started) these tests are skipped with the reason;
the pure tests of the start-up checks at the top always run.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.runtime.metrics import read_metrics
from hpc_dualbatch.runtime.topology import check_hetjob, check_world_size, hetjob_components
from tests.helpers import ROOT, tiny_config, write_config

LOCAL_SLURM = ROOT / "scripts" / "local_slurm.sh"
TEMPLATES = [ROOT / "slurm" / n for n in ("train.sbatch", "train_hetjob.sbatch", "stage.sbatch")]
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


# ---- pure: the start-up checks that read Slurm's variables --------------------------------------


def het_env(*ntasks: int, step: bool = True) -> dict[str, str]:
    env = {
        "SLURM_HET_SIZE": str(len(ntasks)),
        **{f"SLURM_NTASKS_HET_GROUP_{c}": str(n) for c, n in enumerate(ntasks)},
    }
    if step:
        env["SLURM_STEP_ID"] = "0"
    return env


def test_hetjob_components_put_the_small_groups_last():
    assert [n for n, _ in hetjob_components([1, 1, 1], 1)] == [1, 2, 1]
    assert [n for n, _ in hetjob_components([2, 2, 1, 1], 2)] == [1, 4, 2]
    assert [n for n, _ in hetjob_components([1, 1], 0)] == [1, 2]  # no small groups: no component 2


def test_check_hetjob_accepts_the_matching_components_and_names_the_needed_ones():
    check_hetjob([1, 1, 1], 1, True, het_env(1, 2, 1))
    check_hetjob([2, 1], 1, True, het_env(1, 2, 1))
    check_hetjob([1, 1], 0, True, het_env(1, 2))
    with pytest.raises(
        ConfigError,
        match=r"1/1/2 tasks .* needs 3 components \(component 0: 1 for the server, "
        r"component 1: 2 for the large-batch groups, component 2: 1 for the small-batch groups",
    ):
        check_hetjob([1, 1, 1], 1, True, het_env(1, 1, 2))
    with pytest.raises(ConfigError, match="needs 3 components"):
        check_hetjob([1, 1, 1], 1, True, het_env(3, 1))
    # Outside a hetjob step (the batch shell, a plain srun, mpirun) and in sync mode: nothing to check.
    check_hetjob([1, 1, 1], 1, True, het_env(1, 1, 2, step=False))
    check_hetjob([1, 1, 1], 1, True, {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"})
    check_hetjob([1, 1, 1], 1, False, het_env(1, 1, 2))


def test_check_world_size_refuses_singletons_under_srun_but_not_mpirun(monkeypatch):
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(ConfigError, match="srun --mpi=pmix"):  # wrong PMI plugin: every rank alone
        check_world_size(1, [1, 1, 1], True)
    check_world_size(4, [1, 1, 1], True)
    # mpirun inside an allocation: the ranks inherit SLURM_NTASKS of mpirun's daemon step (1 per node).
    monkeypatch.setenv("SLURM_NTASKS", "1")
    check_world_size(4, [1, 1, 1], True)
    with pytest.raises(ConfigError, match="needs 4"):
        check_world_size(3, [1, 1, 1], True)


@pytest.mark.job
@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_templates_parse_and_keep_workstation_flags_out(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = path.read_text()
    for flag in ("--oversubscribe", "allow-run-as-root", "OMPI_ALLOW_RUN_AS_ROOT", "OVERSUBSCRIBE"):
        assert flag not in text, f"{path.name} holds {flag}: that belongs to scripts/mpirun_local.sh"


# ---- a real cluster -----------------------------------------------------------------------------


class Cluster:
    def __init__(self, directory: Path, conf: str):
        self.dir = directory
        self.env = dict(
            os.environ,
            SLURM_CONF=conf,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            HDB_ROOT=str(ROOT),
            HDB_VENV=sys.prefix,  # the templates activate the environment running these tests
            OMPI_MCA_mpi_yield_when_idle="1",  # 2 cores: a rank blocked in MPI yields its core
            PYTHONUNBUFFERED="1",
        )

    def run(self, *cmd: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env or self.env
        )

    def sbatch(self, template: str, log: Path, hdb: dict[str, str], *opts: str) -> str:
        """Submit a template from the repository root; HDB_* travel in the environment (--export=ALL)."""
        r = self.run(
            "sbatch",
            "--parsable",
            f"--output={log}",
            *opts,
            str(ROOT / "slurm" / template),
            env={**self.env, **hdb},
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        r = self.run("scontrol", "-o", "show", "job", job_id)
        first = r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
        return dict(kv.split("=", 1) for kv in first.split() if "=" in kv)

    def wait(self, job_id: str, log: Path, timeout: float) -> dict[str, str]:
        """Poll until the job has finished for good (a requeue passes through PENDING); hard timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINAL:
                return info
            time.sleep(1)
        self.run("scancel", job_id)
        pytest.fail(f"job {job_id} not finished after {timeout:.0f}s: {self.job(job_id)}\n{tail(log)}")


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else f"(no {path})"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    pytest.importorskip("horovod.torch", reason="Horovod not installed: the trainer cannot run")
    if sys.platform != "linux" or not shutil.which("bash") or not shutil.which("python3"):
        pytest.skip("the local Slurm cluster needs Linux, bash and python3")
    if not shutil.which("slurmctld") and (os.geteuid() != 0 or not shutil.which("apt-get")):
        pytest.skip("Slurm is not installed and cannot be (needs root and apt-get: slurm-wlm)")
    base = tmp_path_factory.mktemp("slurm")
    if len(str(base)) > 60:  # the munge socket path must stay under the 108-byte limit
        base = Path(tempfile.mkdtemp(prefix="hdb-slurm-"))
    env = dict(os.environ, HDB_SLURM_DIR=str(base), HDB_SLURM_NODES="3")
    try:
        r = subprocess.run(
            ["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, env=env, timeout=900
        )  # the first start may install slurm-wlm
    except subprocess.TimeoutExpired:
        r = None
    try:
        if r is None or r.returncode != 0:
            why = "timed out" if r is None else (r.stderr.strip().splitlines() or ["?"])[-1]
            pytest.skip(f"local Slurm cluster did not start: {why} (logs in {base}/log)")
        conf = re.search(r"export SLURM_CONF=(\S+)", r.stdout).group(1)
        yield Cluster(base, conf)
    finally:
        cl = Cluster(base, str(base / "slurm.conf"))
        try:
            cl.run("scancel", "--user", str(os.geteuid()), timeout=30)  # this private cluster's jobs only
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and cl.run("squeue", "-h", timeout=30).stdout.strip():
                time.sleep(1)
        except (subprocess.TimeoutExpired, OSError):
            pass
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, env=env, timeout=120)


def run_folder_checks(out: Path, epochs: int, commits: int) -> dict:
    status = json.loads((out / "status.json").read_text())
    recs = read_metrics(str(out / "metrics.jsonl"))
    assert [r["commit"] for r in recs if r["type"] == "commit"] == list(range(1, commits + 1)), (
        "a commit was lost or repeated"
    )
    assert [r["epoch"] for r in recs if r["type"] == "eval"] == [float(e) for e in range(1, epochs + 1)]
    assert status["state"] == "done" and status["commits"] == commits, status
    return status


@pytest.mark.job
@pytest.mark.slurm
def test_train_sbatch_completes_with_node_local_data(slurm, tmp_path, synthetic_h5):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config("/nonexistent.h5", out))  # HDB_DATA replaces it
    (tmp_path / "local").mkdir()
    log = tmp_path / "job.out"
    hdb = {
        "HDB_CONFIG": cfg,
        "HDB_OUT": str(out),
        "HDB_DATA": synthetic_h5,
        "HDB_LOCAL_DIR": str(tmp_path / "local"),
    }
    job = slurm.sbatch("train.sbatch", log, hdb, "--ntasks=3", "--job-name=hdb-test-train")
    info = slurm.wait(job, log, timeout=300)
    text = tail(log, 200)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert info.get("Restarts") == "0"
    run_folder_checks(out, epochs=4, commits=8)
    local = (
        tmp_path / "local" / f"hdb-{os.environ.get('USER') or getpass.getuser()}" / Path(synthetic_h5).name
    )
    assert f"staged {synthetic_h5} -> " in text and f"--set data.path={tmp_path / 'local'}" in text, text
    saved = (out / "config.yaml").read_text()
    assert str(local.parent) in saved, "the run did not read the node-local copy"
    jobcomp = (slurm.dir / "jobcomp.txt").read_text()  # Slurm's own record of finished jobs
    assert re.search(rf"^JobId={job} .*JobState=COMPLETED .*ExitCode=0:0", jobcomp, re.M), jobcomp


@pytest.mark.job
@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes_without_loss(slurm, tmp_path, synthetic_h5):
    out = tmp_path / "run"
    epochs = 6
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(synthetic_h5, out, schedule__epochs=epochs))
    log = tmp_path / "job.out"
    hdb = {"HDB_CONFIG": cfg, "HDB_OUT": str(out)}
    job = slurm.sbatch("train.sbatch", log, hdb, "--ntasks=3", "--job-name=hdb-test-requeue")
    # Warn the batch shell as Slurm's --signal=B:USR1@... would, once training is under way.
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.exists() and '"commit"' in metrics.read_text()):
        if slurm.job(job).get("JobState") in FINAL:
            pytest.fail(f"job ended before its first commit: {slurm.job(job)}\n{tail(log)}")
        time.sleep(0.2)
    assert metrics.exists(), f"no commit after 240 s\n{tail(log)}"
    r = slurm.run("scancel", "--signal=USR1", "--batch", job)
    assert r.returncode == 0, r.stderr
    info = slurm.wait(job, log, timeout=420)
    text = tail(log, 300)
    if "cannot be requeued" in text:  # requeue refused here: a second submission must resume instead
        job = slurm.sbatch("train.sbatch", log, hdb, "--ntasks=3", "--job-name=hdb-test-requeue")
        info = slurm.wait(job, log, timeout=300)
        text = tail(log, 300)
    else:
        assert info.get("Restarts") == "1", f"{info}\n{text}"
        assert f"preempted: requeueing job {job}" in text, text
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    preempted = re.search(r"run preempted: (\d+) commits", text)
    assert preempted and 0 < int(preempted.group(1)) < 2 * epochs, (
        f"the run was not preempted mid-run\n{text}"
    )
    assert f"--resume {out}" in text
    run_folder_checks(out, epochs=epochs, commits=2 * epochs)
    commands = (out / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and "--resume" in commands[1], commands


@pytest.mark.job
@pytest.mark.slurm
def test_hetjob_template_is_accepted(slurm, tmp_path, synthetic_h5):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(synthetic_h5, out, workers__groups=[1, 1, 1]))
    log = tmp_path / "job.out"
    hdb = {"HDB_CONFIG": cfg, "HDB_OUT": str(out)}
    r = slurm.run(
        "sbatch",
        "--test-only",
        f"--output={log}",
        str(ROOT / "slurm" / "train_hetjob.sbatch"),
        env={**slurm.env, **hdb},
    )
    assert r.returncode == 0 and "to start at" in r.stderr, r.stdout + r.stderr
    if os.environ.get("HDB_TEST_SLURM_HETJOB") != "1":
        return  # a real run adds about a minute: opt in with HDB_TEST_SLURM_HETJOB=1
    job = slurm.sbatch("train_hetjob.sbatch", log, hdb)
    info = slurm.wait(job, log, timeout=300)
    text = tail(log, 200)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert "srun --het-group=0,1,2" in text
    run_folder_checks(out, epochs=4, commits=12)
