"""A fake Kubernetes API server for the Kubernetes launcher's tests: it stands in for an API server
(plus the JobSet controller, the scheduler and the kubelet) that cannot run on this machine.

What is real: HTTP on 127.0.0.1 (HTTP/1.1, bearer-token auth), chunked watch streams with
resource versions and ``timeoutSeconds``, JSON merge patches, 404 Status objects — and the
containers: when a pod is scheduled, its command runs as a real local process in its own session
(so the trainer really trains), and its phase, exit code (128 + signal when killed), reason
(``Completed``/``Error``/``OOMKilled``) and termination message (the file at the container's
``terminationMessagePath`` if it wrote one, else the log's tail, as ``FallbackToLogsOnError``
does) come from that process. Deleting a pod sends SIGTERM to its first process and SIGKILL to its
process group after the grace period, then the pod disappears (a DELETED event).

Only the endpoints the launcher uses exist: JobSets (create, list, get, delete), pods (list,
watch, delete) and nodes (get, list, merge-patch). The JobSet controller makes one pod per
replicated job index; the scheduler puts it on the first schedulable node (``unschedulable`` is
honoured: that is what cordoning changes), else leaves it Pending. Drills inject what a cluster
does to pods: `oom_kill`, `evict`, `lose_node`.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

JOBSETS = "/apis/jobset.x-k8s.io/v1alpha2/namespaces/"
MESSAGE_BYTES, MESSAGE_LINES = 2048, 80  # the kubelet's FallbackToLogsOnError limits
TERMINATION_FILE_BYTES = 4096  # the kubelet's limit on a termination message file


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(obj: dict, selector: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _selector(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.replace("==", "=").partition("=")
        out[k.strip()] = v.strip()
    return out


def _merge(dst: dict, patch: dict) -> None:
    for k, v in patch.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


class FakeKubernetes:
    """The fake cluster: ``with FakeKubernetes(tmp, nodes=["node-a", "node-b"]) as k8s: k8s.url``."""

    def __init__(self, workdir: Path, *, nodes=("node-a", "node-b"), token: str = "", env: dict | None = None,
                 cwd: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token, self.env, self.cwd = token, dict(env or os.environ), cwd
        self.objects: dict[tuple[str, str], dict] = {}  # (kind, namespace/name) -> object
        self.events: list[tuple[int, str, str, dict]] = []  # (resourceVersion, kind, type, object)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.procs: dict[str, subprocess.Popen] = {}
        self._oom: set[str] = set()
        self._rv = itertools.count(1)
        self.cond = threading.Condition()
        for n in nodes:
            self._put("Node", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": n, "labels": {
                "kubernetes.io/hostname": n}}, "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKubernetes":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for p in list(self.procs.values()):
            self._signal(p, signal.SIGKILL)
        self.server.shutdown()
        self.server.server_close()

    # -- the store ----------------------------------------------------------------------------------
    @staticmethod
    def _key(obj: dict) -> str:
        m = obj["metadata"]
        return f"{m.get('namespace', '')}/{m['name']}"

    def _put(self, kind: str, obj: dict, event: str | None = None) -> dict:
        with self.cond:
            key = (kind, self._key(obj))
            event = event or ("MODIFIED" if key in self.objects else "ADDED")
            rv = next(self._rv)
            obj["metadata"]["resourceVersion"] = str(rv)
            if event == "DELETED":
                self.objects.pop(key, None)
            else:
                self.objects[key] = obj
            self.events.append((rv, kind, event, copy.deepcopy(obj)))
            self.cond.notify_all()
            return obj

    def list(self, kind: str, namespace: str | None = None, selector: dict | None = None) -> list[dict]:
        with self.cond:
            return [copy.deepcopy(o) for (k, key), o in sorted(self.objects.items())
                    if k == kind and (namespace is None or key.startswith(namespace + "/"))
                    and _matches(o, selector or {})]

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        with self.cond:
            o = self.objects.get((kind, f"{namespace}/{name}"))
            return copy.deepcopy(o) if o else None

    def node(self, name: str) -> dict | None:
        return self.get("Node", "", name)

    def pods(self, **selector) -> list[dict]:
        return self.list("Pod", None, selector)

    # -- JobSet controller, scheduler, kubelet --------------------------------------------------------
    def _create_jobset(self, ns: str, js: dict) -> dict:
        meta = js.setdefault("metadata", {})
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now())
        self._put("JobSet", js)
        for rj in js["spec"]["replicatedJobs"]:
            for index in range(int(rj.get("replicas", 1))):
                tmpl = copy.deepcopy(rj["template"]["spec"]["template"])
                labels = dict(tmpl["metadata"].get("labels") or {}, **{
                    "jobset.sigs.k8s.io/jobset-name": meta["name"], "jobset.sigs.k8s.io/replicatedjob-name": rj["name"],
                    "jobset.sigs.k8s.io/job-index": str(index)})
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": f"{meta['name']}-{rj['name']}-{index}-0-{uuid.uuid4().hex[:5]}", "namespace": ns,
                    "labels": labels, "annotations": tmpl["metadata"].get("annotations") or {},
                    "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                    "ownerReferences": [{"apiVersion": js["apiVersion"], "kind": "JobSet", "name": meta["name"],
                                         "uid": meta["uid"]}]},
                    "spec": tmpl["spec"], "status": {"phase": "Pending"}}
                self._put("Pod", pod)
                self._schedule(pod)
        return js

    def _schedule(self, pod: dict) -> None:
        node = next((n["metadata"]["name"] for n in self.list("Node") if not n["spec"].get("unschedulable")), None)
        if node is None:
            pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
            self._put("Pod", pod)
            return
        pod["spec"]["nodeName"] = node
        self._run(pod)

    def _run(self, pod: dict) -> None:
        c = pod["spec"]["containers"][0]
        name = pod["metadata"]["name"]
        env = dict(self.env, **{e["name"]: e["value"] for e in c.get("env") or []})
        # the kubelet mounts a fresh file at terminationMessagePath; here it is a file of the pod's,
        # and an env value naming that path names the file (no container filesystem to mount into)
        mounted = c.get("terminationMessagePath", "/dev/termination-log")
        message_file = self.workdir / f"{name}.termination-log"
        message_file.write_bytes(b"")
        env = {k: (str(message_file) if v == mounted else v) for k, v in env.items()}
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(list(c.get("command") or []) + list(c.get("args") or []), stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=self.cwd, start_new_session=True)
        log.close()
        self.procs[name] = proc
        pod["status"] = {"phase": "Running", "hostIP": "127.0.0.1", "startTime": _now(),
                         "conditions": [{"type": "Ready", "status": "True"}],
                         "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "",
                                                "containerID": f"fake://{proc.pid}", "ready": True, "restartCount": 0,
                                                "state": {"running": {"startedAt": _now()}}}]}
        self._put("Pod", pod)
        threading.Thread(target=self._reap, args=(pod["metadata"]["namespace"], name, c), daemon=True).start()

    def _reap(self, ns: str, name: str, container: dict) -> None:
        code = self.procs[name].wait()
        code = 128 - code if code < 0 else code  # a signal: 128 + signum, as the kubelet reports
        pod = self.get("Pod", ns, name)
        if pod is None:
            return
        reason = "OOMKilled" if name in self._oom else ("Completed" if code == 0 else "Error")
        term = {"exitCode": code, "reason": reason, "finishedAt": _now()}
        written = (self.workdir / f"{name}.termination-log").read_bytes()[:TERMINATION_FILE_BYTES]
        if written:  # the message file wins whenever the container wrote one
            term["message"] = written.decode(errors="replace")
        elif code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            tail = (self.workdir / f"{name}.log").read_bytes()[-MESSAGE_BYTES:].decode(errors="replace")
            term["message"] = "\n".join(tail.splitlines()[-MESSAGE_LINES:])
        status = pod["status"]
        status["containerStatuses"][0].update(ready=False, state={"terminated": term})
        status["conditions"] = [{"type": "Ready", "status": "False"}]
        if status.get("reason") != "Evicted":
            status["phase"] = "Succeeded" if code == 0 else "Failed"
        self._put("Pod", pod)
        if pod["metadata"].get("deletionTimestamp"):
            self._put("Pod", pod, "DELETED")

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        """SIGTERM goes to the container's first process (what the kubelet does); SIGKILL ends
        everything in it (here: its process group)."""
        try:
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def delete_pod(self, ns: str, name: str, grace: int | None) -> dict | None:
        pod = self.get("Pod", ns, name)
        if pod is None:
            return None
        grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30)) if grace is None else grace
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return self._put("Pod", pod, "DELETED")
        if not pod["metadata"].get("deletionTimestamp"):
            pod["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=grace)
            self._put("Pod", pod)
        self._signal(proc, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        if grace > 0:
            threading.Timer(grace, self._signal, args=(proc, signal.SIGKILL)).start()
        return pod

    # -- what a cluster does to pods (drills) ---------------------------------------------------------
    def oom_kill(self, name: str) -> None:
        """The container hit its memory limit: the kernel kills it, the kubelet says OOMKilled."""
        self._oom.add(name)
        self._signal(self.procs[name], signal.SIGKILL)

    def evict(self, name: str, message: str = "The node was low on resource: memory.") -> None:
        pod = next(p for p in self.pods() if p["metadata"]["name"] == name)
        pod["status"].update(phase="Failed", reason="Evicted", message=message)
        self._put("Pod", pod)
        self._signal(self.procs[name], signal.SIGKILL)

    def lose_node(self, node: str) -> None:
        """The node stops answering: its processes are gone and the taint manager deletes its pods."""
        for pod in self.pods():
            if pod["spec"].get("nodeName") == node:
                self._signal(self.procs[pod["metadata"]["name"]], signal.SIGKILL)
                pod["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                                "reason": "DeletionByTaintManager",
                                                "message": f"Taint manager: deleting due to NoExecute taint (node {node} unreachable)"}]
                self._put("Pod", pod)
                self._put("Pod", pod, "DELETED")

    # -- HTTP ---------------------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "reason": reason, "message": message, "code": code})

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}") if n else {}

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                q = {k: v[-1] for k, v in parse_qs(url.query).items()}
                fake.requests.append((method, url.path))
                if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    return self._status(401, "Unauthorized", "Unauthorized")
                parts = url.path.strip("/").split("/")
                try:
                    if url.path.startswith(JOBSETS) and len(parts) >= 6:
                        return self._jobsets(method, parts[4], parts[6] if len(parts) > 6 else None, q)
                    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) >= 5 and parts[4] == "pods":
                        return self._pods(method, parts[3], parts[5] if len(parts) > 5 else None, q)
                    if parts[:3] == ["api", "v1", "nodes"]:
                        return self._nodes(method, parts[3] if len(parts) > 3 else None, q)
                except (BrokenPipeError, ConnectionResetError):
                    return
                self._status(404, "NotFound", f"the fake API server does not serve {method} {url.path}")

            def _collection(self, kind: str, ns: str | None, q: dict) -> None:
                sel = _selector(q.get("labelSelector", ""))
                if q.get("watch") in ("true", "1"):
                    return self._watch(kind, ns, sel, q)
                with fake.cond:
                    items, rv = fake.list(kind, ns, sel), str(fake.events[-1][0] if fake.events else 0)
                self._send(200, {"kind": f"{kind}List", "apiVersion": "v1", "metadata": {"resourceVersion": rv},
                                 "items": items})

            def _watch(self, kind: str, ns: str | None, sel: dict, q: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                deadline = time.time() + float(q.get("timeoutSeconds") or 1800)
                since = q.get("resourceVersion")
                if since in (None, "", "0"):
                    with fake.cond:
                        since = fake.events[-1][0] if fake.events else 0
                        initial = fake.list(kind, ns, sel)
                    for obj in initial:
                        self._chunk({"type": "ADDED", "object": obj})
                since = int(since)
                while time.time() < deadline:
                    with fake.cond:
                        new = [e for e in fake.events if e[0] > since]
                        if not new:
                            fake.cond.wait(min(0.5, max(0.0, deadline - time.time())))
                            continue
                    for rv, k, typ, obj in new:
                        since = rv
                        if k == kind and (ns is None or obj["metadata"].get("namespace") == ns) and _matches(obj, sel):
                            self._chunk({"type": typ, "object": obj})
                self.wfile.write(b"0\r\n\r\n")

            def _chunk(self, event: dict) -> None:
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _jobsets(self, method: str, ns: str, name: str | None, q: dict) -> None:
                if name is None and method == "POST":
                    js = self._body()
                    if fake.get("JobSet", ns, js["metadata"]["name"]):
                        return self._status(409, "AlreadyExists", f"jobsets \"{js['metadata']['name']}\" already exists")
                    return self._send(201, fake._create_jobset(ns, js))
                if name is None and method == "GET":
                    return self._collection("JobSet", ns, q)
                js = fake.get("JobSet", ns, name or "")
                if js is None:
                    return self._status(404, "NotFound", f"jobsets.jobset.x-k8s.io \"{name}\" not found")
                if method == "GET":
                    return self._send(200, js)
                if method == "DELETE":
                    body = self._body()
                    if (body.get("propagationPolicy") or q.get("propagationPolicy")) != "Orphan":
                        for pod in fake.list("Pod", ns, {"jobset.sigs.k8s.io/jobset-name": name}):
                            fake.delete_pod(ns, pod["metadata"]["name"], None)
                    fake._put("JobSet", js, "DELETED")
                    return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                self._status(405, "MethodNotAllowed", method)

            def _pods(self, method: str, ns: str, name: str | None, q: dict) -> None:
                if name is None and method == "GET":
                    return self._collection("Pod", ns, q)
                if name is not None and method == "DELETE":
                    body = self._body()
                    grace = body.get("gracePeriodSeconds", q.get("gracePeriodSeconds"))
                    pod = fake.delete_pod(ns, name, None if grace is None else int(grace))
                    if pod is None:
                        return self._status(404, "NotFound", f"pods \"{name}\" not found")
                    return self._send(200, pod)
                self._status(405, "MethodNotAllowed", method)

            def _nodes(self, method: str, name: str | None, q: dict) -> None:
                if name is None and method == "GET":
                    return self._collection("Node", None, q)
                node = fake.node(name or "")
                if node is None:
                    return self._status(404, "NotFound", f"nodes \"{name}\" not found")
                if method == "GET":
                    return self._send(200, node)
                if method == "PATCH":
                    if self.headers.get("Content-Type") != "application/merge-patch+json":
                        return self._status(415, "UnsupportedMediaType", "only merge patches are served")
                    _merge(node, self._body())
                    return self._send(200, fake._put("Node", node))
                self._status(405, "MethodNotAllowed", method)

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

            def do_PATCH(self):
                self._route("PATCH")

        return Handler
