"""Starting capture runs and reading the last one, from Prefect (never process memory:
the status survives an API restart and every API replica sees the same)."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID, uuid4

from deployments.wake import ring
from memdump.runinfo import (
    ALL,
    BUSY_RETRY_DELAYS,
    BUSY_STATUS,
    IN_PROGRESS,
    NO_RUNNING_VM,
    PROGRESS_KEY,
    TARGETS_KEY,
    TIMED_OUT,
    Progress,
    Target,
    tagged_hypervisor,
    tagged_step,
    targets_from_data,
    unlisted_id,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Artifact, FlowRun, TaskRun

logger = logging.getLogger(__name__)

# Prefect's API answers at most this many rows per query (PREFECT_API_DEFAULT_LIMIT).
PAGE = 200

_PREFECT_PREFIX = re.compile(r"^Task run encountered an exception (?:[A-Za-z_][\w.]*: )?")


@dataclass(frozen=True)
class VMRun:
    """One VM of a capture run: its capture task run (the VM's whole chain: capture,
    offload, record), and the progress artifact it writes while the dump streams."""

    vm_id: str | None  # None: a capture task run its ended flow run never named (Target)
    state: str  # pending, running, retrying, completed, failed, timeout, error
    progress: float | None  # percent of the dump streamed, from the progress artifact
    error: str | None
    bytes_done: int | None = None  # from the artifact's metadata (memdump.runinfo.Progress)
    bytes_total: int | None = None
    # What an entry that is not a VM's capture says: a hypervisor of "all" that was
    # listed and runs no VM ("<hypervisor>:all", state completed).
    note: str | None = None

    @property
    def final(self) -> bool:
        return self.state in ("completed", "failed", "timeout", "error")


@dataclass(frozen=True)
class RunSummary:
    id: str
    state_type: str
    state_name: str
    vm_ids: list[str]
    triggered_at: datetime
    duration: float | None
    message: str | None
    vms: tuple[VMRun, ...] = ()


@dataclass(frozen=True)
class Triggered:
    """A run a trigger created: its id, and when it is due as Prefect stored it (its
    expected start time), the one timestamp of that trigger: POST /trigger answers it and
    /status reads the same field back (RunSummary.triggered_at)."""

    id: str
    triggered_at: datetime


class TriggerBusy(Exception):
    """Another trigger (in this or another API replica) made a run from the same view
    first: this one makes none."""


@dataclass(frozen=True)
class TriggerView:
    """What a trigger decides on: the newest due run, read in one request."""

    now: datetime  # the Prefect server's clock, the one its run timestamps use
    last: RunSummary | None


class Runs(Protocol):
    def trigger(
        self,
        vm_ids: list[str],
        source: str,
        at: datetime | None = None,
        after: TriggerView | None = None,
    ) -> Triggered:
        """Create a flow run (returns at once) and return it; ``at``: its start time
        (the server's clock, from TriggerView.now), else now. ``after``: the view the
        trigger decided on; the run is made only if no trigger made one from the same
        view (TriggerBusy otherwise), in every API replica."""
        ...

    def latest(self) -> RunSummary | None:
        """The newest capture run that is due (not a future scheduled one)."""
        ...

    def view(self) -> TriggerView:
        """The newest due run's state and time, and the server's clock: what a trigger's
        rate check decides on (not the per-VM detail /status shows)."""
        ...


# A trigger with the rate limit on creates its run with this idempotency key, named by
# the newest run it saw: two triggers that saw the same newest run (in any API replica)
# give Prefect one key, and Prefect makes one run of it (a unique index on the flow and
# the key); the second gets that run back, made by another call (TRIGGER_CONTEXT), and is
# refused. A trigger that saw a newer run was refused by the rate check already, since
# that run is in progress. Nothing is held: nothing is left held by a crash or restart.
AFTER_KEY = "memdump-trigger-after:{}"
# The flow run's context entry that names the API call that made it (a random id).
TRIGGER_CONTEXT = "memdump_trigger"

# A flow run's creation (and the rate check's read) answered busy (BUSY_STATUS) is tried
# again after these delays, then once more through Prefect's own client: one trigger of
# 40 sent back to back took 34 s through Prefect's client alone (2026-11-30).
CREATE_RETRY_DELAYS = BUSY_RETRY_DELAYS
RETRY_STATUS = BUSY_STATUS
_sleep = time.sleep  # the retries' sleep (tests replace it)


class PrefectRuns:
    def __init__(self, flow_name: str, deployment: str, wake: Path | None = None) -> None:
        self.flow_name = flow_name
        self.deployment = deployment
        # The runner's doorbell (deployments.wake), rung after each trigger's flow run is
        # created: under `memdump serve` the run starts now, not at the runner's next poll.
        self.wake = wake
        # Per-VM detail of the last finished run read: it cannot change any more, so a
        # finished run costs one Prefect query again, as before the detail existed.
        self._final: tuple[str, tuple[VMRun, ...]] | None = None
        # The Prefect server's clock minus this machine's, from the Date of its last
        # answer (whole seconds): which runs are due is asked on the server's clock.
        self._skew = timedelta(0)
        # What the last read of the latest run found (see _vms): kept for the next one.
        self._read: _RunRead | None = None
        # The deployment's id, looked up by name once (again if Prefect no longer has it).
        self._deployment_id: UUID | None = None
        self._client_lock = threading.Lock()
        self._shared: tuple[tuple[str, ...], Any] | None = None
        self._shared_http: tuple[tuple[str, ...], Any] | None = None

    def _client(self) -> Any:
        """One started Prefect client for this object's calls, from every thread (httpx's
        client is thread-safe): its connections are kept alive and it fetches its CSRF
        token once, where a client per call paid both on every trigger. Made again when
        Prefect's settings name another server."""
        from prefect import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

        key = tuple(
            str(v.value() or "")
            for v in (PREFECT_API_URL, PREFECT_API_AUTH_STRING, PREFECT_API_KEY)
        )
        with self._client_lock:
            if self._shared is None or self._shared[0] != key:
                client = get_client(sync_client=True)
                client.__enter__()
                self._shared = (key, client)
            return self._shared[1]

    def _http(self) -> Any:
        """A plain httpx client on Prefect's API (its URL, auth string or key, TLS
        settings) for the one request that creates a trigger's flow run, so that its
        retries are memdump's (CREATE_RETRY_DELAYS), not the Prefect client's seconds."""
        import base64
        import ssl

        import httpx
        from prefect.settings import (
            PREFECT_API_AUTH_STRING,
            PREFECT_API_KEY,
            PREFECT_API_SSL_CERT_FILE,
            PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
            PREFECT_API_URL,
        )

        url, auth, key = (
            str(v.value() or "")
            for v in (PREFECT_API_URL, PREFECT_API_AUTH_STRING, PREFECT_API_KEY)
        )
        with self._client_lock:
            if self._shared_http is None or self._shared_http[0] != (url, auth, key):
                headers = {}
                if key:
                    headers["Authorization"] = f"Bearer {key}"
                if auth:
                    token = base64.b64encode(auth.encode()).decode()
                    headers["Authorization"] = f"Basic {token}"
                verify: bool | ssl.SSLContext = True
                if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
                    verify = False
                elif PREFECT_API_SSL_CERT_FILE.value():
                    verify = ssl.create_default_context(
                        cafile=str(PREFECT_API_SSL_CERT_FILE.value())
                    )
                http = httpx.Client(
                    base_url=url.rstrip("/") + "/", headers=headers, timeout=30.0, verify=verify
                )
                self._shared_http = ((url, auth, key), http)
            return self._shared_http[1]

    def warm(self) -> None:
        """What the first trigger would pay, paid at start-up instead (the API calls it
        on a thread when it starts): Prefect's client imported, started, its CSRF token
        fetched and the deployment's id looked up; 1.7-2.2 s of the first POST /trigger
        after `memdump serve` started, measured 2026-11-30. Without a Prefect server configured
        (PREFECT_API_URL unset: the client would start an ephemeral one) nothing; any
        failure is left to the first trigger, which tries the same again."""
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            return
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
            FlowFilter,
            FlowFilterName,
        )

        try:
            client = self._client()
            # A POST (a filter, where a GET by name would do): the client fetches its
            # CSRF token with its first POST, which is otherwise the first trigger's.
            found = client.read_deployments(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[self.flow_name])),
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[self.deployment])
                ),
                limit=1,
            )
            if found and self._deployment_id is None:
                self._deployment_id = found[0].id
            self._http()  # the client the run's creation goes through
            self._newest(client)  # the rate check's read: its code, and the clock skew
        except Exception as exc:  # noqa: BLE001 - the first trigger meets it again
            logger.debug("warming the Prefect client: %s", exc)

    def trigger(
        self,
        vm_ids: list[str],
        source: str,
        at: datetime | None = None,
        after: TriggerView | None = None,
    ) -> Triggered:
        """The flow run, created from the deployment's remembered id: one request, where
        run_deployment(timeout=0) looked the deployment up by name every time."""
        import httpx

        client = self._client()
        try:
            run = self._create(client, vm_ids, source, at, after)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 404:
                raise
            self._deployment_id = None  # deleted (and perhaps made again: a new id)
            run = self._create(client, vm_ids, source, at, after)
        if self.wake is not None:
            ring(self.wake)
        # The run as the server stored it: the same field /status reads (_latest).
        return Triggered(str(run.id), due_time(run))

    def _create(
        self,
        client: Any,
        vm_ids: list[str],
        source: str,
        at: datetime | None,
        after: TriggerView | None,
    ) -> Any:
        """POST /deployments/{id}/create_flow_run, the body Prefect's client would send,
        with an idempotency key: a try that the server did take (an answer lost) is not
        made twice by the retries, which are CREATE_RETRY_DELAYS apart; after them (or
        refused, e.g. a CSRF-protected server) Prefect's own client, same key. With
        ``after``, the key is AFTER_KEY's, and a run there already that another call
        made is another trigger's (TriggerBusy)."""
        from prefect.client.schemas.actions import DeploymentFlowRunCreate
        from prefect.client.schemas.objects import FlowRun
        from prefect.states import Scheduled, to_state_create

        if self._deployment_id is None:
            found = client.read_deployment_by_name(f"{self.flow_name}/{self.deployment}")
            self._deployment_id = found.id
        parameters = {"vm_ids": vm_ids, "source": source}
        # Unset: this machine's clock, as run_deployment did (the run is due now).
        state: Any = Scheduled(scheduled_time=at or datetime.now(UTC))
        tags = ["memdump", f"source:{source}"]
        # This call's mark on the run it makes: a run found under an AFTER_KEY key
        # without it is another trigger's. (Prefect's 201/200 cannot tell: a run made
        # concurrently with this request counts as made by it.)
        nonce = str(uuid4())
        key = nonce if after is None else AFTER_KEY.format(after.last.id if after.last else "none")
        body = DeploymentFlowRunCreate(
            parameters=parameters,
            state=to_state_create(state),
            tags=tags,
            idempotency_key=key,
            context={TRIGGER_CONTEXT: nonce},
        ).model_dump(mode="json", exclude_unset=True)

        path = f"deployments/{self._deployment_id}/create_flow_run"

        def mine(run: FlowRun) -> FlowRun:
            if after is not None and (run.context or {}).get(TRIGGER_CONTEXT) != nonce:
                raise TriggerBusy
            return run

        resp, why = self._post(path, body)
        if resp is not None:
            if resp.status_code == 404:
                resp.raise_for_status()  # the deployment is gone: trigger() looks it up again
            return mine(FlowRun.model_validate(resp.json()))
        logger.info("creating the flow run: %s; again through Prefect's client", why)
        return mine(
            client.create_flow_run_from_deployment(
                self._deployment_id,
                parameters=parameters,
                state=state,
                tags=tags,
                idempotency_key=key,
                context={TRIGGER_CONTEXT: nonce},
            )
        )

    def _post(self, path: str, body: Any) -> tuple[Any, str]:
        """POST ``body`` to Prefect's API on the plain client, tried again on a busy
        answer (RETRY_STATUS) CREATE_RETRY_DELAYS apart: (the answer, "") if it is a
        success or a 404; else (None, why), and the caller asks Prefect's client, which
        retries in its own way (2, 4, 8 s apart: a trigger behind one 503 took 6.7 s)."""
        import httpx

        http = self._http()
        try:
            resp = http.post(path, json=body)
            for delay in CREATE_RETRY_DELAYS:
                if resp.status_code not in RETRY_STATUS:
                    break
                _sleep(delay)
                resp = http.post(path, json=body)
            if resp.is_success or resp.status_code == 404:
                return resp, ""
            return None, str(resp.status_code)
        except httpx.TransportError as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def view(self) -> TriggerView:
        run, now = self._newest(self._client())
        return TriggerView(now, None if run is None else _summary(run, ()))

    def latest(self) -> RunSummary | None:
        return self._latest(self._client())

    def _newest(self, client: Any) -> tuple[FlowRun | None, datetime]:
        """The newest capture flow run that is due, and the server's time: one query.
        Due on the server's clock (this machine's, corrected by the skew its last answer
        showed); within the coming second counts, as the Date header drops fractions."""
        from prefect.client.schemas.filters import (
            FlowFilter,
            FlowFilterName,
            FlowRunFilter,
            FlowRunFilterExpectedStartTime,
        )
        from prefect.client.schemas.objects import FlowRun
        from prefect.client.schemas.sorting import FlowRunSort

        due = datetime.now(UTC) + self._skew + timedelta(seconds=1)
        # The scheduler creates next week's run ahead of time; it is not "the last".
        runs = FlowRunFilter(
            expected_start_time=FlowRunFilterExpectedStartTime(before_=due)  # type: ignore[arg-type]
        )
        body = {  # what read_flow_runs sends; its answer's Date is the server's clock
            "flows": FlowFilter(name=FlowFilterName(any_=[self.flow_name])).model_dump(mode="json"),
            "flow_runs": runs.model_dump(mode="json", exclude_unset=True),
            "sort": FlowRunSort.EXPECTED_START_TIME_DESC.value,
            "limit": 1,
        }
        local = datetime.now(UTC)
        resp, why = self._post("flow_runs/filter", body)
        if resp is None or not resp.is_success:
            logger.info("reading the last run: %s; again through Prefect's client", why)
            resp = client.request("POST", "/flow_runs/filter", json=body)
        now = _server_time(resp, local)
        self._skew = _clock_skew(now - local)
        found = FlowRun.model_validate_list(resp.json())
        return (found[0] if found else None), now

    def _latest(self, client: Any) -> RunSummary | None:
        run, _ = self._newest(client)
        if run is None:
            return None
        state = run.state
        run_final = state is not None and state.is_final()
        cached = self._final
        if cached is not None and cached[0] == str(run.id):
            vms = cached[1]
        else:
            vms = self._vms(client, run, _vm_ids(run), run_final)
            read = self._read
            settled = read is not None and all(_settled(t) for t in read.task_runs.values())
            if run_final and all(v.final for v in vms) and settled:
                self._final = (str(run.id), vms)
                self._read = None
        return _summary(run, vms)

    def _vms(
        self, client: Any, run: FlowRun, vm_ids: list[str], run_final: bool
    ) -> tuple[VMRun, ...]:
        """The run's per-VM detail, from the task runs of the run and of its child flow
        runs (each VM's chain, with the fan-out over deployments) and the progress
        artifacts of their captures; more than ``PAGE`` rows of either pages.

        A task run that has finished cannot change, so what was read is kept for the next
        read of the same run, which asks only: how many task runs there are; those in
        flight at the last read or now (the finished VMs' are kept, not read again); the
        progress artifacts of the captures among them. Everything is read again when the
        count says a task run came and finished between two reads (then neither set
        has it)."""
        from prefect.client.schemas.filters import (
            Operator,
            TaskRunFilter,
            TaskRunFilterId,
            TaskRunFilterState,
            TaskRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        scope = _run_and_children(run.id)
        last = self._read
        changed: list[TaskRun] | None = None
        if last is not None and last.run_id == str(run.id):
            total = _count_task_runs(client, scope)
            still = [
                t.id
                for t in last.task_runs.values()
                if _kind(t)[0] in IN_PROGRESS or not _settled(t)
            ]
            in_flight = TaskRunFilter(
                operator=Operator.or_,  # type: ignore[call-arg]  # a field at runtime
                id=TaskRunFilterId(any_=still) if still else None,
                state=TaskRunFilterState(
                    type=TaskRunFilterStateType(any_=[StateType(k) for k in sorted(IN_PROGRESS)])
                ),
            )
            changed = _task_runs(client, scope, in_flight)
            task_runs = {**last.task_runs, **{str(t.id): t for t in changed}}
            artifacts = dict(last.artifacts)
            if len(task_runs) != total:
                changed = None
        if changed is None:
            changed = _task_runs(client, scope, None)
            task_runs = {str(t.id): t for t in changed}
            artifacts = {}
        captures = [t.id for t in changed if _step(t) == "capture"]
        if captures:
            artifacts.update({str(a.id): a for a in _progress_artifacts(client, captures)})
        # Which VM each capture is for: its flow run's targets, read until every capture
        # read so far has its own (a flow run publishes them once, after submitting).
        named = _named(artifacts.values())
        unnamed = {
            t.flow_run_id
            for t in task_runs.values()
            if _step(t) == "capture" and str(t.id) not in named and t.flow_run_id is not None
        }
        if unnamed:
            artifacts.update({str(a.id): a for a in _target_artifacts(client, list(unnamed))})
        self._read = _RunRead(str(run.id), task_runs, artifacts)
        return vm_detail(
            vm_ids, run_final, task_runs.values(), artifacts.values(), run_id=str(run.id)
        )


@dataclass(frozen=True)
class _RunRead:
    """What was read of one run: its task runs and its children's, and the progress
    artifacts of their captures, by id."""

    run_id: str
    task_runs: dict[str, TaskRun]
    artifacts: dict[str, Artifact]


def _task_runs(client: Any, scope: Any, which: Any) -> list[TaskRun]:
    from prefect.client.schemas.sorting import TaskRunSort

    return _pages(
        lambda offset: client.read_task_runs(
            flow_run_filter=scope,
            task_run_filter=which,
            sort=TaskRunSort.ID_DESC,
            limit=PAGE,
            offset=offset,
        )
    )


def _count_task_runs(client: Any, scope: Any) -> int:
    resp = client.request(
        "POST",
        "/task_runs/count",
        json={"flow_runs": scope.model_dump(mode="json", exclude_unset=True)},
    )
    return int(resp.json())


def _progress_artifacts(client: Any, task_runs: list[UUID]) -> list[Artifact]:
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        ArtifactFilterTaskRunId,
        ArtifactFilterType,
    )

    return _artifacts(
        client,
        ArtifactFilter(
            task_run_id=ArtifactFilterTaskRunId(any_=task_runs),
            type=ArtifactFilterType(any_=["progress"]),
            key=ArtifactFilterKey(like_=f"{PROGRESS_KEY}%"),
        ),
    )


def _target_artifacts(client: Any, flow_runs: list[UUID]) -> list[Artifact]:
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    return _artifacts(
        client,
        ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=flow_runs),
            key=ArtifactFilterKey(any_=[TARGETS_KEY]),
        ),
    )


def _artifacts(client: Any, which: Any) -> list[Artifact]:
    """Every artifact ``which`` selects, newest first, a page at a time."""
    from prefect.client.schemas.sorting import ArtifactSort

    return _pages(
        lambda offset: client.read_artifacts(
            artifact_filter=which, sort=ArtifactSort.CREATED_DESC, limit=PAGE, offset=offset
        )
    )


def _targets_by_run(artifacts: Iterable[Artifact]) -> dict[str, list[Target]]:
    """Flow run id -> its targets (memdump.runinfo.Target), in the order published, from
    the targets artifacts among ``artifacts``."""
    out: dict[str, list[Target]] = {}
    for a in sorted(artifacts, key=_created):
        if a.key == TARGETS_KEY:
            out.setdefault(str(a.flow_run_id), []).extend(targets_from_data(a.data))
    return out


def _named(artifacts: Iterable[Artifact]) -> dict[str, tuple[str, str | None]]:
    """Task run id -> (VM id, hypervisor or None), every flow run's targets together."""
    return {
        t.task_run_id: (t.vm_id, t.hypervisor)
        for run in _targets_by_run(artifacts).values()
        for t in run
    }


def _run_and_children(run_id: UUID) -> Any:
    """A flow run and its child flow runs (run_deployment from its tasks links each
    child to it through a placeholder task run of its own)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        Operator,
    )

    return FlowRunFilter(
        operator=Operator.or_,  # type: ignore[call-arg]  # a field at runtime (OperatorMixin)
        id=FlowRunFilterId(any_=[run_id]),
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]),
    )


def _vm_ids(run: FlowRun) -> list[str]:
    return [str(v) for v in (run.parameters.get("vm_ids") or [])]


def _summary(run: FlowRun, vms: tuple[VMRun, ...]) -> RunSummary:
    state = run.state
    duration = None
    if state is not None and state.is_final() and run.start_time and run.end_time:
        duration = round((run.end_time - run.start_time).total_seconds(), 3)
    return RunSummary(
        id=str(run.id),
        state_type=state.type.value if state else "SCHEDULED",
        state_name=(state.name or "") if state else "Scheduled",
        vm_ids=_vm_ids(run),
        triggered_at=due_time(run),
        duration=duration,
        message=state.message if state else None,
        vms=vms,
    )


# What a Date header cannot tell from agreeing clocks: it drops fractions, and uvicorn
# (Prefect's server) refreshes it once a second, so it reads up to 2 s behind the server's
# clock (more with its event loop busy). A difference inside this window is taken as none.
DATE_LAG = (timedelta(seconds=-3), timedelta(seconds=1))


def _clock_skew(seen: timedelta) -> timedelta:
    """The server's clock minus this machine's, from one Date header: none within
    DATE_LAG (else a run made a moment ago on this clock would look not due yet)."""
    return timedelta(0) if DATE_LAG[0] <= seen <= DATE_LAG[1] else seen


def _server_time(resp: Any, local: datetime) -> datetime:
    """The Prefect server's clock, from its answer's Date header (whole seconds: the
    rate check rounds in its favour). Without one, this machine's clock (``local``)."""
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(resp.headers["date"]).astimezone(UTC)
    except (KeyError, TypeError, ValueError):
        return local


def _pages(read: Any) -> list[Any]:
    out: list[Any] = []
    while True:
        page = list(read(len(out)))
        out.extend(page)
        if len(page) < PAGE:
            return out


def _step(tr: Any) -> str | None:
    """What a task run is (capture, offload, record, list), from the tag its task
    declares (memdump.runinfo): a renamed task or run keeps its step."""
    return tagged_step(tr.tags or ())


def _kind(tr: Any) -> tuple[str, str]:
    """A task run's state type and name (PENDING before it has a state)."""
    state = tr.state
    kind = state.type if state is not None else tr.state_type
    name = state.name if state is not None else tr.state_name
    return (kind.value if kind is not None else "PENDING"), (name or "")


def _settled(tr: Any) -> bool:
    """Whether the task run's state itself was there when read. The Prefect server
    records a task run's states from its events (TaskRunRecorder), its row (state type
    and name) and the state (with its message) apart: a read between the two gives a
    FAILED run without its message (shown as "Failed" instead of the error). Such a task
    run is read again, and a run with one is not kept as final."""
    return tr.state is not None


def _message(tr: Any) -> str:
    msg = (tr.state.message if tr.state is not None else None) or _kind(tr)[1]
    return _PREFECT_PREFIX.sub("", str(msg)).strip()


def vm_detail(
    vm_ids: Sequence[str],
    run_final: bool,
    task_runs: Iterable[TaskRun],
    artifacts: Iterable[Artifact],
    run_id: str | None = None,
) -> tuple[VMRun, ...]:
    """Per-VM state of one capture flow run, from its task runs and artifacts.

    Which VM a capture task run is for is in its flow run's targets artifact, which the
    flow publishes once it has submitted them (memdump.runinfo.Target): a target whose
    task run does not exist yet is pending (the pool of capture threads has not taken it:
    flows.capture), and a capture no target names is shown without a VM id once its run
    ended. Its progress is the newest progress artifact of that task run, the byte counts
    in the artifact's metadata.

    With the fan-out over deployments (MEMDUMP_ORCHESTRATION__FANOUT=deployments), the
    run's VMs are dealt into parts, each part's chains a child flow run: the run's
    targets name, for each VM, the task run that waits for its part (several VMs, one
    task run), and the child's own capture task run for the VM (the same VM and
    hypervisor in the child's targets; the newest, if the part was started again)
    streams, writes the progress artifact and ends as the VM's chain ends.
    ``task_runs`` may hold the children's task runs too; with ``run_id`` (the run's id)
    only the run's own targets make entries, the children's give them their state."""
    runs = list(task_runs)
    arts = list(artifacts)
    by_run = _targets_by_run(arts)
    by_id = {str(t.id): t for t in runs}
    if run_id is None:
        targets = [t for run in by_run.values() for t in run]
        children: dict[str, list[Target]] = {}
    else:
        targets = by_run.get(run_id, [])
        children = {fr: ts for fr, ts in by_run.items() if fr != run_id}
    attempt: dict[tuple[str, str | None], Any] = {}  # a VM's capture in a child, newest
    for target in (t for ts in children.values() for t in ts):
        tr = by_id.get(target.task_run_id)
        key = (target.vm_id, target.hypervisor)
        if tr is not None and (key not in attempt or _created(tr) >= _created(attempt[key])):
            attempt[key] = tr
    newest: dict[str, Any] = {}  # task run id -> its newest progress artifact
    for a in sorted(arts, key=_created, reverse=True):
        if a.task_run_id is not None and str(a.key or "").startswith(PROGRESS_KEY):
            newest.setdefault(str(a.task_run_id), a)

    pending = "error" if run_final else "pending"
    out: list[VMRun] = []  # in the order of the run's targets: as listed, or asked for
    for target in dict.fromkeys(targets):  # two hypervisors' "101" are two targets
        t = by_id.get(target.task_run_id)
        child = attempt.get((target.vm_id, target.hypervisor))
        if t is None and child is None:
            out.append(VMRun(target.vm_id, pending, None, None))
        else:
            out.append(_one(t, target.vm_id, newest, run_final, child))
    named = {t.task_run_id for t in targets}
    own = [t for t in runs if run_id is None or str(t.flow_run_id) == run_id]
    if run_final:  # captures of a run that ended before it named them
        out += [
            _one(t, None, newest, run_final)
            for t in sorted(own, key=_created)
            if _step(t) == "capture" and str(t.id) not in named
        ]
    wanted = [v for v in dict.fromkeys(vm_ids) if v != ALL]
    started = {v.vm_id for v in out}
    out += [VMRun(v, pending, None, None) for v in wanted if v not in started]
    out += [v for t in own if _step(t) == "list" and (v := _unlisted(t)) is not None]
    order = {v: i for i, v in enumerate(wanted)}
    keyed = sorted(enumerate(out), key=lambda p: (order.get(p[1].vm_id or "", len(order)), p[0]))
    return tuple(v for _, v in keyed)


def _unlisted(t: Any) -> VMRun | None:
    """A hypervisor whose VMs could not be listed (its list task failed for good), or
    that was listed and runs no VM (its list task completed as NO_RUNNING_VM)."""
    kind, name = _kind(t)
    hypervisor = tagged_hypervisor(t.tags or ()) or "?"
    if kind == "COMPLETED" and name == NO_RUNNING_VM:
        note = f"no running VM on hypervisor {hypervisor}: nothing to capture there"
        return VMRun(unlisted_id(hypervisor), "completed", None, None, note=note)
    if kind not in ("FAILED", "CRASHED"):
        return None
    return VMRun(unlisted_id(hypervisor), "failed", None, _message(t))


def _created(obj: Any) -> datetime:
    ts = getattr(obj, "created", None)
    return _stdlib(ts) if ts is not None else datetime.min.replace(tzinfo=UTC)


def _progress(t: Any, art: Any) -> float | None:
    if art is None:
        return None
    if _kind(t)[1] == "Retrying" and t.state is not None and art.created < t.state.timestamp:
        return None  # the artifact of an attempt before this retry
    try:
        return max(0.0, min(100.0, float(art.data)))
    except (TypeError, ValueError):
        return None


def _one(
    t: Any, vm_id: str | None, newest: dict[str, Any], run_final: bool, attempt: Any = None
) -> VMRun:
    """``t``: the VM's task run in the run (None if not created yet); ``attempt``: the
    VM's capture in a part's child flow run, which ``t`` waits for with other VMs. The
    VM's state is the attempt's, unless the attempt has not ended and ``t`` has failed
    for all its VMs (the part's flow run failed or crashed before it ended the VM's
    chain). ``newest``: task run id -> its newest progress artifact."""
    if attempt is not None and (
        t is None
        or _kind(attempt)[0] not in IN_PROGRESS
        or _kind(t)[0] not in ("FAILED", "CRASHED", "CANCELLED")
    ):
        t = attempt
    kind, name = _kind(t)
    progress = _progress(t, newest.get(str(t.id)))
    done = Progress.from_metadata(getattr(newest.get(str(t.id)), "metadata_", None))
    vm = _state(vm_id, kind, name, progress, _message(t), run_final)
    if done is not None and vm.progress is not None:
        vm = dataclasses.replace(vm, bytes_done=done.done, bytes_total=done.total)
    return vm


def _state(
    vm_id: str | None, kind: str, name: str, progress: float | None, message: str, run_final: bool
) -> VMRun:
    if kind == "COMPLETED":  # the whole chain: captured, offloaded, recorded
        return VMRun(vm_id, "completed", 100.0, None)
    if kind == "FAILED":
        return VMRun(vm_id, "timeout" if name == TIMED_OUT else "failed", progress, message)
    if kind in ("CRASHED", "CANCELLED"):
        return VMRun(vm_id, "error", progress, message)
    if kind == "SCHEDULED" and name == "AwaitingRetry":
        return _unfinished(vm_id, progress, run_final, name="retrying")
    if kind == "RUNNING" and progress is not None:
        return _unfinished(vm_id, progress, run_final, name="running")
    # Not started, or started but not streaming yet (waiting for a capture slot).
    return _unfinished(vm_id, progress, run_final, name="pending")


def _unfinished(vm_id: str | None, progress: float | None, run_final: bool, *, name: str) -> VMRun:
    if run_final:  # the run ended (crashed, cancelled) while this VM was still going
        return VMRun(vm_id, "error", progress, "did not finish: the run ended first")
    return VMRun(vm_id, name, progress, None)


def due_time(run: Any) -> datetime:
    """When a flow run is due (the trigger time for API calls, the schedule's for
    scheduled runs): one function for POST /trigger's answer and /status."""
    return _stdlib(run.expected_start_time or run.created)


def _stdlib(ts: datetime | None) -> datetime:
    """Prefect hands out pendulum datetimes; keep plain ones past this boundary."""
    if ts is None:
        return datetime.now(UTC)
    return datetime.fromtimestamp(ts.timestamp(), UTC)


# How much older than its ``ttl`` a /status answer may be served while a newer one is
# being read (stale-while-revalidate): past that, a request waits for the read. Short:
# a run started elsewhere (the scheduler, another replica) shows within ttl + this + one
# read, and a read of a 100-VM run takes a few hundred ms here.
STALE_SEC = 1.0


class _Read:
    """One read of the latest run: begun at ``started`` (the cache's clock), after
    ``gen`` invalidations; its outcome once ``done`` is set."""

    def __init__(self, gen: int, started: float) -> None:
        self.gen = gen
        self.started = started
        self.done = threading.Event()
        self.value: RunSummary | None = None
        self.error: Exception | None = None


class LatestRunCache:
    """/status under load: Prefect is read at most once per ``ttl`` seconds per API
    process, and a request never waits for that read while an answer at most ``ttl`` +
    ``stale`` seconds old is at hand (stale-while-revalidate): the request that finds
    the answer past ``ttl`` starts one read in the background and every request is
    answered at once, from the last answer, until that read is in. Only a request with
    no usable answer waits, for a single read shared by all such requests: the first
    request, one after a trigger through this process (invalidate: its own run shows at
    once), one after a failed read (the error is not hidden behind an old answer), and
    one finding the answer older than ``ttl`` + ``stale`` (Prefect slower than that).
    ``ttl`` 0: every request waits for a read. Another replica may show the previous run
    for ``ttl`` plus one read's time (at most ``stale`` more)."""

    def __init__(
        self,
        runs: Runs,
        ttl: float,
        stale: float = STALE_SEC,
        clock: Callable[[], float] = time.monotonic,
        spawn: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self._runs = runs
        self._ttl = ttl
        self._max_age = ttl + stale if ttl > 0 else 0.0
        self._clock = clock
        self._spawn = spawn or _in_background
        self._lock = threading.Lock()
        self._gen = 0  # invalidations so far: an answer read before the last is not served
        self._value: RunSummary | None = None
        self._value_gen = -1  # the gen of the read that gave _value (-1: none yet)
        self._at = -math.inf  # when that read began
        self._failed = False  # the last read failed
        self._read: _Read | None = None  # the read in flight, newest

    def get(self) -> RunSummary | None:
        with self._lock:
            age = self._clock() - self._at
            usable = self._value_gen == self._gen and not self._failed
            if usable and age < self._ttl:
                return self._value
            read = self._read
            if usable and age < self._max_age:
                if read is None:
                    behind = self._begin()
                    try:
                        self._spawn(lambda: self._finish(behind))
                    except BaseException:  # no thread: no read in flight to wait for
                        self._read = None
                        raise
                return self._value
            if read is None or read.gen != self._gen:
                read = own = self._begin()
            else:
                own = None  # join the read in flight: begun after the last invalidation
        if own is not None:
            self._finish(own)
        read.done.wait()
        if read.error is not None:
            raise read.error
        return read.value

    def invalidate(self) -> None:
        with self._lock:
            self._gen += 1

    def _begin(self) -> _Read:
        self._read = _Read(self._gen, self._clock())
        return self._read

    def _finish(self, read: _Read) -> None:
        read.error = RuntimeError("the read of the latest run was interrupted")
        try:
            read.value, read.error = self._runs.latest(), None
        except Exception as exc:
            read.error = exc
        finally:
            with self._lock:
                if self._read is read:
                    self._read = None
                # An answer read before an invalidation never replaces one read after it.
                if read.gen >= self._value_gen:
                    self._failed = read.error is not None
                    if read.error is None:
                        self._value, self._value_gen = read.value, read.gen
                        self._at = read.started
            read.done.set()


def _in_background(work: Callable[[], None]) -> None:
    threading.Thread(target=work, name="status-read", daemon=True).start()
