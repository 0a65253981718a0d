"""A real Prefect server process on 127.0.0.1 for the orchestration tests.

`prefect_server` starts `prefect server start` once per session with an isolated `PREFECT_HOME`
(analytics off, no UI); `prefect_env` is the environment a subprocess needs to talk to it;
`prefect_api` points this process's Prefect client at it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import BIN, ServerProcess, free_port

PREFECT_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "INFO",
    # Workers and `flow.serve` runners look for scheduled runs every 10 s by default: every deployment run of a
    # test would wait up to that long to start (and again after a retry).
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_RUNNER_POLL_FREQUENCY": "1",
}


class PrefectServer(ServerProcess):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME."""

    def __init__(self, home: Path):
        self.home = home
        port = free_port()
        env = {**PREFECT_ENV, "PREFECT_HOME": str(home), "PREFECT_API_URL": ""}
        super().__init__([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                         port, "/api/health", env=env, log_path=home / "server.log", timeout=180)

    @property
    def api_url(self) -> str:
        """The API URL clients use (`PREFECT_API_URL`)."""
        return f"{self.url}/api"


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """A real Prefect server for the whole session."""
    home = tmp_path_factory.mktemp("prefect-server")
    server = PrefectServer(home).start()
    yield server
    server.stop()


@pytest.fixture
def prefect_env(prefect_server, tmp_path_factory) -> dict[str, str]:
    """Environment variables (to add to the usual ones) for subprocesses that use the test server."""
    client_home = tmp_path_factory.mktemp("prefect-client")
    return {**PREFECT_ENV, "PREFECT_API_URL": prefect_server.api_url, "PREFECT_HOME": str(client_home)}


@pytest.fixture
def prefect_api(prefect_server) -> Iterator[str]:
    """Point this process's Prefect client (flows run in-process, API queries) at the test server."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url,
                                     PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        yield prefect_server.api_url
        APILogWorker.drain_all(timeout=10)  # send the test's logs while the server is still up


# ----------------------------------------------------------------------------- reading a run back

def task_runs(flow_run_id) -> list:
    """The task runs of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def flow_run(flow_run_id):
    """The flow run as the server has it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def log_contains(flow_run_id, text: str) -> bool:
    """Whether any log line of the flow run contains `text` (read page by page)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                limit=200, offset=0)
        offset = 200
        while logs and not any(text in log.message for log in logs):
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    limit=200, offset=offset)
            offset += 200
        return bool(logs)


def flow_run_id(cli_output: str) -> str:
    """The flow run id a `prefect deployment run` / `milora` command printed."""
    import re

    return re.search(r"UUID: ([0-9a-f-]{36})", cli_output).group(1)
