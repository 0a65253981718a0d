"""The Prefect orchestration: override validation, the workspace lock, retry classification, artifact
rendering (fast), then the flow itself against a real Prefect server and real DVC (slow)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.params import BACKUP, render_params, restore_leftover, run_params, validate_run_config
from flows.report import RunReport, StageRun, render_markdown, render_summary
from flows.steps import StageFailed, repro_outcome, step_failure
from milora.core.errors import UnavailableError, UserError
from milora.pipeline.config import ConfigError
from milora.pipeline.dvcstate import data_hashes, stage_order
from milora.pipeline.lock import WorkspaceBusy, WorkspaceLock, held_lock, read_record
from milora.pipeline.results import StepResult
from tests.faults import fault_env
from tests.prefect_fixtures import flow_run, flow_run_id, log_contains, task_runs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory holding copies of the real params.yaml and dvc.yaml."""
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    return tmp_path


# --------------------------------------------------------------------------------------- overrides


def test_overrides_are_validated_by_the_typed_config(project):
    cfg = validate_run_config(project, None, {"adapter.rank": 4, "adapter.method": "pissa"})
    assert (cfg.adapter.rank, cfg.adapter.method) == (4, "pissa")

    with pytest.raises(ConfigError, match=r"unknown key 'adapter\.rnak'; did you mean 'adapter\.rank'"):
        validate_run_config(project, None, {"adapter.rnak": 4})
    with pytest.raises(ConfigError, match=r"adapter\.rank = -1"):
        validate_run_config(project, None, {"adapter.rank": -1})
    with pytest.raises(ConfigError, match=r"adapter\.method = 'svd' is not allowed"):
        validate_run_config(project, None, {"adapter.method": "svd"})
    with pytest.raises(ConfigError, match="overrides must be a mapping"):
        validate_run_config(project, None, [("adapter.rank", 4)])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a dotted params key"):
        validate_run_config(project, None, {"adapter..rank": 4})
    with pytest.raises(ConfigError, match="no such params file"):
        validate_run_config(project, "missing.yaml", {})


def test_render_params_sets_keys_and_keeps_comments_and_layout():
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    out = render_params(text, {"adapter.rank": 4, "train.learning_rate": 1e-4}).decode()
    changed = [(a, b) for a, b in zip(text.splitlines(), out.splitlines(), strict=True) if a != b]
    assert len(changed) == 2, changed
    assert all("#" in b for _, b in changed)  # the trailing comments stayed
    assert changed[0][1].split("#")[0].split() == ["rank:", "4"]
    assert changed[1][1].split("#")[0].split() == ["learning_rate:", "0.0001"]


def test_run_params_writes_overrides_for_the_run_and_restores_after_failure(project):
    original = (project / "params.yaml").read_bytes()
    with pytest.raises(RuntimeError, match="stage blew up"), \
            run_params(project, None, {"adapter.rank": 4}) as cfg:
        assert cfg.adapter.rank == 4
        assert validate_run_config(project).adapter.rank == 8  # the original is what validation reads
        from milora.pipeline.config import load_config

        assert load_config(project / "params.yaml").adapter.rank == 4  # what DVC and the stages read
        assert (project / BACKUP).read_bytes() == original
        raise RuntimeError("stage blew up")
    assert (project / "params.yaml").read_bytes() == original
    assert not (project / BACKUP).exists()


def test_run_params_from_another_file_and_no_change_leaves_params_yaml_alone(project):
    original = (project / "params.yaml").read_bytes()
    other = project / "small.yaml"
    other.write_text("train:\n  max_steps: 3\n", encoding="utf-8")
    with run_params(project, "small.yaml", {}) as cfg:
        assert cfg.train.max_steps == 3
        assert (project / "params.yaml").read_text() == "train:\n  max_steps: 3\n"
    assert (project / "params.yaml").read_bytes() == original
    before = (project / "params.yaml").stat().st_mtime_ns
    with run_params(project, None, {}) as cfg:
        assert cfg.adapter.rank == 8
    assert (project / "params.yaml").stat().st_mtime_ns == before


def test_a_killed_runs_overrides_are_undone_by_the_next_run(project):
    original = (project / "params.yaml").read_bytes()
    # What a run killed inside `run_params` leaves: params.yaml overridden, the original in the backup.
    (project / BACKUP).parent.mkdir(parents=True)
    (project / BACKUP).write_bytes(original)
    (project / "params.yaml").write_bytes(render_params(original.decode(), {"adapter.rank": 2}))
    assert validate_run_config(project).adapter.rank == 8  # validation already reads the original
    assert restore_leftover(project)
    assert (project / "params.yaml").read_bytes() == original
    assert not restore_leftover(project)


def test_milora_run_rejects_bad_overrides_before_starting_anything(project, capsys):
    from milora.cli import main

    assert main(["run", "--root", str(project), "-S", "adapter.rnak=4"]) == 2
    err = capsys.readouterr().err
    assert "milora run: error:" in err and "did you mean 'adapter.rank'" in err
    assert not (project / ".prefect").exists() and not (project / ".milora").exists()


def test_deploy_validates_the_schedule_and_the_server():
    from flows.commands.deploy import check_server, schedule
    from milora.core.errors import UserError
    from tests.servers import free_port

    assert schedule("0 3 * * *", "Europe/Paris").cron == "0 3 * * *"
    with pytest.raises(UserError, match=r"schedule\.cron = '61 \* \* \* \*' is not a valid cron"):
        schedule("61 * * * *", "UTC")
    with pytest.raises(UserError, match=r"schedule\.timezone = 'Mars/Base' is not an IANA timezone"):
        schedule("0 3 * * *", "Mars/Base")
    with pytest.raises(UserError, match="does not answer"):
        check_server(f"http://127.0.0.1:{free_port()}/api")


# --------------------------------------------------------------------------------------- lock


def test_lock_excludes_a_second_run_and_names_the_holder(tmp_path):
    with WorkspaceLock(tmp_path, flow_run_id="run-1", command="test") as lock:
        assert held_lock(tmp_path) is lock
        record = read_record(tmp_path)
        assert (record.pid, record.flow_run_id) == (os.getpid(), "run-1")
        with pytest.raises(WorkspaceBusy) as err:
            WorkspaceLock(tmp_path, flow_run_id="run-2").acquire()
        msg = str(err.value)
        assert "another run holds the workspace" in msg
        assert f"since {record.started_at}" in msg and f"pid {os.getpid()}" in msg and "run-1" in msg
    assert held_lock(tmp_path) is None and read_record(tmp_path) is None
    with WorkspaceLock(tmp_path, flow_run_id="run-2") as again:  # free again after release
        assert again.stale is None


# The real `milora.pipeline.lock` in a subprocess, without importing the package's torch-heavy `__init__`.
HOLDER = textwrap.dedent(f"""
    import sys, time, types
    pkg = types.ModuleType("milora")
    pkg.__path__ = [{str(REPO / "milora")!r}]
    sys.modules["milora"] = pkg
    from milora.pipeline.lock import WorkspaceLock
    lock = WorkspaceLock(sys.argv[1], flow_run_id="doomed").acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


@contextlib.contextmanager
def held_elsewhere(root):
    """Another process holds the workspace lock of `root` (flow run "doomed") until the block ends (SIGKILL)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_dead_holders_lock_is_detected_stale_and_taken_over(tmp_path):
    with held_elsewhere(tmp_path) as proc, pytest.raises(WorkspaceBusy, match=f"pid {proc.pid} .*flow run doomed"):
        WorkspaceLock(tmp_path).acquire()
    with WorkspaceLock(tmp_path, flow_run_id="next") as lock:
        assert lock.stale is not None and lock.stale.pid == proc.pid and not lock.stale.pid_alive()
        assert read_record(tmp_path).flow_run_id == "next"


def test_check_free_fails_on_a_held_lock_and_creates_nothing(tmp_path):
    WorkspaceLock(tmp_path / "fresh").check_free()  # never locked: nothing to say, nothing created
    assert not (tmp_path / "fresh").exists()
    with held_elsewhere(tmp_path) as proc, pytest.raises(WorkspaceBusy, match=f"pid {proc.pid}"):
        WorkspaceLock(tmp_path).check_free()
    WorkspaceLock(tmp_path).check_free()  # its holder died: free again
    with WorkspaceLock(tmp_path) as lock:
        assert lock.held


def test_a_busy_workspace_fails_in_under_2_seconds_before_any_server_starts(project):
    """`milora run` tries the workspace lock before Prefect (whose temporary server takes 10+ s to start)."""
    from tests.project import env

    with held_elsewhere(project) as holder:
        t0 = time.monotonic()
        busy = subprocess.run(["milora", "run", "--root", str(project)], env=env(), capture_output=True, text=True,
                              timeout=60)
        elapsed = time.monotonic() - t0
    assert busy.returncode == 2, busy.stderr
    last = busy.stderr.strip().splitlines()[0]
    assert last.startswith("milora run: error: another run holds the workspace") and f"pid {holder.pid}" in last
    assert elapsed < 2.0, f"a busy workspace took {elapsed:.1f} s to fail"
    assert not (project / ".prefect").exists()  # no Prefect server was started


def _fake_server(home: Path, detached: bool) -> int:
    """A process that looks like Prefect's temporary server of project `home`: orphaned (its launching
    shell has exited) or the child of this live Python process."""
    argv = [sys.executable, "-c", "import time; time.sleep(120)", "prefect.server.api.server:create_app"]
    env = {**os.environ, "PREFECT_HOME": str(home)}
    if not detached:
        return subprocess.Popen(argv, env=env).pid
    out = subprocess.run(["sh", "-c", " ".join(f"'{a}'" for a in argv) + " >/dev/null 2>&1 & echo $!"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_killed_runs_orphaned_temporary_server_is_stopped_by_the_next_run(tmp_path):
    from flows.commands.run import stop_orphaned_servers

    home = tmp_path / ".prefect"
    orphan, live, other = _fake_server(home, True), _fake_server(home, False), _fake_server(tmp_path / "x", True)
    try:
        time.sleep(0.5)
        assert stop_orphaned_servers(str(home)) == [orphan]
        deadline = time.time() + 10
        while _alive(orphan) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(orphan) and _alive(live) and _alive(other)  # another project's server is not ours
    finally:
        for pid in (orphan, live, other):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------- DVC output


def test_stage_order_follows_the_dvc_yaml_dag():
    order = stage_order(REPO)
    assert set(order) >= {"base", "prepare", "svd", "train", "evaluate"}

    def before(a: str, b: str) -> bool:
        return order.index(a) < order.index(b)

    assert before("base", "prepare") and before("base", "svd")
    assert before("prepare", "train") and before("svd", "train") and before("train", "evaluate")
    if "ingest" in order:
        assert before("ingest", "prepare")


def test_stage_order_rejects_a_cycle(tmp_path):
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""
        stages:
          a: {cmd: x, deps: [b.txt], outs: [a.txt]}
          b: {cmd: y, deps: [a.txt], outs: [b.txt]}
    """))
    with pytest.raises(ValueError, match="cycle"):
        stage_order(tmp_path)


def test_repro_outcome_from_the_stages_result_and_dvc_lock():
    ran = StepResult(step="train", status="ok", seconds=12.5, token="t")
    assert repro_outcome(ran, {"outs": [1]}, {"outs": [2]}) == "ran"
    assert repro_outcome(None, {"outs": [1]}, {"outs": [1]}) == "skipped"
    assert repro_outcome(None, {"outs": [1]}, {"outs": [2]}) == "restored"  # DVC's run cache checked it out


@pytest.mark.parametrize(("exc", "kind", "code"), [
    (ConfigError("params.yaml: adapter.rank = 0"), "user", 2),
    (UserError("data.source: no such file"), "user", 2),
    (UnavailableError("cannot reach the S3 endpoint"), "transient", 1),
    (ConnectionRefusedError("refused"), "transient", 1),
    (ValueError("a library's ValueError is not the user's fault"), "internal", 3),
    (RuntimeError("a bug"), "internal", 3),
])
def test_step_failures_keep_their_kind_and_message(exc, kind, code):
    result = StepResult.start("svd").fail(exc, 1.0)
    assert (result.error_kind, result.exit_code) == (kind, code)
    failed = step_failure("svd", 255, result, "DVC output is never parsed", attempt=2, seconds=3.0)
    assert (failed.kind, failed.returncode, failed.attempt) == (kind, code, 2)
    assert str(exc) in failed.detail


def test_step_failures_without_a_finished_result():
    running = StepResult(step="train", status="running", pid=123)
    assert step_failure("train", 255, running, "").kind == "transient"  # the stage process was killed
    assert step_failure("train", -9, None, "").kind == "transient"  # the launcher itself was killed
    failed = step_failure("status", 255, None, "some output\nERROR: dvc could not read dvc.yaml\n")
    assert failed.kind == "internal" and failed.detail == "ERROR: dvc could not read dvc.yaml"
    assert "not retried" in str(failed)
    import pickle

    again = pickle.loads(pickle.dumps(StageFailed("x", 1, "transient", "d", attempt=3, seconds=1.5)))
    assert (again.kind, again.attempt, again.seconds) == ("transient", 3, 1.5)


# --------------------------------------------------------------------------------------- reports


def _sample_report() -> RunReport:
    r = RunReport(root="/w", status="completed", flow_run_id="fid", flow_run_name="brave-fox", seconds=100.0,
                  overrides={"adapter.rank": 4}, data_version="abc123.dir", data_changed=True)
    r.stages = [StageRun("ingest", "ran", 2.0, 0.5, 1), StageRun("base", "skipped", 1.5, None, 1),
                StageRun("train", "ran", 80.0, 70.0, 2), StageRun("evaluate", "failed", 3.0, None, 1, "boom | x")]
    r.metrics = {"eval": {"average_accuracy": 0.41234, "accuracy": {"math": 0.5}}, "train": {"steps": 10}}
    r.registration = {"model_name": "milora", "version": "3", "decision": "promoted to champion",
                      "reason": "no champion yet", "challenger_value": 0.41, "model_uri": "models:/milora/3",
                      "run_id": "r1", "run_url": "http://127.0.0.1:5000/#/runs/r1"}
    return r


def test_markdown_artifact_has_stages_metrics_data_version_and_decision():
    md = render_markdown(_sample_report())
    assert "| train | ran | 80.0 | 70.0 | 2 |" in md
    assert "| base | skipped (unchanged) | 1.5 |  | 1 |" in md
    assert "| evaluate | FAILED: boom \\| x |" in md
    assert "| eval.average_accuracy | 0.4123 |" in md and "| eval.accuracy.math | 0.5 |" in md
    assert "`abc123.dir` (changed since the last run)" in md
    assert "registered milora version 3 as challenger; champion gate: promoted to champion" in md
    assert "[r1](http://127.0.0.1:5000/#/runs/r1)" in md
    assert "orchestration overhead: 13.5%" in md  # 100 s flow, 86.5 s in stage subprocesses


def test_summary_and_report_round_trip(tmp_path):
    r = _sample_report()
    r.root = str(tmp_path)
    r.save()
    from flows.report import load_report

    again = load_report(tmp_path)
    assert again.to_dict() == r.to_dict()
    text = render_summary(again, adapter_dir="/w/models/adapter", runs_hint="see .prefect")
    assert "milora run: completed" in text
    assert "train" in text and "[2 attempts]" in text and "skipped (unchanged)" in text
    assert "average_accuracy: 0.4123" in text and "adapter: /w/models/adapter" in text
    assert "MLflow model: models:/milora/3" in text and "see .prefect" in text


def test_a_reused_version_is_said_so_in_the_summary_and_the_message(tmp_path):
    from flows.report import registration_line, registration_line_short, registration_summary

    reg = registration_summary({"model_name": "m", "version": "1", "run_id": "r", "created": False, "reused": True,
                                "decision": {"promote": True, "reason": "no champion yet"}}, tmp_path)
    assert registration_line(reg) == ("already registered: m version 1 holds this exact adapter (same weights, base "
                                      "and data); nothing new registered; its champion gate decision: promoted to "
                                      "champion (no champion yet)")
    assert registration_line_short(reg) == "already registered as m v1 (a byte-identical adapter)"


def test_registration_summary_reads_the_register_steps_result(tmp_path):
    from flows.report import registration_summary

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "register.json").write_text(json.dumps({"tracking_uri": "http://127.0.0.1:5000"}))
    data = ({"model_name": "m", "version": "2", "run_id": "abc", "created": True,
                       "model_uri": "models:/m/2", "decision": {"promote": False, "reason": "worse by 0.1",
                                                                "challenger_value": 0.3, "champion_value": 0.4,
                                                                "champion_version": "1", "metric": "acc"}})
    out = registration_summary(data, tmp_path)
    assert out["decision"] == "champion kept" and out["champion_version"] == "1"
    assert out["run_url"] == "http://127.0.0.1:5000/#/runs/abc" and out["version"] == "2"


# --------------------------------------------------------------------------------------- slow: retries
# The stage task on real DVC and a real Prefect server, with stages that fail the way real ones do.

FLAKY = textwrap.dedent("""
    import os, signal, sys
    from milora.cli import report_error
    from milora.core.errors import UnavailableError, UserError
    from milora.pipeline.results import recorded
    mode, fails, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.makedirs("attempts", exist_ok=True)
    counter = os.path.join("attempts", out)
    n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
    open(counter, "w").write(str(n))
    try:
        with recorded(mode, "."):
            if n <= fails:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if mode == "connection":
                    raise UnavailableError("cannot reach the S3 endpoint http://127.0.0.1:9 (ConnectTimeoutError)")
                if mode == "user":
                    raise UserError("params.yaml: adapter.rank = 0: Input should be greater than 0")
                raise RuntimeError("a bug in the stage")
            open(out, "w").write("ok\\n")
    except Exception as exc:
        sys.exit(report_error(f"stage {mode}", exc))
""")


def _tiny_dvc_project(root: Path) -> Path:
    from tests.project import run

    (root / "flaky.py").write_text(FLAKY)
    stages = {f"{mode}": {"cmd": f"python flaky.py {mode} {fails} {mode}.txt", "deps": ["flaky.py"],
                          "outs": [f"{mode}.txt"]}
              for mode, fails in (("connection", 1), ("kill", 1), ("user", 9), ("bug", 9))}
    import yaml

    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (root / ".gitignore").write_text("attempts/\n")
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "--local", "core.site_cache_dir", str(root / ".dvc-site-cache")], root)
    return root


@pytest.mark.slow
def test_stage_task_retries_transient_failures_only(prefect_api, tmp_path):
    from prefect import flow

    from flows.tasks import run_stage

    root = _tiny_dvc_project(tmp_path)

    @flow(name="stage-retry-check")
    def one_stage(stage: str) -> dict:
        return run_stage.with_options(retry_delay_seconds=0)(stage, str(root))

    for stage in ("connection", "kill"):  # transient: retried, then it works
        state = one_stage(stage, return_state=True)
        assert state.is_completed(), state.message
        assert state.result()["outcome"] == "ran" and state.result()["attempts"] == 2
        (task_run,) = task_runs(state.state_details.flow_run_id)
        assert task_run.run_count == 2 and task_run.state.is_completed()
        assert (root / f"{stage}.txt").read_text() == "ok\n"

    for stage, kind, detail in (("user", "user", "params.yaml: adapter.rank = 0"),
                                ("bug", "internal", "RuntimeError: a bug in the stage")):
        state = one_stage(stage, return_state=True)  # not transient: one attempt, with its clear message
        assert state.is_failed()
        exc = state.result(raise_on_failure=False)
        assert isinstance(exc, StageFailed) and exc.kind == kind and exc.attempt == 1
        assert exc.detail.startswith(detail)
        (task_run,) = task_runs(state.state_details.flow_run_id)
        assert task_run.run_count == 1 and task_run.state.is_failed()
        assert (root / "attempts" / f"{stage}.txt").read_text() == "1"


@pytest.mark.slow
def test_register_and_push_data_retry_transient_failures_as_configured(prefect_api, tmp_path, monkeypatch):
    """The retry limit and delays come from the params' `flow` section (`with_retries`, what the flow uses):
    an MLflow server that is down (register) or an S3 remote that is down (push-data) is retried that often,
    that far apart, and the step's own message is the failure's last words."""
    from prefect import flow

    from flows.tasks import push_data, register, with_retries
    from milora.pipeline.config import FlowConfig
    from tests.pipeline_outputs import build_pipeline_outputs
    from tests.project import run
    from tests.servers import S3_TEST_ENV, free_port

    # register: the tracking server is unreachable (no retries of its own: connect_retries 0)
    root = build_pipeline_outputs(tmp_path / "reg").paths.root
    (root / "params.yaml").write_text("register: {connect_retries: 0}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead := f"http://127.0.0.1:{free_port()}")

    @flow(name="register-retry-check")
    def register_flow() -> dict:
        return with_retries(register, FlowConfig(retries=2, retry_delays=[1, 2]))(str(root))

    t0 = time.monotonic()
    state = register_flow(return_state=True)
    assert state.is_failed() and time.monotonic() - t0 >= 3.0  # waited 1 s, then 2 s
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, StageFailed) and exc.kind == "transient" and (exc.attempt, exc.max_attempts) == (3, 3)
    assert str(exc).startswith("stage 'register' failed (transient failure, retried with backoff; attempt 3 of 3; "
                               f"exit 1): MLflow tracking server {dead} is unreachable")
    (task_run,) = task_runs(state.state_details.flow_run_id)
    assert task_run.run_count == 3

    # push-data: the DVC remote's S3 endpoint is down (`dvc push` would exit 255, "unexpected error")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    data = tmp_path / "data"
    data.mkdir()
    (data / "make.py").write_text("open('rows.jsonl', 'w').write('{}\\n')\n")
    (data / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: python make.py\n    deps: [make.py]\n"
                                   "    outs: [rows.jsonl]\n")
    run(["git", "init", "-q"], data)
    run(["dvc", "init", "-q"], data)
    run(["dvc", "config", "--local", "core.site_cache_dir", str(data / ".dvc-site-cache")], data)
    run(["dvc", "repro"], data)
    run(["dvc", "remote", "add", "--local", "-d", "down", "s3://bucket/dvcstore"], data)
    run(["dvc", "remote", "modify", "--local", "down", "endpointurl", f"http://127.0.0.1:{free_port()}"], data)

    @flow(name="push-retry-check")
    def push_flow() -> dict:
        return with_retries(push_data, FlowConfig(retries=1, retry_delays=[1]))(str(data))

    state = push_flow(return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, StageFailed) and exc.kind == "transient" and (exc.attempt, exc.max_attempts) == (2, 2)
    assert "dvc push ingest to remote 'down': cannot reach it (EndpointConnectionError" in exc.detail
    (task_run,) = task_runs(state.state_details.flow_run_id)
    assert task_run.run_count == 2


# --------------------------------------------------------------------------------------- slow: the pipeline
# One workspace (a temporary copy of the project, test-sized params, its data source a directory that
# grows) shared by the tests below, in order: each starts from the state the previous one left, as a
# long-lived deployment's workspace would.

FLOW_ENTRYPOINT = "flows/pipeline.py:milora_pipeline"
DEPLOYMENT = "milora-pipeline/nightly-retrain"
PIPELINE = ["ingest", "base", "prepare", "svd", "train", "evaluate"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The project copy, with `data.source` a directory holding the synthetic task files."""
    from milora.data.synthetic import write_task_files
    from tests.project import make_project

    base = tmp_path_factory.mktemp("flow")
    source = base / "source"
    write_task_files(source, 60, 60, seed=0)
    root = make_project(base / "proj", {"data.source": str(source)})
    return root, source


def _milora(root: Path, env: dict, *args: str, extra_env: dict | None = None, check: bool = True):
    from tests.project import run

    return run(["milora", *args], root, check=check, extra_env={**env, **(extra_env or {})})


def _report(root: Path):
    from flows.report import load_report

    report = load_report(root)
    assert report is not None
    return report


def _outcomes(report) -> dict[str, str]:
    return {s.name: s.outcome for s in report.stages}


def _versions(root: Path, name: str = "milora") -> list:
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    return sorted(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name = '{name}'"),
                  key=lambda v: int(v.version))


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in arts}


def _mtimes(root: Path, *rels: str) -> dict[str, int]:
    return {rel: max(p.stat().st_mtime_ns for p in [root / rel, *(root / rel).rglob("*")]) for rel in rels}


@pytest.mark.slow
def test_full_flow_run(workspace, prefect_env, prefect_api):
    root, _ = workspace
    out = _milora(root, prefect_env, "run")
    report = _report(root)
    assert report.status == "completed", out.stdout
    assert [s for s in report.ran if s in PIPELINE] == PIPELINE
    assert _outcomes(report)["register"] == "ran" and _outcomes(report)["push-data"] == "ran"
    assert report.data_version and report.data_version.endswith(".dir") and report.data_changed

    # The flow's return value is the metrics; the summary says where the model and the runs are.
    fr = flow_run(report.flow_run_id)
    assert fr.state.is_completed() and fr.parameters["root"] == str(root)
    assert report.metrics["eval"]["average_accuracy"] >= 0
    assert json.loads((root / "metrics" / "eval.json").read_text()) == report.metrics["eval"]
    assert "stages:" in out.stdout and "average_accuracy" in out.stdout
    assert f"adapter: {root / 'models' / 'adapter'}" in out.stdout and "MLflow model: models:/milora/1" in out.stdout

    # One registered version, naming the data version and the Prefect run it came from.
    (v1,) = _versions(root)
    assert v1.tags["milora.prefect_flow_run_id"] == report.flow_run_id
    lineage = json.loads((root / "models" / "adapter" / "lineage.json").read_text())
    assert v1.tags["milora.data_sha256"] == lineage["data_hash"] and "milora.data_stale" not in v1.tags
    assert v1.tags["milora.data_hash"] == data_hashes(root)["data_hash"]  # DVC's md5 of data/prepared

    # Artifacts: the markdown report and the progress bar, finished.
    arts = _artifacts(report.flow_run_id)
    md = arts["milora-run-report"].data
    for stage in PIPELINE:
        assert f"| {stage} | ran |" in md
    assert report.data_version in md and "registered milora version 1 as challenger" in md
    assert "| eval.average_accuracy |" in md
    assert float(arts["milora-progress"].data) == 100.0
    # The stages' output is in the task logs.
    assert log_contains(report.flow_run_id, "milora.stages: stage train: done in")
    # The run's overrides never leak into the committed params.yaml.
    from tests.project import run

    assert run(["git", "status", "--porcelain", "params.yaml"], root).stdout == ""


@pytest.mark.slow
def test_second_run_skips_every_stage_and_registers_nothing(workspace, prefect_env, prefect_api):
    root, _ = workspace
    before = _mtimes(root, "models/adapter", "models/svd_init", "data/prepared", "metrics/eval.json")
    out = _milora(root, prefect_env, "run")
    report = _report(root)
    assert report.status == "nothing to retrain" and report.data_changed is False
    assert all(_outcomes(report)[s] == "up to date" for s in PIPELINE[1:])
    assert _outcomes(report)["register"] == "already registered"
    assert "nothing to retrain" in out.stdout
    assert _mtimes(root, *before) == before
    assert len(_versions(root)) == 1
    fr = flow_run(report.flow_run_id)
    assert fr.state.is_completed() and "nothing to retrain" in fr.state.message
    assert report.metrics["eval"] == json.loads((root / "metrics" / "eval.json").read_text())


@pytest.mark.slow
def test_a_params_round_trip_returns_the_registered_version(workspace, prefect_env, prefect_api):
    """`milora run -S train.seed=2` trains and registers another model; `milora run` with the committed params
    again produces v1's exact adapter (byte-reproducible stages): registration returns v1, and says so."""
    root, _ = workspace
    (v1,) = _versions(root)
    _milora(root, prefect_env, "run", "-S", "train.seed=2")
    report = _report(root)
    assert report.status == "completed" and report.registration["version"] == "2"
    assert not report.registration.get("reused")
    out = _milora(root, prefect_env, "run")
    report = _report(root)
    outcomes = _outcomes(report)
    assert report.status == "completed" and outcomes["train"] in ("ran", "restored") and outcomes["register"] == "ran"
    assert report.registration["version"] == "1" and report.registration["reused"] is True
    assert "already registered: milora version 1 holds this exact adapter" in out.stdout
    assert report.message.endswith("already registered as milora v1 (a byte-identical adapter)")
    assert flow_run(report.flow_run_id).state.message == report.message
    assert [str(v.version) for v in _versions(root)] == ["1", "2"]


@pytest.mark.slow
def test_new_rows_in_the_source_rerun_from_prepare_and_register_a_new_version(workspace, prefect_env, prefect_api):
    root, source = workspace
    before = _versions(root)
    _add_rows(source, seed=321)
    _milora(root, prefect_env, "run")
    report = _report(root)
    outcomes = _outcomes(report)
    assert report.status == "completed" and report.data_changed is True
    assert outcomes["base"] == outcomes["svd"] == "skipped"  # the data changed, not the base or the adapter init
    assert all(outcomes[s] == "ran" for s in ("ingest", "prepare", "train", "evaluate", "register"))
    versions = _versions(root)
    assert len(versions) == len(before) + 1 and report.registration["version"] == str(versions[-1].version)
    assert versions[-1].tags["milora.data_hash"] not in {v.tags["milora.data_hash"] for v in before}


@pytest.mark.slow
def test_s3_cache_down_ends_the_run_with_the_stages_own_message_after_retries(workspace, prefect_env, prefect_api,
                                                                             tmp_path):
    """The SVD cache's endpoint is down: `svd` fails transiently, is retried (`flow.retries`), and its own message
    ("cannot reach the S3 endpoint ... AWS_ENDPOINT_URL_S3") is the last line of `milora run`, the flow run's
    state message and the run summary's."""
    from tests.servers import S3_TEST_ENV, free_port

    root, _ = workspace
    dead = f"http://127.0.0.1:{free_port()}"
    down = {**S3_TEST_ENV, "AWS_ENDPOINT_URL_S3": dead, "MILORA_CACHE_DIR": str(tmp_path / "local-front")}
    out = _milora(root, prefect_env, "run", "-S", "adapter.rank=3", "-S", "svd.cache=s3://bucket/svd",
                  "-S", "flow.retries=1", "-S", "flow.retry_delays=[1]", check=False, extra_env=down)
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("milora run: error: stage 'svd' failed (transient failure, retried with backoff; attempt "
                           f"2 of 2; exit 1): SVD cache s3://bucket/svd: cannot reach the S3 endpoint {dead}")
    assert "AWS_ENDPOINT_URL_S3" in last
    report = _report(root)
    svd = report.stage("svd")
    assert (report.status, svd.outcome, svd.attempts) == ("failed", "failed", 2)
    assert report.message == last.removeprefix("milora run: error: ") and "cannot reach the S3 endpoint" in svd.detail
    state = flow_run(report.flow_run_id).state
    assert state.is_failed() and state.message == report.message
    (task_run,) = [t for t in task_runs(report.flow_run_id) if t.name == "svd"]
    assert task_run.run_count == 2
    from tests.project import run

    assert run(["git", "status", "--porcelain", "params.yaml"], root).stdout == ""


def _stage_processes(root: Path) -> list[int]:
    """Pids of `milora stage` processes working in `root` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"milora\x00stage" in (proc / "cmdline").read_bytes() \
                    and Path(os.readlink(proc / "cwd")) == root:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_killed_in_train_resumes_then_fault_at_evaluate_and_retry_skips_train(workspace, prefect_env,
                                                                              prefect_api):
    """Resumability: a run killed during `train` is re-run and training resumes from its checkpoint; that
    re-run fails at `evaluate` (fault injected by env), and `prefect flow-run retry` completes it without
    running `train` again."""
    from milora.pipeline.lock import read_record
    from tests.project import env, run

    root, _ = workspace
    args = ["run", "-S", "train.max_steps=60", "-S", "train.save_steps=4"]
    hold = root.parent / f"{root.name}-hold"
    # Training is held after its checkpoint at step 8 (a test hook): the run sits in the middle of `train`
    # for as long as the test needs, instead of the test polling for a moment it could miss.
    proc = subprocess.Popen(["milora", *args], cwd=root, env=env({**prefect_env, **fault_env(hold_at_step=(8, str(hold)))}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress_file = root / "checkpoints" / "progress.json"
    try:
        deadline = time.monotonic() + 600
        while not (hold / "held").exists():  # until training of this run is held
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        assert json.loads(progress_file.read_text())["max_steps"] == 60
        # The progress artifact follows training (train is step 5 of 7: between 4/7 and 5/7 done).
        killed_id = read_record(root).flow_run_id
        while True:
            bar = _artifacts(killed_id).get("milora-progress")
            if bar is not None and 100 * 4 / 7 < float(bar.data) < 100 * 5 / 7:
                break
            assert time.monotonic() < deadline, bar
            time.sleep(0.5)
        assert "train:" in bar.description and "% of the steps" in bar.description
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    # Stopped cleanly: no stage left running, lock released, params.yaml restored, checkpoints kept.
    assert _stage_processes(root) == []
    assert read_record(root) is None
    assert run(["git", "status", "--porcelain", "params.yaml"], root).stdout == ""
    assert flow_run(killed_id).state.is_crashed()
    assert sorted(root.joinpath("checkpoints").glob("checkpoint-*"))

    # Run again, with a fault injected into `evaluate`: training resumes, then evaluate fails, not retried.
    versions_before = len(_versions(root))
    failing = _milora(root, prefect_env, *args, check=False, extra_env=fault_env(fault="evaluate"))
    assert failing.returncode == 3  # an internal error (a bug), not the user's
    assert "milora.stages.train: resuming from checkpoints/checkpoint-" in failing.stdout + failing.stderr
    assert "stage 'evaluate' failed" in failing.stderr and "fault injected" in failing.stderr
    failed = _report(root)
    outcomes = _outcomes(failed)
    assert (failed.status, outcomes["train"], outcomes["evaluate"], outcomes["register"]) == \
        ("failed", "ran", "failed", "not run")
    assert all(outcomes[s] == "skipped" for s in ("base", "prepare", "svd"))
    assert [s.attempts for s in failed.stages if s.name == "evaluate"] == [1]  # a bug is not retried
    assert f"prefect flow-run retry {failed.flow_run_id} --entrypoint {FLOW_ENTRYPOINT}" in failing.stdout
    assert json.loads(progress_file.read_text())["step"] == 60
    assert flow_run(failed.flow_run_id).state.is_failed()
    assert run(["git", "status", "--porcelain", "params.yaml"], root).stdout == ""
    trained = _mtimes(root, "models/adapter", "checkpoints")

    # `prefect flow-run retry` re-runs that flow run (same overrides), without the fault: train is skipped.
    run(["prefect", "flow-run", "retry", failed.flow_run_id, "--entrypoint", FLOW_ENTRYPOINT], root,
        extra_env=prefect_env)
    report = _report(root)
    assert report.flow_run_id == failed.flow_run_id and report.status == "completed"
    outcomes = _outcomes(report)
    assert outcomes["evaluate"] == "ran" and outcomes["register"] == "ran"
    assert all(outcomes[s] == "skipped" for s in ("base", "prepare", "svd", "train"))
    assert _mtimes(root, *trained) == trained  # train did not run again
    versions = _versions(root)
    assert len(versions) == versions_before + 1
    assert versions[-1].tags["milora.prefect_flow_run_id"] == failed.flow_run_id
    assert flow_run(failed.flow_run_id).state.is_completed()


def _add_rows(source: Path, seed: int = 123) -> None:
    """New rows in the data source, as a growing production source gets them."""
    from milora.data.synthetic import math_rows

    with (source / "math.jsonl").open("a", encoding="utf-8") as f:
        for row in math_rows(20, seed=seed):
            f.write(json.dumps(row) + "\n")


def _wait_for_deployment(name: str, timeout: float = 180) -> object:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


@pytest.mark.slow
def test_deployment_scheduled_retraining_with_override(workspace, prefect_env, prefect_api, tmp_path):
    """`milora deploy` serves nightly-retrain in the background; the real CLI triggers it."""
    from tests.project import env, run

    root, source = workspace
    log = (tmp_path / "serve.log").open("wb")
    hold = tmp_path / "hold"  # the deployment's run is held in `train` (a test hook) until the test releases it
    serve = subprocess.Popen(["milora", "deploy", "--root", str(root)], cwd=root,
                             env=env({**prefect_env, **fault_env(hold_at_step=(4, str(hold)))}),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deployment = _wait_for_deployment(DEPLOYMENT)
        assert deployment.parameters == {"root": str(root)}
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]

        # New rows in the source + a rank override: the run versions the new data and retrains.
        _add_rows(source)
        versions_before = len(_versions(root))
        started = run(["prefect", "deployment", "run", DEPLOYMENT, "--params",
                       '{"overrides": {"adapter.rank": 2}}'], root, extra_env=prefect_env)
        fid = flow_run_id(started.stdout)
        # While it runs (held in `train`), a second run on the same workspace is refused with the holder's name.
        deadline = time.monotonic() + 300
        from milora.pipeline.lock import read_record

        while not (hold / "held").exists():
            assert time.monotonic() < deadline, "the deployment run never reached training"
            time.sleep(0.5)
        assert read_record(root).flow_run_id == fid
        busy = _milora(root, prefect_env, "run", check=False)
        assert busy.returncode == 2
        assert "another run holds the workspace" in busy.stderr and fid in busy.stderr
        (hold / "release").touch()
        watched = run(["prefect", "flow-run", "watch", fid], root, extra_env=prefect_env, check=False)
        fr = flow_run(fid)
        assert fr.state.is_completed(), watched.stdout[-3000:]
        assert fr.parameters["overrides"] == {"adapter.rank": 2}
        report = _report(root)
        assert report.flow_run_id == fid and report.data_changed is True
        outcomes = _outcomes(report)
        assert all(outcomes[s] == "ran" for s in ("prepare", "svd", "train", "evaluate", "register"))
        assert outcomes["base"] == "skipped"
        lineage = json.loads((root / "models" / "adapter" / "lineage.json").read_text())
        assert lineage["rank"] == 2  # the override reached the stages
        versions = _versions(root)
        assert len(versions) == versions_before + 1
        assert versions[-1].tags["milora.rank"] == "2"
        assert versions[-1].tags["milora.data_sha256"] == lineage["data_hash"]
        assert versions[-1].tags["milora.data_hash"] != versions[0].tags["milora.data_hash"]
        assert run(["git", "status", "--porcelain", "params.yaml"], root).stdout == ""

        # The same parameters and an unchanged source: nothing to retrain, no new version.
        again = run(["prefect", "deployment", "run", DEPLOYMENT, "--params", '{"overrides": {"adapter.rank": 2}}',
                     "--watch", "--watch-timeout", "600"], root, extra_env=prefect_env)
        state = flow_run(flow_run_id(again.stdout)).state
        assert state.is_completed() and "nothing to retrain" in state.message
        assert len(_versions(root)) == versions_before + 1

        # A config error fails at once: no task runs at all, the message names the key.
        bad = run(["prefect", "deployment", "run", DEPLOYMENT, "--params", '{"overrides": {"adapter.rnak": 2}}',
                   "--watch", "--watch-timeout", "300"], root, extra_env=prefect_env, check=False)
        assert bad.returncode == 1
        bad_id = flow_run_id(bad.stdout)
        state = flow_run(bad_id).state
        assert state.is_failed() and "did you mean 'adapter.rank'" in state.message
        assert task_runs(bad_id) == []
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()


@pytest.mark.slow
def test_a_config_error_in_a_stage_fails_without_retries(workspace, prefect_env, prefect_api):
    """A value only the model can reject (rank above the matrix size) fails `svd` once, with its message."""
    root, _ = workspace
    out = _milora(root, prefect_env, "run", "-S", "adapter.rank=4096", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("milora run: error: stage 'svd' failed (configuration")
    assert "adapter rank 4096 is too large" in out.stderr
    report = _report(root)
    svd = next(s for s in report.stages if s.name == "svd")
    assert (svd.outcome, svd.attempts) == ("failed", 1)
    (task_run,) = [t for t in task_runs(report.flow_run_id) if t.name == "svd"]
    assert task_run.run_count == 1 and task_run.state.is_failed()
