# PYTHON_ARGCOMPLETE_OK
"""`titan-supervisor`: the daemon, the offline tools, and the on-call client (supervisor/oncall.py).

Exit codes: 0 ok; 1 the command ran and found a problem (preflight errors, replay decisions
that stop the run, an action that failed); 2 bad usage or bad input (config, arguments, files,
a command the daemon refused as invalid); the on-call commands add 3-7 (supervisor/client.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_run(args) -> int:
    from supervisor import service
    from supervisor.settings import ConfigError, Settings

    overrides: dict = {}
    if args.port is not None:
        overrides.setdefault("server", {})["port"] = args.port
    if args.workdir is not None:
        overrides.setdefault("run", {})["workdir"] = args.workdir
    try:
        settings = Settings.load(args.config, **overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        return service.run(settings)
    except ConfigError as e:  # found while starting (e.g. an unreadable reference spool)
        print(f"config error: {e}", file=sys.stderr)
        return 2


def _cmd_replay(args) -> int:
    from supervisor.replay import ReplayError, format_decisions, replay
    from supervisor.settings import ConfigError, Settings

    try:
        settings = Settings.load(args.config) if args.config else Settings.load()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from supervisor.spool import SpoolError, read_spool

    try:
        lines = read_spool(Path(args.spool), strict=True)
    except SpoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        pairs = replay(lines, suite_config=settings.detector_config(), policy_config=settings.policy_config())
    except ReplayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"finding": f.to_dict(), "decision": d.to_dict()} for f, d in pairs], indent=1))
    else:
        print(format_decisions(pairs))
    return 0


def _cmd_preflight(args) -> int:
    import psutil

    from supervisor.preflight import exit_code, format_report, preflight
    from supervisor.run_plan import build_plan
    from supervisor.settings import ConfigError, Settings

    try:
        settings = Settings.load(args.config)
        report = preflight(build_plan(settings, psutil.virtual_memory().total / 2**30), settings.preflight.thresholds)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else format_report(report))
    return exit_code(report)


def _cmd_config(args) -> int:
    from supervisor.settings import ConfigError, Settings
    from supervisor.settings_toml import to_toml

    if args.defaults == (args.config is not None):
        print("error: give either CONFIG or --defaults", file=sys.stderr)
        return 2
    try:
        # --defaults: the built-in tree, untouched by TITAN_SUPERVISOR_* (a template to copy)
        settings = Settings.defaults() if args.defaults else Settings.load(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(to_toml(settings))
    return 0


def _cmd_demo(args) -> int:
    from supervisor import demo

    return demo.main(workdir=args.workdir, steps=args.steps, keep=args.keep)


def _cmd_agent(args) -> int:
    from supervisor.agent.main import load_agent_config, run_agent

    try:
        cfg = load_agent_config(args.config, dict(os.environ), {
            "daemon_url": args.daemon, "run_id": args.run_id, "agent_id": args.agent_id, "workdir": args.workdir,
            "node": args.node, "address": args.address, "token_file": args.token_file, "python": args.python,
            "kernel_log": args.kernel_log, "report_interval_s": args.interval})
        if cfg.token_file:
            Path(cfg.token_file).read_text()
    except (OSError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return run_agent(cfg)


def build_parser() -> argparse.ArgumentParser:
    from supervisor import oncall
    from supervisor.client import EXIT_CODES

    p = argparse.ArgumentParser(prog="titan-supervisor", description="Keeps a torchtitan run alive and healthy.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit codes:\n" + "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items())
                                       + "\n\nexample:\n  titan-supervisor status --watch")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the daemon for the run described by CONFIG",
                       description="Run the supervisor daemon.\n\nexample:\n  titan-supervisor run /etc/titan-supervisor/run.toml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("config", nargs="?", help="TOML settings file (then TITAN_SUPERVISOR_* env, then flags)")
    r.add_argument("--port", type=int, help="override server.port")
    r.add_argument("--workdir", help="override run.workdir")
    r.set_defaults(func=_cmd_run)

    rp = sub.add_parser("replay", help="run the detectors and policy over a recorded spool",
                        description="Print the decisions the daemon would make on a recorded run.\n\n"
                                    "example:\n  titan-supervisor replay runs/demo/telemetry/spool.jsonl --config run.toml",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("spool", help="the trainer's telemetry spool (JSON lines)")
    rp.add_argument("--config", help="TOML settings whose [detect]/[policy] tables to use")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.set_defaults(func=_cmd_replay)

    pf = sub.add_parser("preflight", help="lint hyperparameters and the parallel plan before launching",
                        description="Check the run described by CONFIG before it costs GPU hours: Adam epsilon,\n"
                                    "beta2, weight decay, warmup, peak LR for the model size; DPxTPxPP(xCP) = world,\n"
                                    "head/layer divisibility, batch divisibility, a per-GPU memory estimate.\n"
                                    "Exit 1 on errors. Also runs automatically before every launch.\n\n"
                                    "example:\n  titan-supervisor preflight run.toml --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pf.add_argument("config", help="TOML settings ([run], [optimizer], [preflight] tables)")
    pf.add_argument("--json", action="store_true", help="machine-readable output")
    pf.set_defaults(func=_cmd_preflight)

    c = sub.add_parser("config", help="print the settings tree as TOML (the defaults, or CONFIG's effective values)",
                       description="Print every setting with its documentation as TOML.\n\n"
                                   "--defaults prints the built-in defaults (copy it to start a run file);\n"
                                   "CONFIG prints the effective settings: CONFIG, then TITAN_SUPERVISOR_* env.\n\n"
                                   "example:\n  titan-supervisor config --defaults > run.toml\n"
                                   "  titan-supervisor config run.toml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("config", nargs="?", help="TOML settings file")
    c.add_argument("--defaults", action="store_true", help="print the defaults instead")
    c.set_defaults(func=_cmd_config)

    d = sub.add_parser("demo", help="a supervised 2-rank CPU run with a scripted failure drill",
                       description="Run the demo: real torchtitan on 2 CPU ranks, a loss spike, a NaN, a killed rank\n"
                                   "and a hung rank, each handled by the supervisor; then a summary.\n\n"
                                   "example:\n  titan-supervisor demo --workdir runs/demo",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--workdir", default="runs/demo", help="where the run writes (default runs/demo; emptied first)")
    d.add_argument("--steps", type=int, default=240, help="training steps (default 240)")
    d.add_argument("--keep", action="store_true", help="do not empty the workdir first")
    d.set_defaults(func=_cmd_demo)
    a = sub.add_parser("agent", help="run this node's agent (one per node; launches the node's ranks)",
                       description="Run a node agent: report ranks, exits and node health to the daemon and run the\n"
                                   "node's part of each generation it orders (launch.backend = \"agents\").\n\n"
                                   "example:\n  titan-supervisor agent --daemon http://supervisor:8642 --run-id llama8b "
                                   "--agent-id gpu-017 \\\n    --token-file /etc/titan-supervisor/agent.token "
                                   "--workdir /var/lib/titan-supervisor",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("config", nargs="?", help="TOML file with an [agent] table (then TITAN_SUPERVISOR_AGENT__* env, "
                                             "then these flags)")
    a.add_argument("--daemon", help="the daemon's URL (agent.daemon_url)")
    a.add_argument("--run-id", help="the run (run.run_id of the daemon)")
    a.add_argument("--agent-id", help="this agent's name (its token's name; default: the node name)")
    a.add_argument("--workdir", help="agent state and rank logs (default /var/lib/titan-supervisor-agent)")
    a.add_argument("--node", help="node name (default: the host name)")
    a.add_argument("--address", help="address other nodes reach this one at (default: the FQDN)")
    a.add_argument("--token-file", help="this agent's token (role agent)")
    a.add_argument("--python", help="Python that runs torchrun here (default: as the daemon says)")
    a.add_argument("--kernel-log", help="/dev/kmsg (default), dmesg, a file, or none")
    a.add_argument("--interval", type=oncall._pos_float, help="report interval until the daemon sets one (default 1 s)")
    a.set_defaults(func=_cmd_agent)
    oncall.add_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # shell completion (`titan-supervisor completion bash`)
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
