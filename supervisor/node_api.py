"""The node agents' HTTP surface and the `nodes` operator commands (docs/architecture.md "Node agents").

Routes (under /v1, mounted by `supervisor.api.build_app` through `supervisor.control.build_router`):
  POST /v1/nodes/report          NodeReport -> NodeReply   agent token named as the agent
  GET  /v1/nodes                 the registry's view        viewer
  POST /v1/commands/nodes-exclude  {node, reason}           operator: drain a node (restarts the run
                                                            without it when it runs the current generation)
  POST /v1/commands/nodes-readmit  {node, reason}           operator: the node may run generations again

Auth: a report needs a token of role ``agent`` whose name is the report's ``agent_id`` (one
credential per agent: a stolen one speaks for one node only); with no tokens configured the
daemon is loopback-only and accepts any agent id (the settings refuse anything else). The
lookup is O(1) (`TokenStore.lookup`): this route takes thousands of requests a second.

Bad input changes nothing: a body that is not a `NodeReport` is a 400 naming the field, a
heartbeat in it of another node or run a 400, a report of another run a 409, before the
registry is touched. Heartbeats in a report (the agent's relay, supervisor/agent/relay.py) go
through `Supervisor.heartbeat` one by one (the per-rank route's path), stricter: a heartbeat is
taken only for a (rank, pid) that the same report lists, of the report's generation, from an
agent that is a member of the running generation (O(ranks of the node), not a scan of every
node's report); a refused one is counted in the reply (``heartbeats_refused``) and in
``titan_supervisor_errors_total{kind="heartbeat_refused"}``, the rest of the report is taken. The commands run through the
`ControlPlane` pipeline (auth, validation, dry run, audit) like every other command.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from supervisor.control import Command, CommandSpec, ControlPlane, Refusal
from supervisor.protocol import NodeName, NodeReport, wire_context
from supervisor.wire import WireError, inert, loads, read_body

MAX_REPORT_BODY = 1024 * 1024
REPORT_PATH = "/v1/nodes/report"  # dispatched to `report` without the router (supervisor/api.py)
EXCLUDE_NODE = "exclude_node"
_REFUSAL_FIELDS = {"heartbeats_refused", "heartbeat_refusal"}  # in a reply only when a heartbeat was refused


def _agent_refusal(cp: ControlPlane, request: Request):
    """Who may post a report: (principal name or None for any, refusal response or None)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if not cp.tokens.configured:
        server = cp.sup.settings.server
        if server.allow_unauthenticated_loopback and server.loopback:
            return None, None
        return None, Refusal(401, "no tokens are configured: node reports are refused (add one per agent with "
                                  "`titan-supervisor token add NODE --role agent --file FILE`)").response()
    who = cp.tokens.lookup(token)
    if who is None:
        return None, Refusal(401, "missing, unknown or revoked agent token").response()
    if who.role != "agent":
        return None, Refusal(403, f"token {who.name!r} has role {who.role}; node reports need role agent").response()
    return who.name, None


def node_routes(r: APIRouter, cp: ControlPlane, cred_dep) -> None:
    sup = cp.sup

    @r.post("/nodes/report", tags=["agents"], summary="One node agent's report (ranks, exits, health); "
                                                      "replies with the node's desired state")
    async def report(request: Request):
        name, refused = _agent_refusal(cp, request)
        if refused is not None:
            return refused
        try:
            obj = loads(await read_body(request, MAX_REPORT_BODY))
        except WireError as e:
            return JSONResponse({"error": e.message, "details": []}, status_code=e.status)
        server = sup.settings.server
        try:
            rep = NodeReport.model_validate(obj, context=wire_context(
                time.time(), future_s=server.clock_skew_s, past_s=server.max_record_age_s))
        except ValidationError as e:
            details = [{"field": ".".join(str(x) for x in err.get("loc", ())), "problem": err.get("msg", "")}
                       for err in e.errors()]
            return JSONResponse({"error": "body is not a valid NodeReport", "details": details}, status_code=400)
        if name is not None and rep.agent_id != name:
            return Refusal(403, f"token {name!r} may only report as agent {name!r}, not {rep.agent_id!r}").response()
        if rep.run_id != sup.settings.run.run_id:
            return Refusal(409, f"this supervisor runs {sup.settings.run.run_id!r}, not {rep.run_id!r}").response()
        stray = next((hb for hb in rep.heartbeats if hb.host != rep.node or hb.run_id != rep.run_id), None)
        if stray is not None:
            return JSONResponse({"error": f"heartbeat of rank {stray.rank} names host {inert(stray.host)!r} and run "
                                          f"{inert(stray.run_id)!r}; a node's report carries only its own node's "
                                          f"({rep.node!r}) heartbeats of its run", "details": []}, status_code=400)
        claim = sup.nodes.claim_refusal(rep)
        if claim is not None:
            return Refusal(409, claim).response()
        reply = sup.nodes.ingest(rep)
        refused, first = 0, None
        listed = {(r.rank, r.pid) for r in rep.ranks} if rep.heartbeats else set()
        for hb in rep.heartbeats:  # the per-rank route's own path: pid ownership, detectors, metrics
            if hb.generation != rep.generation or (hb.rank, hb.pid) not in listed:
                why = (f"rank {hb.rank} with pid {hb.pid} of generation {hb.generation} is not among the ranks "
                       f"this report lists (generation {rep.generation})")
                sup.heartbeat_refused(hb, why)
            else:
                why = sup.heartbeat(hb, agent=rep.agent_id)
            if why is not None:
                refused, first = refused + 1, first or f"rank {hb.rank}: {why}"
        if refused:
            return JSONResponse(reply.model_copy(update={"heartbeats_refused": refused, "heartbeat_refusal": first})
                                .model_dump(mode="json"))
        return JSONResponse(reply.model_dump(mode="json", exclude=_REFUSAL_FIELDS))

    @r.get("/nodes", tags=["read"], summary="Node agents: state, ranks, health, exclusions")
    async def nodes(cred=cred_dep):
        try:
            cp.authorize(cred, "viewer")
        except Refusal as e:
            return e.response()
        return {"backend": sup.settings.launch.backend, "nodes": sup.nodes.view(),
                "excluded": sorted(sup.nodes.excluded)}


# --- commands ---------------------------------------------------------------------------------

class NodeBody(Command):
    node: NodeName = Field(description="The node (host name its agent reports).")


def _agents_only(cp: ControlPlane) -> None:
    if cp.sup.settings.launch.backend != "agents":
        raise Refusal(409, f"this run has no node agents (launch.backend = {cp.sup.settings.launch.backend}); "
                           "nodes are excluded by the policy's exclude_node on Kubernetes")


def exclude_plan(cp: ControlPlane, who, b: NodeBody, extra: dict) -> dict:
    _agents_only(cp)
    reg = cp.sup.nodes
    if b.node in reg.excluded:
        raise Refusal(409, f"node {b.node} is already excluded")
    if not reg.known(b.node):
        known = sorted({row["node"] for row in reg.view()})
        raise Refusal(400, f"no agent has reported node {b.node!r}; known nodes: {known}")
    live = [v.node for v in reg.live()]
    remaining = [n for n in live if n != b.node]
    least = cp.sup.settings.launch.agents.min_nodes
    if len(remaining) < least:
        raise Refusal(409, f"excluding {b.node} would leave {len(remaining)} live node(s) {remaining}; "
                           f"the run needs at least {least} (launch.agents.min_nodes)")
    gen = cp.sup.gen
    in_use = gen is not None and b.node in getattr(gen, "nodes", ())
    return {"action": EXCLUDE_NODE, "node": b.node, "nodes_after": remaining,
            "restart": (f"generation {gen.generation} runs on it: stop it and restart on {len(remaining)} node(s) "
                        "from the newest valid checkpoint") if in_use else "no: it runs no generation now",
            "in_use": in_use}


async def exclude_start(cp: ControlPlane, who, b: NodeBody, plan: dict, rid: str) -> dict[str, Any]:
    sup = cp.sup
    if plan["in_use"]:
        return await cp.start_heavy(EXCLUDE_NODE, who, {"reason": b.reason, "node": b.node}, rid,
                                    f"excluding node {b.node} and restarting without it")
    sup.nodes.exclude(b.node)
    sup.metrics.set_excluded_nodes(sup.nodes.excluded)
    sup.log.warning("node excluded by operator", node=b.node, actor=who.name)
    return {"message": f"node {b.node} excluded; it runs nothing until readmitted"}


def readmit_plan(cp: ControlPlane, who, b: NodeBody, extra: dict) -> dict:
    _agents_only(cp)
    if b.node not in cp.sup.nodes.excluded:
        raise Refusal(409, f"node {b.node} is not excluded; excluded: {sorted(cp.sup.nodes.excluded)}")
    return {"action": "readmit_node", "node": b.node, "when": "from the next generation on"}


async def readmit_start(cp: ControlPlane, who, b: NodeBody, plan: dict, rid: str) -> dict[str, Any]:
    sup = cp.sup
    sup.nodes.readmit(b.node)
    sup.metrics.set_excluded_nodes(sup.nodes.excluded)
    sup.log.warning("node readmitted by operator", node=b.node, actor=who.name)
    return {"message": f"node {b.node} readmitted; it joins from the next generation on"}


NODE_COMMAND_SPECS: tuple[CommandSpec, ...] = (
    CommandSpec(name="nodes-exclude", body=NodeBody, kind=EXCLUDE_NODE,
                summary="Drain a node: it runs nothing until readmitted (restarts the run without it)",
                keys=lambda b, extra: {"node": b.node}, plan=exclude_plan,
                describe=lambda p, b: f"exclude node {p['node']} (restart: {p['restart']})",
                start=exclude_start),
    CommandSpec(name="nodes-readmit", body=NodeBody, exclusive=False,
                summary="Let an excluded node run generations again (from the next one on)",
                plan=readmit_plan, describe=lambda p, b: f"readmit node {p['node']} {p['when']}",
                start=readmit_start),
)
