"""Start, watch and stop generations as Kubernetes JobSets (the `Launcher` protocol of `base.py`).

One generation is one JobSet named ``<jobset_name>-g<N>`` whose single pod runs the same trainer
command the local launcher runs (``LaunchSpec.command``: torchrun with ``--checkpoint.load_step``,
``--supervision.skip_batches``, ``--supervision.lr_scale`` and the generation number). The objects
carry the labels of ``deploy/kubernetes/base/trainer-jobset.yaml`` plus ``titan-supervisor/run-id``
and ``titan-supervisor/generation``, which is how a restarted daemon finds (``adopt``) the JobSet of
the generation its journal says is running. The JobSet never restarts anything itself
(``failurePolicy.maxRestarts: 0``, ``backoffLimit: 0``): the daemon decides restarts.

Why lightkube: it is small (httpx + generated models, no code generation at import, ~0.3 s to
import, done lazily on first use so the daemon still listens in well under a second), has typed
models for core objects, generic resources for CRDs such as JobSet, and a resumable watch. The
official ``kubernetes`` client is several times heavier to import and its watch needs hand-written
resumption; ``kr8s`` is async-first and its sync API wraps an event loop in a thread, which the
launcher (called through ``asyncio.to_thread``) does not need.

Failure model:
- Pod phases and exit codes come from a watch on the generation's pods (one thread per
  generation). A broken watch is re-established from a fresh LIST, so a pod deleted while the
  stream was down is still seen as gone. ``poll`` turns each pod that ended into one
  ``RankExit`` (the same path as the local launcher): the rank and its exit code are read from
  torchrun's failure report in the container's termination message, which the pod's first
  process (`pod_entry`) writes without tracebacks so no report is cut off (else the kubelet
  falls back to the log's tail: ``terminationMessagePolicy: FallbackToLogsOnError``), else
  the pod's first rank with the container's exit code (128 + signal for a killed container). ``OOMKilled`` sets
  ``RankExit.oom_killed``; an evicted pod or one the cluster deleted (node lost, taint
  eviction) is a rank exit with exit code 137 and a log line saying why; ``RankExit.host`` is
  the pod's node, so the policy can count crashes per node and exclude one.
- ``stop`` deletes the pods with the given grace (the kubelet sends SIGTERM, then SIGKILL) and
  then the JobSet, and waits for the pods to go; it is idempotent (404s are ignored).
- ``dump_stacks``: the daemon may not exec into pods (the Role grants no ``pods/exec``, and the
  fake API server of the tests could not run it anyway), so it returns each pod's phase, node,
  conditions and container state instead, and says so; the trainer's own log has its stacks.
- ``exclude_node`` cordons a node (``spec.unschedulable: true``, what ``kubectl cordon`` does);
  the next generation is scheduled elsewhere. It never drains or deletes anything.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from supervisor.config_types import NonNegativeInt, PositiveInt, Seconds, doc
from supervisor.launch.local import LaunchSpec, RankExit
from supervisor.launch.pod_entry import ENV_TERMINATION_LOG
from supervisor.launch.torchrun_report import root_cause

NAME_LABEL, COMPONENT_LABEL = "app.kubernetes.io/name", "app.kubernetes.io/component"
RUN_LABEL, GENERATION_LABEL = "titan-supervisor/run-id", "titan-supervisor/generation"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KILLED = 137  # what Kubernetes reports for a container that was SIGKILLed (128 + 9)

TERMINATION_LOG = "/dev/termination-log"  # the kubelet's default terminationMessagePath


@dataclass
class KubernetesConfig:
    """Where and how generations run on Kubernetes (settings: ``[launch.kubernetes]``)."""

    namespace: Annotated[str, doc("namespace of the trainer JobSets (the daemon's own, normally)")] = "default"
    image: Annotated[str, doc("trainer image (the Dockerfile's cpu or cuda target)")] = "titan-supervisor:cpu"
    api_server: Annotated[str, doc(
        "API server URL (https://host:6443); empty: in-cluster (service-account token, CA and "
        "KUBERNETES_SERVICE_HOST)")] = ""
    token_file: Annotated[str, doc("bearer token file for api_server (re-read when it rotates); empty: none")] = ""
    ca_file: Annotated[str, doc("CA bundle (PEM) that signed the API server's certificate; empty: system CAs")] = ""
    jobset_name: Annotated[str, doc("JobSet name prefix; generation N is <jobset_name>-g<N>")] = "titan-trainer"
    service_account: Annotated[str, doc("service account of the trainer pods (no API token is mounted)")] = "titan-trainer"
    python: Annotated[str, doc("the trainer image's Python; empty: run.python or the daemon's")] = "python"
    supervisor_url: Annotated[str, doc(
        "URL the ranks post telemetry to (the daemon's Service, e.g. http://titan-supervisor:8642); "
        "empty: the daemon's bound URL")] = ""
    workdir_claim: Annotated[str, doc(
        "PersistentVolumeClaim (ReadWriteMany) mounted at run.workdir in the trainer pod, shared with "
        "the daemon; empty: none")] = ""
    gpus_per_pod: Annotated[NonNegativeInt, doc("nvidia.com/gpu limit of the trainer pod (0: none)")] = 0
    request_timeout_s: Annotated[Seconds, doc("timeout of one API request")] = 10.0
    watch_timeout_s: Annotated[PositiveInt, doc("the API server ends a pod watch after this; it is resumed")] = 60
    watch_retry_s: Annotated[Seconds, doc("wait before re-establishing a broken watch")] = 1.0
    stop_wait_s: Annotated[Seconds, doc("after the stop grace, wait at most this for the pods to go")] = 30.0
    log_tail_lines: Annotated[PositiveInt, doc("termination-message lines attached to a rank exit")] = 60

    def __post_init__(self) -> None:
        if not self.image.strip():
            raise ValueError("image: empty; name the trainer image (e.g. titan-supervisor:cuda)")
        for name in ("namespace", "service_account"):
            if not _DNS_LABEL.match(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} is not a Kubernetes name (lowercase DNS label)")
        if not _DNS_LABEL.match(self.jobset_name) or len(self.jobset_name) > 40:
            raise ValueError(f"jobset_name {self.jobset_name!r} is not a lowercase DNS label of at most 40 characters")
        if self.api_server and not re.match(r"^https?://[^/\s]+/?$", self.api_server):
            raise ValueError(f"api_server {self.api_server!r} is not http(s)://host[:port]")
        for name in ("token_file", "ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")


@dataclass
class PodEnd:
    """How one pod ended, read from its status (pure: see `pod_end`)."""

    exitcode: int
    reason: str
    message: str
    node: str | None
    oom_killed: bool = False
    lines: list[str] = field(default_factory=list)


def pod_end(pod: dict, *, deleted: bool) -> PodEnd | None:
    """The end of a pod (a dict in the API's JSON shape), or None while it has not ended."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    node = spec.get("nodeName")
    phase, reason = status.get("phase"), status.get("reason") or ""
    term = next((((c.get("state") or {}).get("terminated")) for c in status.get("containerStatuses") or []
                 if (c.get("state") or {}).get("terminated")), None)
    name = meta.get("name", "?")
    cause = f"{reason}: {status.get('message') or ''}" if reason else _disruption(status)
    if term is not None and phase in ("Succeeded", "Failed"):
        code, creason, message = int(term.get("exitCode", 0)), term.get("reason") or "", term.get("message") or ""
        why = f"pod {name} on node {node}: {phase}, container {creason or 'terminated'} with exit code {code}"
        return PodEnd(code, creason, message, node, creason == "OOMKilled",
                      message.splitlines() + [f"kubernetes: {why}" + (f" ({cause})" if cause else "")
                                              + (" (OOMKilled)" if creason == "OOMKilled" else "")])
    if phase == "Failed" or reason in ("Evicted", "NodeLost"):
        return PodEnd(KILLED, reason or "Failed", status.get("message") or "", node, False,
                      [f"kubernetes: pod {name} on node {node}: {cause or phase}"])
    if deleted:
        why = cause or "deleted by the cluster (node lost, eviction or another client)"
        return PodEnd(KILLED, "Deleted", why, node, False, [f"kubernetes: pod {name} on node {node}: {why}"])
    return None


def _disruption(status: dict) -> str:
    for c in status.get("conditions") or []:
        if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
            return f"{c.get('reason')}: {c.get('message', '')}".strip()
    return ""


def rank_and_code(end: PodEnd, first_rank: int) -> tuple[int, int]:
    """The rank that died first and its exit code: torchrun's root cause when it reported one."""
    cause = root_cause(end.message)
    if cause and end.exitcode != 0:
        return cause
    return first_rank, end.exitcode


class KubeGeneration:
    """One generation's JobSet and the latest state of its pods, kept current by a watch thread."""

    def __init__(self, launcher: "KubernetesLauncher", spec: LaunchSpec, name: str) -> None:
        self._launcher, self.spec, self.name = launcher, spec, name
        self.config = launcher.config
        self.pid = 0  # no local process: the journal's torchrun_pid is 0 and adoption goes by labels
        self.rank_pids: dict[int, int] = {}  # pids inside the pod (from heartbeats): shown, never signalled
        self.exited: int | None = None
        self.stopping = False
        self.exit_expected = False
        self.started_at = time.time()
        self._pods: dict[str, dict] = {}
        self._deleted: set[str] = set()
        self._ends: dict[str, PodEnd] = {}
        self._reported: set[str] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._synced = threading.Event()
        self._watch_client = launcher.new_client()  # its own connection: closing it ends the watch
        self._thread = threading.Thread(target=self._watch, name=f"k8s-watch-{name}", daemon=True)
        self._thread.start()

    @property
    def generation(self) -> int:
        return self.spec.generation

    def note_rank_pid(self, rank: int, pid: int) -> None:
        self.rank_pids.setdefault(rank, pid)

    def owns(self, pid: int) -> bool:
        """A heartbeat's pid lives in a pod's own pid namespace: the daemon cannot check it, and
        never needs to — this launcher signals no pid, it only deletes the pods it created (by
        name and generation label). So a pid here is bookkeeping; the rank range is what
        `Generations.note_rank_pid` checks."""
        return 0 < pid

    # -- the watch --------------------------------------------------------------------------------
    def _labels(self) -> dict[str, str]:
        return {RUN_LABEL: self.spec.run_id, GENERATION_LABEL: str(self.generation)}

    def _watch(self) -> None:
        from lightkube.resources.core_v1 import Pod

        client = self._watch_client
        while not self._closed.is_set():
            try:
                listed = client.list(Pod, namespace=self.config.namespace, labels=self._labels())
                pods = {p.metadata.name: p.to_dict() for p in listed}
                with self._lock:
                    self._deleted |= set(self._pods) - set(pods)  # gone while the watch was down
                    self._pods.update(pods)
                self._synced.set()
                for kind, pod in client.watch(Pod, namespace=self.config.namespace, labels=self._labels(),
                                              resource_version=listed.resourceVersion,
                                              server_timeout=self.config.watch_timeout_s):
                    self._on_event(kind, pod.to_dict())
                    if self._closed.is_set():
                        return
            except Exception:  # noqa: BLE001 - an API hiccup: list again and resume
                if self._closed.wait(self.config.watch_retry_s):
                    return

    def _on_event(self, kind: str, pod: dict) -> None:
        name = (pod.get("metadata") or {}).get("name")
        with self._lock:
            self._pods[name] = pod
            if kind == "DELETED":
                self._deleted.add(name)

    def close(self) -> None:
        """End the watch (closing its client breaks a blocked stream read); idempotent."""
        self._closed.set()
        try:
            self._watch_client.close()
        except Exception:  # noqa: BLE001 - already closed or mid-read: the thread sees _closed
            pass

    # -- what the daemon asks ---------------------------------------------------------------------
    def _ended(self) -> dict[str, PodEnd]:
        with self._lock:
            for name, pod in self._pods.items():
                if name not in self._ends:
                    end = pod_end(pod, deleted=name in self._deleted)
                    if end is not None:
                        self._ends[name] = end
            return dict(self._ends)

    def alive(self) -> bool:
        if self.exited is not None:
            return False
        ends = self._ended()
        with self._lock:
            return not self._pods or len(ends) < len(self._pods)

    def poll(self) -> list[RankExit]:
        """New rank exits since the last poll: one per pod that ended (each reported once)."""
        out: list[RankExit] = []
        ends = self._ended()
        for name, end in sorted(ends.items()):
            if name in self._reported:
                continue
            self._reported.add(name)
            with self._lock:
                index = int(((self._pods[name].get("metadata") or {}).get("labels") or {}).get(JOB_INDEX_LABEL, 0))
            rank, code = rank_and_code(end, index * self.spec.nproc)
            out.append(RankExit(rank, code, None, end.lines[-self.config.log_tail_lines:], time.time(),
                                host=end.node, oom_killed=end.oom_killed))
        with self._lock:
            done = bool(self._pods) and len(ends) == len(self._pods)
        if self.exited is None and done:
            self.exited = next((e.exitcode for e in ends.values() if e.exitcode != 0), 0)
            self.close()
        return out

    def stop(self, grace_s: float) -> None:
        """Delete the pods with ``grace_s`` (SIGTERM, then SIGKILL), then the JobSet; wait for the pods."""
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod

        client = self._launcher.client()
        self._synced.wait(self.config.request_timeout_s)
        with self._lock:
            names = [n for n in self._pods if n not in self._deleted]
        for name in names:
            try:
                client.delete(Pod, name, namespace=self.config.namespace, grace_period=int(math.ceil(grace_s)))
            except ApiError as e:
                if e.status.code != 404:
                    raise
        self._launcher.delete_jobset(self.name)
        deadline = time.time() + grace_s + self.config.stop_wait_s
        while time.time() < deadline:
            ends = self._ended()
            with self._lock:
                if all(n in self._deleted or n in ends for n in self._pods):
                    break
            time.sleep(0.05)
        ends = self._ended()
        if self.exited is None:
            self.exited = next((e.exitcode for e in ends.values() if e.exitcode != 0), KILLED if ends else None)
        self.close()

    def dump_stacks(self) -> str:
        """What Kubernetes knows about each pod: the daemon cannot exec into them (see module doc)."""
        out = [f"--- JobSet {self.name}: no stack dump: exec into trainer pods is not granted (the Role has "
               "no pods/exec); the ranks' own log (kubectl logs) has any faulthandler output"]
        with self._lock:
            pods = dict(self._pods)
        for name, pod in sorted(pods.items()):
            st = pod.get("status") or {}
            conds = ", ".join(f"{c.get('type')}={c.get('status')}" for c in st.get("conditions") or [])
            states = "; ".join(f"{c.get('name')}: {c.get('state')}" for c in st.get("containerStatuses") or [])
            out.append(f"--- pod {name} on node {(pod.get('spec') or {}).get('nodeName')}: phase {st.get('phase')}"
                       f" [{conds}] {states}")
        return "\n".join(out)


class KubernetesLauncher:
    """The daemon's launcher on Kubernetes: one JobSet per generation."""

    Config = KubernetesConfig

    def __init__(self, config: KubernetesConfig, *, stop_grace_s: float = 10.0) -> None:
        self.config = config
        self._stop_grace_s = stop_grace_s
        self._client = None
        self._client_lock = threading.Lock()

    def client(self):
        """The shared lightkube client for requests, built on first use (the import costs ~0.3 s)."""
        with self._client_lock:
            if self._client is None:
                self._client = self.new_client()
            return self._client

    def new_client(self):
        import httpx2
        from lightkube import Client, KubeConfig
        from lightkube.config.models import Cluster, User

        c = self.config
        if c.api_server:
            user = User(token_file=c.token_file) if c.token_file else User()
            kube = KubeConfig.from_one(cluster=Cluster(server=c.api_server, certificate_auth=c.ca_file or None),
                                       user=user, namespace=c.namespace)
        else:
            kube = KubeConfig.from_service_account()
        return Client(kube, namespace=c.namespace, timeout=httpx2.Timeout(c.request_timeout_s),
                      field_manager="titan-supervisor", trust_env=False)

    @staticmethod
    def jobset_resource():
        from lightkube.generic_resource import create_namespaced_resource

        return create_namespaced_resource("jobset.x-k8s.io", "v1alpha2", "JobSet", "jobsets")

    def name_of(self, generation: int) -> str:
        return f"{self.config.jobset_name}-g{generation}"

    def start(self, spec: LaunchSpec) -> KubeGeneration:
        JobSet = self.jobset_resource()
        self.client().create(JobSet.from_dict(self.jobset(spec)))
        return KubeGeneration(self, spec, self.name_of(spec.generation))

    def adopt(self, spec: LaunchSpec, pid: int, rank_pids: dict[int, int]) -> KubeGeneration | None:
        """The JobSet labelled with this run and generation, if it is still there (``pid`` is unused)."""
        JobSet = self.jobset_resource()
        labels = {RUN_LABEL: spec.run_id, GENERATION_LABEL: str(spec.generation)}
        found = [j for j in self.client().list(JobSet, namespace=self.config.namespace, labels=labels)
                 if j.metadata.name == self.name_of(spec.generation) and j.metadata.deletionTimestamp is None]
        if not found:
            return None
        gen = KubeGeneration(self, spec, found[0].metadata.name)
        for r, p in rank_pids.items():
            gen.note_rank_pid(int(r), int(p))
        return gen

    def delete_jobset(self, name: str) -> None:
        from lightkube import ApiError
        from lightkube.types import CascadeType

        try:
            self.client().delete(self.jobset_resource(), name, namespace=self.config.namespace,
                                 cascade=CascadeType.BACKGROUND)
        except ApiError as e:
            if e.status.code != 404:
                raise

    def exclude_node(self, node: str) -> dict:
        """Cordon ``node`` (``spec.unschedulable: true``): no new pod lands there. Idempotent."""
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        client = self.client()
        try:
            before = client.get(Node, node)
        except ApiError as e:
            if e.status.code == 404:
                raise LookupError(f"node {node!r} is not in the cluster") from None
            raise
        was = bool(before.spec and before.spec.unschedulable)
        client.patch(Node, node, {"spec": {"unschedulable": True}}, patch_type=PatchType.MERGE)
        return {"node": node, "cordoned": True, "already_cordoned": was}

    # -- the JobSet -------------------------------------------------------------------------------
    def jobset(self, spec: LaunchSpec) -> dict:
        """The generation's JobSet: deploy/kubernetes/base/trainer-jobset.yaml's shape, running the trainer."""
        c = self.config
        spec = replace(spec, python=c.python or spec.python, supervisor_url=c.supervisor_url or spec.supervisor_url)
        labels = {NAME_LABEL: "titan-supervisor", COMPONENT_LABEL: "trainer", RUN_LABEL: spec.run_id,
                  GENERATION_LABEL: str(spec.generation)}
        annotations = {"titan-supervisor/load-step": str(spec.load_step if spec.load_step is not None else ""),
                       "titan-supervisor/skip-batches": str(spec.skip_batches),
                       "titan-supervisor/lr-scale": repr(float(spec.lr_scale))}
        env = {"PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
               **spec.env}
        return {
            "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": self.name_of(spec.generation), "namespace": c.namespace, "labels": labels,
                         "annotations": annotations},
            "spec": {"failurePolicy": {"maxRestarts": 0}, "replicatedJobs": [{
                "name": "node", "replicas": 1,
                "template": {"spec": {
                    "parallelism": 1, "completions": 1, "completionMode": "Indexed", "backoffLimit": 0,
                    "template": {"metadata": {"labels": labels, "annotations": annotations},
                                 "spec": self._pod_spec(spec, env, labels)}}}}]},
        }

    def _pod_spec(self, spec: LaunchSpec, env: dict[str, str], labels: dict[str, str]) -> dict:
        c = self.config
        # the pod's first process is pod_entry: it writes a termination message that names every
        # failed rank even when tracebacks fill the log's tail (supervisor/launch/pod_entry.py)
        env = {**env, ENV_TERMINATION_LOG: TERMINATION_LOG}
        container: dict[str, Any] = {
            "name": "trainer", "image": c.image,
            "command": [spec.interpreter(), "-m", "supervisor.launch.pod_entry", "--", *spec.command()],
            "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
            "terminationMessagePath": TERMINATION_LOG,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
        }
        if c.gpus_per_pod:
            container["resources"] = {"limits": {"nvidia.com/gpu": c.gpus_per_pod}}
        volumes: list[dict] = [{"name": "shm", "emptyDir": {"medium": "Memory"}}]
        if c.workdir_claim:
            volumes.append({"name": "workdir", "persistentVolumeClaim": {"claimName": c.workdir_claim}})
            container["volumeMounts"].append({"name": "workdir", "mountPath": str(spec.workdir)})
        selector = {NAME_LABEL: labels[NAME_LABEL], COMPONENT_LABEL: labels[COMPONENT_LABEL]}
        return {
            "serviceAccountName": c.service_account, "automountServiceAccountToken": False,
            "restartPolicy": "Never", "terminationGracePeriodSeconds": int(math.ceil(self._stop_grace_s)),
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}}]}},
            "containers": [container], "volumes": volumes,
        }
