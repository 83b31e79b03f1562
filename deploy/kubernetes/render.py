#!/usr/bin/env python3
"""Render the Kubernetes manifests of one run over many hosts (docs/many-hosts.md).

    python3 deploy/kubernetes/render.py --instances 4 --receivers 2 --start-in 60 \\
        -- --workers 10 --rate 20000 --duration 60 > run.yaml
    kubectl apply -f run.yaml

The receivers' StatefulSet and headless Service, then the senders' Indexed Job:
instance K of --instances, the run's ID from the Job's UID, --start-at fixed now to
--start-in seconds ahead, so every instance starts the one schedule together. The
sender flags after `--` are checked here with the sender's own parser.
"""

import argparse
import datetime
import importlib.util
import json
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DATA_PORT = 5560  # the receivers' port (their confirmation channel: the next one)
RESULTS = "/results"  # the receivers' emptyDir: their JSON summary, their spill file
SUMMARY_MARKER = "----- JSON summary -----"  # the line before a sender's JSON in its log
SET_HERE = ("--instances", "--instance", "--run-id", "--start-at", "--connect", "--json",
            "--processes")  # sender flags the manifests set themselves
# The sender pod's command: the sender, then its JSON summary after SUMMARY_MARKER, so
# `kubectl logs` holds both (a finished pod's files cannot be copied). SIGTERM (pod
# deleted) is passed on to the sender, which stops warm as for Ctrl+C.
SENDER_SCRIPT = f"""summary="${{SUMMARY_FILE:-/tmp/summary.json}}"
python3 async-socket-sender.py "$@" --json "$summary" &
child=$!
stopping=0
trap 'stopping=1; kill -TERM "$child" 2>/dev/null' TERM INT
wait "$child"; status=$?
if [ "$stopping" = 1 ]; then wait "$child"; status=$?; fi
echo "{SUMMARY_MARKER}"
cat "$summary" 2>/dev/null
exit "$status"
"""
SENDER_COMMAND = ["sh", "-c", SENDER_SCRIPT, "sender"]


def receiver_args(port=DATA_PORT):
    """The receivers' flags: every interface, the JSON summary kept in RESULTS."""
    return ["--port", str(port), "--bind", "*", "--no-file-log", "--quiet",
            "--json", f"{RESULTS}/receiver.json", "--spill-file", f"{RESULTS}/spill.bin"]


def receiver_endpoints(receivers, port=DATA_PORT):
    """The receivers' stable names (StatefulSet pod . headless Service)."""
    return [f"tcp://receiver-{k}.receiver:{port}" for k in range(receivers)]


def sender_args(instances, start_at, endpoints, extra):
    """The sender pods' flags: $(VAR) is expanded by Kubernetes from the container's env."""
    connect = [arg for endpoint in endpoints for arg in ("--connect", endpoint)]
    return ["--instances", str(instances), "--instance", "$(JOB_COMPLETION_INDEX)",
            "--run-id", "$(RUN_ID)", "--start-at", start_at, *connect, "--quiet", *extra]


def load_sender():
    """The sender script as a module: its parser checks the flags rendered."""
    sys.path.insert(0, str(ROOT))  # its package, pushpull
    spec = importlib.util.spec_from_file_location("async_socket_sender",
                                                  ROOT / "async-socket-sender.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def render(image, receivers, instances, start_at, job_name, extra, port=DATA_PORT):
    """The manifests as YAML text (lists written as JSON, which YAML reads as is)."""
    endpoints = receiver_endpoints(receivers, port)
    values = {
        "IMAGE": image, "RECEIVERS": str(receivers), "INSTANCES": str(instances),
        "JOB_NAME": job_name, "DATA_PORT": str(port), "CONFIRM_PORT": str(port + 1),
        "RECEIVER_ARGS": json.dumps(receiver_args(port)),
        "SENDER_COMMAND": json.dumps(SENDER_COMMAND),
        "SENDER_ARGS": json.dumps(sender_args(instances, start_at, endpoints, extra)),
    }
    parts = []
    for name in ("receiver.yaml.in", "sender-job.yaml.in"):
        text = (HERE / name).read_text(encoding="utf-8")
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        parts.append(text)
    return "---\n".join(parts)


def main(argv=None):
    """Check the options and the sender flags, print the manifests; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="pushpull:latest", help="the image (Dockerfile here)")
    p.add_argument("--receivers", type=int, default=2, help="receiver pods")
    p.add_argument("--instances", type=int, default=2, help="sender pods: the Job's completions")
    p.add_argument("--start-in", type=float, default=60.0, metavar="SECONDS",
                   help="the run starts this long after rendering (pods must be up by then)")
    p.add_argument("--job-name", help="the Job's name (default: pushpull-sender-TIME)")
    p.add_argument("sender_flags", nargs=argparse.REMAINDER,
                   help="-- then the sender's own flags (--workers, --rate, --duration, ...)")
    a = p.parse_args(argv)
    extra = a.sender_flags[1:] if a.sender_flags[:1] == ["--"] else a.sender_flags
    if a.receivers < 1 or a.instances < 2 or a.start_in < 0:
        p.error("--receivers >= 1, --instances >= 2 and --start-in >= 0 are needed")
    taken = [flag for flag in extra if flag.split("=")[0] in SET_HERE]
    if taken:
        p.error(f"the manifests set {', '.join(taken)} themselves")
    start = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=a.start_in)
    start_at = start.isoformat(timespec="seconds")
    job_name = a.job_name or f"pushpull-sender-{int(time.time())}"
    args = sender_args(a.instances, start_at, receiver_endpoints(a.receivers), extra)
    example = {"$(JOB_COMPLETION_INDEX)": "0", "$(RUN_ID)": str(uuid.uuid4())}
    load_sender().parse_args([example.get(arg, arg) for arg in args])  # exit 2 if refused
    sys.stdout.write(render(a.image, a.receivers, a.instances, start_at, job_name, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
