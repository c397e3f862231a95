"""The on-call subcommands of `titan-supervisor`: a client of the daemon's /v1 API
(supervisor/control.py) with human tables by default and ``--json`` for scripts.

Every command that changes something takes ``--reason``, can ``--dry-run`` (prints the exact
plan the daemon would carry out), and sends a fresh request id that retries reuse. Destructive
ones (rollback, pause, resume, skip-data, decay-now, policy, confirm) show the plan and ask
for confirmation when stdin is a terminal, unless ``--yes``.
Exit codes: see `supervisor.client.EXIT_CODES` (printed by ``titan-supervisor --help``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from datetime import datetime, timezone

from supervisor import client as C
from supervisor.wire import ascii_int, inert

FMT = argparse.RawDescriptionHelpFormatter


# --- rendering ------------------------------------------------------------------------------

def _console(width: int | None = None, file=None):
    from rich.console import Console

    return Console(width=width, file=file, highlight=False, soft_wrap=False)


def _ago(t: float | None, now: float | None = None) -> str:
    if t is None:
        return "-"
    s = max(0.0, (now or time.time()) - t)
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    if s < 172800:
        return f"{s / 3600:.1f}h ago"
    return f"{s / 86400:.1f}d ago"


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%m-%d %H:%M:%S")


def _fmt_num(x, spec: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x  # "nan" / "inf"
    return format(x, spec)


STATE_STYLE = {"running": "green", "starting": "cyan", "recovering": "yellow", "paused": "yellow",
               "stopped": "red", "failed": "red", "finished": "blue"}


def _add(table, *cells) -> None:
    """A table row whose every string came from outside (a reason, an alert name, a token name):
    rendered inert, so escape codes and rich markup print as the text they are."""
    table.add_row(*(inert(c, newlines=True) if isinstance(c, str) else c for c in cells))


def render_status(st: dict):
    """The status panel; fits an 80-column terminal (numbers in a 4-column grid, then one
    full-width line each for the action in flight, the policy and the open incidents)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold", no_wrap=True, width=10)
    t.add_column(width=26, overflow="ellipsis", no_wrap=True)
    t.add_column(style="bold", no_wrap=True, width=10)
    t.add_column(width=28, overflow="ellipsis", no_wrap=True)
    state = Text(inert(st.get("state", "?"), markup=False), style=STATE_STYLE.get(st.get("state"), ""))
    total = st.get("total_steps")
    step = f"{st.get('step', 0)}" + (f" / {total}" if total else "")
    lr = _fmt_num(st.get("lr"), ".2e")
    scale = st.get("lr_scale")
    if scale is not None and scale != 1.0:
        lr += f" (x{scale:g})"
    tps = st.get("tokens_per_s")
    _add(t, "run", f"{st.get('run_id')}", "generation", f"{st.get('generation')}  mode {st.get('mode', '?')}")
    _add(t, "state", state, "step", step)
    _add(t, "loss", _fmt_num(st.get("loss"), ".4f"), "tokens/s", f"{tps:,.0f}" if tps is not None else "-")
    _add(t, "lr", lr, "updated", _ago(st.get("updated_at")))
    lkg, newest = st.get("last_known_good"), st.get("newest_checkpoint")
    _add(t, "LKG", f"step {lkg}" if lkg is not None else "-", "checkpoint",
              f"step {newest}" if newest is not None else "-")
    w = Table.grid(padding=(0, 1))
    w.add_column(style="bold", no_wrap=True, width=10)
    w.add_column(overflow="fold", ratio=1)
    a = st.get("action")
    if a:
        _add(w, "action", f"#{a['id']} {a['kind']} by {a.get('actor')}, started {_ago(a.get('since'))}")
    _add(w, "policy", st.get("policy_now", ""))
    rec = st.get("recommended_checkpoint_interval")
    if st.get("checkpoint_interval") or rec:
        _add(w, "ckpt every", f"{st.get('checkpoint_interval') or '-'} steps"
                  + (f" (Young/Daly recommends {rec['steps']})" if rec else ""))
    nodes = st.get("nodes") or {}
    if nodes.get("in_generation") or nodes.get("excluded"):
        _add(w, "nodes", inert(f"{', '.join(nodes.get('in_generation') or []) or '-'}"
                               + (f"  excluded: {', '.join(nodes['excluded'])}" if nodes.get("excluded") else ""),
                               markup=False))
    for node, why in sorted((nodes.get("returning") or {}).items()):
        _add(w, "returning", inert(f"{node}: {why}", markup=False))
    inc = st.get("open_incidents") or []
    if inc:
        lines = [f"#{i['id']} {i['kind']} @{i.get('onset_step')} {i['state']}"
                 + (f" by {i['acked_by']}" if i.get("acked_by") else "") for i in inc[:4]]
        if len(inc) > 4:
            lines.append(f"... {len(inc) - 4} more: titan-supervisor incidents")
        _add(w, "incidents", Text(inert("\n".join(lines), newlines=True, markup=False), style="red"))
    else:
        _add(w, "incidents", Text("none open", style="green"))
    return Group(t, w)


def _table(title: str | None, columns: list[tuple[str, dict]]):
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=None, header_style="bold", pad_edge=False)
    for name, kw in columns:
        t.add_column(name, **kw)
    return t


def render_incidents(rows: list[dict]):
    t = _table(None, [("id", {"justify": "right"}), ("state", {}), ("kind", {}), ("onset", {"justify": "right"}),
                      ("opened", {"no_wrap": True}), ("acked by", {}), ("resolution", {"overflow": "fold"})])
    for i in rows:
        _add(t, str(i["id"]), i["state"], i["kind"], str(i.get("onset_step")), _ago(i.get("opened_at")),
                  i.get("acked_by") or "-", i.get("resolution") or "")
    return t


def render_incident(inc: dict):
    from rich.console import Group
    from rich.text import Text

    head = Text(inert(f"incident #{inc['id']} {inc['kind']} at step {inc.get('onset_step')} - {inc['state']}"
                + (f", acked by {inc['acked_by']}" if inc.get("acked_by") else "")
                + (f"\nresolution: {inc['resolution']}" if inc.get("resolution") else ""), newlines=True, markup=False),
                style="bold")
    f = _table("findings", [("id", {"justify": "right"}), ("step", {"justify": "right"}), ("kind", {}),
                            ("sev", {}), ("rank", {}), ("evidence", {"overflow": "fold"})])
    for x in inc.get("findings", []):
        _add(f, str(x["id"]), str(x.get("step")), x["kind"], x["severity"], str(x.get("rank") or "-"),
                  json.dumps(x.get("evidence"), default=str)[:160])
    d = _table("decisions", [("id", {"justify": "right"}), ("action", {}), ("advisory", {}),
                             ("reason", {"overflow": "fold"})])
    for x in inc.get("decisions", []):
        _add(d, str(x["id"]), x["action"], "yes" if x.get("advisory") else "", x.get("reason", ""))
    a = _table("actions", [("id", {"justify": "right"}), ("kind", {}), ("by", {}), ("state", {}),
                           ("outcome", {"overflow": "fold"})])
    for x in inc.get("actions", []) + inc.get("operator_actions", []):
        _add(a, str(x["id"]), x["kind"], x.get("actor", ""), x["state"],
                  json.dumps(_short(x.get("outcome")), default=str)[:160])
    return Group(head, f, d, a)


def _short(outcome):
    if isinstance(outcome, dict):
        return {k: v for k, v in outcome.items() if k not in ("stacks",)}
    return outcome


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_checkpoints(body: dict):
    from rich.console import Group

    t = _table("checkpoints", [("step", {"justify": "right"}), ("state", {}), ("pinned", {}), ("LKG", {}),
                               ("size", {"justify": "right"}), ("saved", {"no_wrap": True}),
                               ("why not valid", {"overflow": "fold"})])
    for c in body.get("checkpoints", []):
        _add(t, str(c["step"]), c["state"], "yes" if c.get("pinned") else "", "yes" if c.get("last_known_good") else "",
                  _size(c.get("size_bytes")), _ago(c.get("mtime")), c.get("reason") or "")
    q = _table("quarantine (kept, never used)", [("step", {"justify": "right"}), ("folder", {}), ("when", {}),
                                                 ("why", {"overflow": "fold"})])
    for c in body.get("quarantined", []):
        _add(q, str(c["step"]), c["name"], _ago(c.get("at")), c.get("reason") or "")
    return Group(t, q) if body.get("quarantined") else t


def render_nodes(body: dict):
    t = _table(f"nodes (launch.backend = {inert(str(body.get('backend')), markup=False)})",
               [("node", {}), ("agent", {}), ("state", {}), ("gen", {"justify": "right"}),
                ("ranks", {}), ("mem free", {"justify": "right"}), ("last report", {})])
    for n in body.get("nodes") or []:
        ranks = ", ".join(f"{r}:{v['pid']} {v['state']}" for r, v in sorted((n.get("ranks") or {}).items()))
        h = n.get("health") or {}
        _add(t, n.get("node"), n.get("agent_id") or "-", n.get("state"), f"{n.get('generation', '-')}",
             ranks or "-", f"{h['mem_available_gib']:.1f} GiB" if h else "-",
             f"{n['seconds_since_report']:.1f}s ago" if n.get("seconds_since_report") is not None else "-")
    return t


def _nodes(args) -> int:
    body = _client(args).get("/v1/nodes")
    _print_json(body) if args.json else _console().print(render_nodes(body))
    return C.EXIT_OK


def render_audit(rows: list[dict]):
    t = _table(None, [("when (UTC)", {"no_wrap": True}), ("who", {}), ("command", {}), ("ok", {}),
                      ("reason", {"overflow": "fold"}), ("result", {"overflow": "fold"})])
    for c in rows:
        result = c.get("result") or ""
        a = c.get("action")
        if a:
            result += f" -> action {a['id']} {a['state']}"
        _add(t, _when(c.get("at")), c.get("actor", ""), c.get("command", ""), "yes" if c.get("accepted") else "NO",
                  c.get("reason") or "", result)
    return t


def render_proposals(body: dict):
    t = _table(f"policy mode: {body.get('mode')}", [("decision", {"justify": "right"}), ("action", {}),
                                                    ("proposed", {"no_wrap": True}), ("why", {"overflow": "fold"})])
    for p in body.get("proposals", []):
        _add(t, str(p["decision_id"]), p["action"], _ago(p.get("created_at")), p.get("reason", ""))
    return t


# --- command plumbing -----------------------------------------------------------------------

def _client(args) -> C.Client:
    cfg = C.ClientConfig.resolve(url=args.url, token=args.token, token_file=args.token_file,
                                 config_file=args.client_config, timeout=args.timeout)
    return C.Client(cfg)


def _plain(text) -> str:
    """A server message for a plain print: it may quote request input, so control codes are spelled out."""
    return inert(text, newlines=True, markup=False)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _fail(e: C.ClientError, as_json: bool) -> int:
    if as_json:
        _print_json({"error": e.message, "details": e.details, "status": e.status, "exit_code": e.exit_code})
    else:
        print(_plain(f"error: {e.message}"), file=sys.stderr)
        for d in e.details or []:
            if isinstance(d, dict) and "field" in d:
                print(_plain(f"  {d['field']}: {d.get('problem')}"), file=sys.stderr)
    return e.exit_code


def _run(fn):
    """Wrap a subcommand: ClientError -> its exit code, Ctrl-C -> 130."""
    def wrapper(args) -> int:
        try:
            return fn(args)
        except C.ClientError as e:
            return _fail(e, getattr(args, "json", False))
        except KeyboardInterrupt:
            return 130
    return wrapper


def _status(args) -> int:
    c = _client(args)
    if args.watch:
        from rich.live import Live

        con = _console()
        try:
            with Live(render_status(c.get("/v1/status")), console=con, refresh_per_second=4, transient=False) as live:
                while True:
                    time.sleep(args.interval)
                    try:
                        live.update(render_status(c.get("/v1/status")))
                    except C.ClientError as e:
                        from rich.text import Text

                        live.update(Text(inert(f"{_when(time.time())} UTC  error: {e.message} (retrying)", markup=False),
                                         style="red"))
        except KeyboardInterrupt:
            return 0
    st = c.get("/v1/status")
    if args.json:
        _print_json(st)
    else:
        _console().print(render_status(st))
    return C.EXIT_FAILED if st.get("state") in ("failed", "stopped") else C.EXIT_OK


def _incidents(args) -> int:
    c = _client(args)
    if args.id is not None:
        inc = c.get(f"/v1/incidents/{args.id}")
        _print_json(inc) if args.json else _console().print(render_incident(inc))
        return C.EXIT_OK
    rows = c.get("/v1/incidents", state=args.state, limit=args.limit)["incidents"]
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no incidents" + (f" in state {args.state}" if args.state else ""))
    else:
        _console().print(render_incidents(rows))
    return C.EXIT_OK


def _checkpoints(args) -> int:
    body = _client(args).get("/v1/checkpoints")
    _print_json(body) if args.json else _console().print(render_checkpoints(body))
    return C.EXIT_OK


def _audit(args) -> int:
    rows = _client(args).get("/v1/audit", limit=args.limit)["commands"]
    _print_json(rows) if args.json else _console().print(render_audit(rows))
    return C.EXIT_OK


def _confirm_on_tty(args, c: C.Client, path: str, body: dict) -> int | None:
    """Show the dry-run plan and ask; None to proceed, else the exit code."""
    if args.yes or args.dry_run or not sys.stdin.isatty():
        return None
    plan = c.post(path, dict(body, dry_run=True, request_id=None))
    print(_plain(plan.get("message", "")))
    for k, v in (plan.get("plan") or {}).items():
        print(_plain(f"  {k}: {v}"))
    try:
        answer = input("Proceed? [y/N] ").strip().lower()
    except EOFError:
        answer = ""
    if answer not in ("y", "yes"):
        print("nothing done", file=sys.stderr)
        return C.EXIT_DECLINED
    return None


def _command(path: str, build, *, destructive: bool, waits: bool = False):
    def run(args) -> int:
        c = _client(args)
        body = {"reason": args.reason, "dry_run": bool(args.dry_run),
                "request_id": args.request_id or f"cli-{uuid.uuid4().hex}"} | build(args)
        p = path(args) if callable(path) else path
        if destructive:
            declined = _confirm_on_tty(args, c, p, body)
            if declined is not None:
                return declined
        out = c.post(p, body)
        if args.dry_run:
            if args.json:
                _print_json(out)
            else:
                print(_plain(out.get("message", "")))
                for k, v in (out.get("plan") or {}).items():
                    print(_plain(f"  {k}: {v}"))
            return C.EXIT_OK
        code = C.EXIT_OK
        if waits and out.get("action_id") is not None and not args.no_wait:
            if not args.json:
                print(_plain(out.get("message", "")), file=sys.stderr)
            final = c.wait_action(out["action_id"], args.wait_timeout)
            out["action"] = final
            state = final.get("state")
            if state != "done":
                code = C.EXIT_FAILED
            if not args.json:
                outcome = json.dumps(_short(final.get("outcome")), default=str)
                mark = "done" if state == "done" else ("STILL RUNNING" if state in ("intent", "running") else state.upper())
                print(_plain(f"action {final['id']} {final['kind']}: {mark} {outcome if final.get('outcome') else ''}".rstrip()))
        elif not args.json:
            print(_plain(out.get("message", "")))
        if out.get("applied") is False:
            code = C.EXIT_FAILED
        if args.json:
            _print_json(out)
        return code
    return run


def _token(args) -> int:
    from supervisor import auth

    path = args.file
    if path is None:
        print("error: give --file (the daemon's server.token_file)", file=sys.stderr)
        return C.EXIT_USAGE
    try:
        if args.token_cmd == "add":
            token = auth.add_token(path, args.name, args.role)
            print(f"token for {args.name} ({args.role}) - shown once, only its hash is stored in {path}:",
                  file=sys.stderr)
            print(token)
        elif args.token_cmd == "revoke":
            if not auth.revoke_token(path, args.name):
                print(f"error: no token named {args.name!r} in {path}", file=sys.stderr)
                return C.EXIT_NOT_FOUND
            print(f"revoked {args.name}")
        else:
            rows = [{"name": e.name, "role": e.role} for e in auth.load_token_file(path)]
            _print_json(rows) if args.json else print("\n".join(f"{r['name']}\t{r['role']}" for r in rows))
    except auth.TokenError as e:
        print(f"error: {e}", file=sys.stderr)
        return C.EXIT_USAGE
    return C.EXIT_OK


def _completion(args) -> int:
    import argcomplete

    print(argcomplete.shellcode(["titan-supervisor"], shell=args.shell))
    return C.EXIT_OK


# --- parser ---------------------------------------------------------------------------------

def _connection_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--url", help="supervisor URL (env TITAN_SUPERVISOR_URL; default http://127.0.0.1:8642)")
    g.add_argument("--token", help="bearer token (env TITAN_SUPERVISOR_TOKEN; prefer --token-file)")
    g.add_argument("--token-file", help="file holding the token (env TITAN_SUPERVISOR_TOKEN_FILE)")
    g.add_argument("--client-config", help="client TOML with url/token/token_file "
                                           "(default ~/.config/titan-supervisor/client.toml)")
    g.add_argument("--timeout", type=_pos_float, default=30.0, help="HTTP timeout in seconds (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    return p


def _mutating_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("safety")
    g.add_argument("--reason", required=True, help="why (journaled with the command; required)")
    g.add_argument("--dry-run", action="store_true", help="print exactly what would happen; change nothing")
    g.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation on a terminal")
    g.add_argument("--request-id", help="idempotency key (default: a new one; retries reuse it)")
    return p


def _waiting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true", help="return once the action has started")
    p.add_argument("--wait-timeout", type=_pos_float, default=600.0, help="seconds to wait for the action (default 600)")


def _nonneg_int(s: str) -> int:
    v = ascii_int(s.removeprefix("-"))
    if v is None:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer (ASCII digits, at most 18)")
    if s.startswith("-") and v != 0:
        raise argparse.ArgumentTypeError(f"{s} must be >= 0")
    return v


def _pos_int(s: str) -> int:
    v = _nonneg_int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not (math.isfinite(v) and v >= 0):  # nan, inf and -1 crashed later with a traceback
        raise argparse.ArgumentTypeError(f"{s!r} must be a finite number >= 0")
    return v


def _pos_float(s: str) -> float:
    v = _nonneg_float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{s} must be > 0")
    return v


def add_subcommands(sub) -> None:
    conn, mut = _connection_parent(), _mutating_parent()

    def add(name, help_, example, fn, parents, **kw):
        p = sub.add_parser(name, help=help_, parents=parents, formatter_class=FMT,
                           description=f"{help_[0].upper()}{help_[1:]}.\n\nexample:\n  {example}", **kw)
        p.set_defaults(func=_run(fn))
        return p

    p = add("status", "what the run and the supervisor are doing now", "titan-supervisor status --watch",
            _status, [conn])
    p.add_argument("--watch", "-w", action="store_true", help="refresh in place until Ctrl-C")
    p.add_argument("--interval", type=_pos_float, default=2.0, help="seconds between refreshes (default 2)")

    p = add("incidents", "list incidents, or show one with its findings, decisions and actions",
            "titan-supervisor incidents --state unresolved   |   titan-supervisor incidents 3", _incidents, [conn])
    p.add_argument("id", nargs="?", type=_nonneg_int, help="incident id to show")
    p.add_argument("--state", choices=["open", "acked", "closed", "unresolved"], help="filter by state")
    p.add_argument("--limit", type=_pos_int, default=50, help="at most this many (default 50)")

    add("checkpoints", "checkpoints with validity, pins, last-known-good and the quarantine",
        "titan-supervisor checkpoints --json", _checkpoints, [conn])

    p = add("rollback", "roll back to a checkpoint step (hot if the trainer runs, else a new generation)",
            'titan-supervisor rollback --to-step 1200 --skip-batches 300 --lr-scale 0.5 --reason "spike at 1250"',
            _command("/v1/commands/rollback", lambda a: {"to_step": a.to_step, "skip_batches": a.skip_batches,
                                                         "lr_scale": a.lr_scale, "ramp_steps": a.ramp_steps},
                     destructive=True, waits=True), [conn, mut])
    p.add_argument("--to-step", required=True, type=_nonneg_int, help="checkpoint step to load")
    p.add_argument("--skip-batches", type=_nonneg_int, default=0, help="batches per rank to drain after loading")
    p.add_argument("--lr-scale", type=_pos_float, help="LR scale after the rollback")
    p.add_argument("--ramp-steps", type=_nonneg_int, default=0, help="re-warm length for --lr-scale")
    _waiting(p)

    p = add("pause", "finish the step, checkpoint, stop the generation; keep everything",
            'titan-supervisor pause --reason "node maintenance"',
            _command("/v1/commands/pause", lambda a: {}, destructive=True, waits=True), [conn, mut])
    _waiting(p)
    p = add("resume", "start a new generation from the newest valid checkpoint",
            'titan-supervisor resume --reason "maintenance done"',
            _command("/v1/commands/resume", lambda a: {}, destructive=True, waits=True), [conn, mut])
    _waiting(p)
    p = add("reshard", "restart on N ranks per node from the same checkpoint (exact data position kept)",
            'titan-supervisor reshard --ranks 1 --reason "node 3 lost"',
            _command("/v1/commands/reshard", lambda a: {"ranks": a.ranks}, destructive=True, waits=True),
            [conn, mut])
    p.add_argument("--ranks", required=True, type=_pos_int, help="ranks per node of the next generation")
    _waiting(p)

    def light(name, help_, example, build, destructive=False):
        p = add(name, help_, example, _command(f"/v1/commands/{name}", lambda a: build(a) | {"wait_s": a.wait},
                                               destructive=destructive), [conn, mut])
        p.add_argument("--wait", type=_nonneg_float, default=10.0,
                       help="seconds to wait for the trainer to apply it (default 10)")
        return p

    p = light("lr", "set the LR scale on top of the schedule", 'titan-supervisor lr --scale 0.5 --ramp-steps 100 '
              '--reason "grad norm creeping up"', lambda a: {"scale": a.scale, "ramp_steps": a.ramp_steps})
    p.add_argument("--scale", required=True, type=_pos_float, help="LR multiplier (0 < S <= 1000)")
    p.add_argument("--ramp-steps", type=_nonneg_int, default=0, help="reach it linearly over R steps")
    p = light("skip-data", "consume the next K batches without an optimizer update",
              'titan-supervisor skip-data --batches 200 --reason "corrupt shard 1432"',
              lambda a: {"batches": a.batches}, destructive=True)
    p.add_argument("--batches", required=True, type=_pos_int, help="how many batches to skip")
    light("checkpoint-now", "save a checkpoint at the next step boundary",
          'titan-supervisor checkpoint-now --reason "before the config change"', lambda a: {})
    p = light("decay-now", "start the WSD decay at this step (the run ends after the decay)",
              'titan-supervisor decay-now --steps 2000 --reason "budget reached"',
              lambda a: {"steps": a.steps} if a.steps else {}, destructive=True)
    p.add_argument("--steps", type=_pos_int, help="decay length (default: the schedule's)")
    p = light("extend", "make the run N steps long in total",
              'titan-supervisor extend --steps 250000 --reason "more data arrived"', lambda a: {"steps": a.steps})
    p.add_argument("--steps", required=True, type=_pos_int, help="new total number of steps")

    p = add("ack", "acknowledge an incident (take ownership)", 'titan-supervisor ack 3 --reason "looking"',
            _command(lambda a: f"/v1/incidents/{a.incident}/ack", lambda a: {}, destructive=False), [conn, mut])
    p.add_argument("incident", type=_nonneg_int, help="incident id")

    p = add("policy", "show the policy mode and its proposals, or set the mode (admin)",
            'titan-supervisor policy --mode advise --reason "hands-on tonight"', _policy, [conn])
    p.add_argument("--mode", choices=["auto", "advise", "off"],
                   help="auto: act; advise: propose, a human confirms; off: record only")
    p.add_argument("--explain", nargs="?", const="", metavar="CONFIG",
                   help="print the decision ladder (triggers, budgets, what comes next) with the thresholds of "
                        "CONFIG's [detect]/[policy] tables (default: built-in); needs no daemon")
    g = p.add_argument_group("safety (with --mode)")
    g.add_argument("--reason", help="why (required with --mode)")
    g.add_argument("--dry-run", action="store_true", help="print what would change")
    g.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation on a terminal")
    g.add_argument("--request-id", help="idempotency key")

    p = add("confirm", "advise mode: carry out a decision the policy proposed",
            'titan-supervisor confirm 42 --reason "agree: roll back"',
            _command(lambda a: f"/v1/proposals/{a.decision}/confirm", lambda a: {}, destructive=True, waits=True),
            [conn, mut])
    p.add_argument("decision", type=_nonneg_int, help="decision id (from `titan-supervisor policy`)")
    _waiting(p)

    p = add("nodes", "node agents: state, ranks, health; exclude or readmit a node",
            'titan-supervisor nodes   |   titan-supervisor nodes exclude gpu-017 --reason "Xid 79 twice"',
            _nodes, [conn])
    nsub = p.add_subparsers(dest="nodes_cmd", metavar="ACTION")
    for name, help_, destructive in [("exclude", "drain NODE: it runs nothing until readmitted; the run restarts "
                                                 "without it if it runs the current generation", True),
                                     ("readmit", "let NODE run generations again, from the next one on", False)]:
        np_ = nsub.add_parser(name, help=help_, parents=[conn, mut], formatter_class=FMT,
                              description=f"{help_[0].upper()}{help_[1:]}.\n\nexample:\n  titan-supervisor nodes "
                                          f"{name} gpu-017 --reason \"...\" --dry-run")
        np_.add_argument("node", help="the node's name (as `titan-supervisor nodes` lists it)")
        np_.set_defaults(func=_run(_command(f"/v1/commands/nodes-{name}", lambda a: {"node": a.node},
                                            destructive=destructive, waits=destructive)))
        if destructive:
            _waiting(np_)

    p = add("audit", "every operator command, accepted or refused: who, when, what, why, result",
            "titan-supervisor audit --limit 20", _audit, [conn])
    p.add_argument("--limit", type=_pos_int, default=50, help="at most this many (default 50)")

    t = sub.add_parser("token", help="manage API tokens in a token file (local)", formatter_class=FMT,
                       description="Manage bearer tokens in the daemon's token file. Only the SHA-256 of a token "
                                   "is stored; `add` prints the token once.\n\nexample:\n"
                                   "  titan-supervisor token add alice --role operator --file /etc/titan/tokens.jsonl")
    tsub = t.add_subparsers(dest="token_cmd", required=True, metavar="ACTION")
    for name, help_, ex in [("add", "make a token for NAME", "titan-supervisor token add alice --role operator "
                                                             "--file tokens.jsonl"),
                            ("revoke", "remove NAME's token", "titan-supervisor token revoke alice --file tokens.jsonl"),
                            ("list", "names and roles", "titan-supervisor token list --file tokens.jsonl")]:
        tp = tsub.add_parser(name, help=help_, formatter_class=FMT,
                             description=f"{help_[0].upper()}{help_[1:]}.\n\nexample:\n  {ex}")
        if name != "list":
            tp.add_argument("name", help="token name (shown in the audit log)")
        if name == "add":
            tp.add_argument("--role", required=True, choices=["viewer", "operator", "admin", "alerts", "agent"],
                            help="viewer: read; operator: commands; admin: also policy; alerts: Alertmanager; "
                                 "agent: one node agent (name it as the agent)")
        tp.add_argument("--file", help="the token file (the daemon's server.token_file)")
        tp.add_argument("--json", action="store_true", help="machine-readable output")
        tp.set_defaults(func=_token)

    p = sub.add_parser("completion", help="print a shell completion script", formatter_class=FMT,
                       description="Print a shell completion script (argcomplete).\n\nexample:\n"
                                   "  eval \"$(titan-supervisor completion bash)\"")
    p.add_argument("shell", choices=["bash", "zsh", "fish", "tcsh"], help="the shell")
    p.set_defaults(func=_completion)


def _policy(args) -> int:
    if args.explain is not None:
        from supervisor.policy import explain
        from supervisor.settings import ConfigError, Settings

        try:
            settings = Settings.load(args.explain) if args.explain else Settings.load()
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return C.EXIT_USAGE
        d = settings.detector_config()
        print(explain(settings.policy_config(), d.loss_spike, d.non_finite))
        return C.EXIT_OK
    c = _client(args)
    if args.mode is None:
        body = c.get("/v1/policy")
        _print_json(body) if args.json else _console().print(render_proposals(body))
        return C.EXIT_OK
    if not args.reason:
        print("error: --reason is required with --mode", file=sys.stderr)
        return C.EXIT_USAGE
    args.no_wait = True
    return _command("/v1/policy", lambda a: {"mode": a.mode}, destructive=True)(args)

