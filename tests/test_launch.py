"""``qlib-ext launch`` without a cluster: worker names from a scheduler's environment, the SLURM job script, and the
Kubernetes Job manifest validated offline against the Kubernetes API schema (kubernetes-validate ships the schemas).
The real SLURM cluster is tests/test_launch_slurm.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from qlib_ext.cli import main
from qlib_ext.errors import ConfigError, LaunchError
from qlib_ext.launch import k8s, slurm
from qlib_ext.pool.record import Tag
from qlib_ext.pool.worker_name import SchedulerJob, scheduler_job, split_worker, worker_id

SECRET_URL = "mongodb://lab:s3cret-pw@10.0.0.1:27017/?authSource=admin"


# ---------------------------------------------------------------------- worker names
@pytest.mark.parametrize(("env", "job", "label"), [
    ({"SLURM_ARRAY_JOB_ID": "812", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "815"},
     SchedulerJob("slurm", "812", "3"), "slurm-812_3"),
    ({"SLURM_ARRAY_JOB_ID": "1", "SLURM_ARRAY_TASK_ID": "12"}, SchedulerJob("slurm", "1", "12"), "slurm-1_12"),
    ({"SLURM_JOB_ID": "77"}, SchedulerJob("slurm", "77"), "slurm-77"),
    ({"QLIB_EXT_K8S_JOB": "qlib-ext-p", "QLIB_EXT_K8S_POD": "qlib-ext-p-x7k2q"},
     SchedulerJob("k8s", "qlib-ext-p", "qlib-ext-p-x7k2q"), "k8s-qlib-ext-p-x7k2q"),
    ({"QLIB_EXT_K8S_JOB": "j", "JOB_COMPLETION_INDEX": "4", "QLIB_EXT_K8S_POD": "j-4-abcde"},
     SchedulerJob("k8s", "j", "4"), "k8s-j_4"),
])
def test_a_scheduler_job_is_read_from_its_environment(env, job, label):
    assert scheduler_job(env) == job and job.label == label
    name = worker_id(env)
    assert name == f"{socket.gethostname()}:{os.getpid()}/{label}"
    assert split_worker(name) == (socket.gethostname(), str(os.getpid()))


def test_outside_a_scheduler_the_name_is_host_pid():
    assert scheduler_job({"PATH": "/bin"}) is None
    assert worker_id({}) == f"{socket.gethostname()}:{os.getpid()}"
    assert split_worker("h:12") == ("h", "12") and split_worker("odd") == ("", "odd")


def test_a_launched_worker_alive_on_this_host_keeps_its_spooled_result():
    """The spool's replay asks whether the owner still lives: the pid is read through the scheduler suffix."""
    from qlib_ext.worker.loop import _owner_alive

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _owner_alive(f"{socket.gethostname()}:{proc.pid}/slurm-9_1")
    finally:
        proc.kill()
        proc.wait()
    assert not _owner_alive(f"{socket.gethostname()}:{proc.pid}/slurm-9_1")


def test_runs_are_tagged_with_the_scheduler_job(monkeypatch):
    from qlib_ext.worker.body import mlflow_tags

    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "812")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    tags = mlflow_tags({}, "t1", "node7:42/slurm-812_3", 1)
    assert (tags[Tag.SCHEDULER], tags[Tag.SCHEDULER_JOB], tags[Tag.SCHEDULER_TASK]) == ("slurm", "812", "3")
    assert tags[Tag.WORKER] == "node7:42/slurm-812_3" and tags[Tag.HOST] == "node7"
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    assert Tag.SCHEDULER not in mlflow_tags({}, "t1", "node7:42", 1)


# ---------------------------------------------------------------------- SLURM script
def test_the_slurm_script_asks_for_the_array_and_holds_no_credential(tmp_path, monkeypatch):
    monkeypatch.setenv("QLIB_EXT_MONGO_URL", SECRET_URL)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:pw@mlflow.lab:5000")
    result = CliRunner().invoke(main, ["launch", "slurm", "p1", "--workers", "4", "--max-running", "2",
                                       "--cpus-per-worker", "8", "--processes", "2", "--gpus-per-worker", "1",
                                       "--partition", "gpu", "--time", "2:00:00", "--sbatch=--account=lab",
                                       "--out", str(tmp_path / "launch"), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = result.output
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --cpus-per-task=8", "#SBATCH --gres=gpu:1",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2:00:00", "#SBATCH --account=lab",
                 "#SBATCH --signal=B:TERM@60", f"#SBATCH --output={tmp_path.resolve()}/launch/slurm-%A_%a.out",
                 f"exec {sys.executable} -m qlib_ext worker --pool p1 --workers 2 --threads 4"):
        assert line in text, line
    assert "s3cret" not in text and "pw@" not in text and "mongodb://" not in text
    assert not (tmp_path / "launch").exists(), "--dry-run wrote a file"


def test_the_slurm_script_is_a_valid_bash_script_and_names_the_profile(tmp_path):
    job = slurm.SlurmJob(pool="p1", workers=1, profile=tmp_path / "lab profile.toml", out_dir=tmp_path)
    text = slurm.script(job)
    assert f"export QLIB_EXT_PROFILE='{tmp_path / 'lab profile.toml'}'" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_launch_slurm_without_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match="sbatch not found on PATH.*--dry-run"):
        slurm.submit(slurm.SlurmJob(pool="p1", workers=2, out_dir=tmp_path))
    with pytest.raises(ConfigError, match="pool name 'a b'"):
        slurm.script(slurm.SlurmJob(pool="a b", workers=2))


# ---------------------------------------------------------------------- Kubernetes manifest
def _validate(doc: dict) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the test extra) ships the Kubernetes API schemas")
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_k8s_job_is_a_valid_work_queue_job_with_secret_references(tmp_path, monkeypatch):
    monkeypatch.setenv("QLIB_EXT_MONGO_URL", SECRET_URL)
    out = tmp_path / "job.yaml"
    result = CliRunner().invoke(main, ["launch", "k8s", "My_Pool", "--workers", "3", "--image", "reg.lab/qlib-ext:1",
                                       "--cpus-per-worker", "4", "--mem", "8Gi", "--gpus-per-worker", "1",
                                       "--provider-uri", "/data/cn", "--data-claim", "qlib-data", "--namespace",
                                       "research", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"kubectl apply -f {out}" in result.output
    text = out.read_text()
    assert "s3cret" not in text and "lab:" not in text and "10.0.0.1" not in text
    doc = yaml.safe_load(text)
    _validate(doc)
    spec = doc["spec"]
    assert doc["metadata"]["name"] == "qlib-ext-my-pool" and doc["metadata"]["namespace"] == "research"
    assert spec["parallelism"] == 3 and "completions" not in spec  # the work-queue pattern
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure" and pod["terminationGracePeriodSeconds"] == 60
    (container,) = pod["containers"]
    assert container["command"] == ["qlib-ext", "worker", "--pool", "My_Pool", "--workers", "1", "--threads", "4",
                                    "--provider-uri", "/data/cn"]
    env = {e["name"]: e for e in container["env"]}
    assert env["QLIB_EXT_MONGO_URL"]["valueFrom"]["secretKeyRef"] == {"name": "qlib-ext", "key": "mongo-url",
                                                                      "optional": False}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["key"] == "mlflow-uri"
    assert env["QLIB_EXT_K8S_POD"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert all("value" not in e for name, e in env.items() if name in ("QLIB_EXT_MONGO_URL", "MLFLOW_TRACKING_URI"))
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"},
                                      "limits": {"memory": "8Gi", "nvidia.com/gpu": 1}}
    assert container["volumeMounts"][0]["mountPath"] == "/data/cn"


def test_the_validator_catches_a_broken_job():
    """The schema check is real: a wrong type and an unknown field fail it."""
    import jsonschema

    doc = k8s.manifest(k8s.K8sJob(pool="p", workers=2, image="img"))
    _validate(doc)
    doc["spec"]["parallelism"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc)
    doc["spec"]["parallelism"] = 2
    doc["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc)


def test_launch_k8s_apply_without_kubectl_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(main, ["launch", "k8s", "p", "-n", "2", "--image", "img", "--out",
                                       str(tmp_path / "j.yaml"), "--apply"])
    assert result.exit_code == 2 and "kubectl not found on PATH" in result.output
    assert (tmp_path / "j.yaml").exists()  # written before the apply: `kubectl apply -f` it by hand
