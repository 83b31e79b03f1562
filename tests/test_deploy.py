"""deploy/kubernetes/: the manifests are valid Kubernetes objects, pass the scripts flags
they accept, and run as one shared run on separate hosts (network namespaces) with the
environment the Indexed Job gives each pod."""

import importlib.util
import json
import os
import re
import subprocess
import time
import uuid

import pytest

from conftest import ROOT, load_script, wait_until
from netns import network  # noqa: F401  (the fixture)
from pushpull import instances

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

DEPLOY = ROOT / "deploy" / "kubernetes"
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def load_render():
    """deploy/kubernetes/render.py as a module."""
    spec = importlib.util.spec_from_file_location("render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rendered(receivers=2, instances=3, extra=("--workers", "4", "--rate", "1000",
                                              "--duration", "5"), start_at=None):
    """The rendered manifests, parsed: {kind: object}."""
    render = load_render()
    start_at = start_at or "2026-12-07T04:00:00+00:00"
    text = render.render("pushpull:test", receivers, instances, start_at, "pushpull-sender-1",
                         list(extra))
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text) if doc}


def container(obj):
    """The one container of a workload's pod template."""
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def expand(args, env):
    """Kubernetes' $(VAR) expansion of a container's args from its environment."""
    return [VARIABLE.sub(lambda m: env[m[1]], arg) for arg in args]


def test_manifests_are_valid_kubernetes_objects():
    """Service, StatefulSet and Indexed Job pass the Kubernetes schemas (strict, offline)."""
    docs = rendered()
    assert set(docs) == {"Service", "StatefulSet", "Job"}
    version = kubernetes_validate.latest_version()
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_job_passes_the_sender_what_it_accepts(tmp_path):
    """Each pod's args, expanded with the Job's environment, parse as instance K of the
    run: --instances = completions, --run-id = the Job's UID, one --start-at."""
    docs = rendered(receivers=2, instances=3)
    job, sts, service = docs["Job"], docs["StatefulSet"], docs["Service"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    sender_container = container(job)
    fields = {e["name"]: e["valueFrom"] for e in sender_container["env"]}
    assert fields["RUN_ID"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    assert fields["JOB_COMPLETION_INDEX"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    args = sender_container["args"]
    assert set(VARIABLE.findall(" ".join(args))) <= set(fields)
    sender = load_script("async-socket-sender")
    uid = str(uuid.uuid4())
    for index in range(3):
        config = sender.parse_args(expand(args, {"JOB_COMPLETION_INDEX": str(index),
                                                 "RUN_ID": uid}))
        assert (config.plan.instance, config.plan.instances) == (index, 3)
        assert config.plan.run_name == uid and config.plan.start_ns is not None
        assert config.endpoints == ("tcp://receiver-0.receiver:5560",
                                    "tcp://receiver-1.receiver:5560")
    # The names the senders connect to are the StatefulSet's pods behind the Service.
    assert sts["spec"]["serviceName"] == service["metadata"]["name"] == "receiver"
    assert sts["spec"]["replicas"] == 2 and service["spec"]["clusterIP"] == "None"
    receiver = load_script("async-socket-receiver")
    mounted = [a.replace("/results", str(tmp_path)) for a in container(sts)["args"]]
    assert mounted != container(sts)["args"]  # its JSON and spill file go to the volume
    receiver_config = receiver.parse_args(mounted)
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"data": receiver_config.port, "confirm": receiver_config.port + 1}
    assert container(sts)["command"] == ["python3", "async-socket-receiver.py"]


def test_dockerfile_holds_the_scripts_and_pyzmq_alone():
    """The image: both scripts, pushpull/, and requirements.txt (pyzmq) installed."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert "COPY async-socket-receiver.py async-socket-sender.py ./" in text
    assert "COPY pushpull/ pushpull/" in text
    assert "pip install --no-cache-dir -r requirements.txt" in text
    requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8").split()
    assert [r.split(">")[0] for r in requirements] == ["pyzmq"]


def test_render_refuses_flags_the_manifests_set(capsys):
    """Flags the Job sets itself, or a flag the sender refuses: exit 2 at render time."""
    render = load_render()
    for extra in (["--run-id", "x"], ["--workers", "0"]):
        with pytest.raises(SystemExit) as stop:
            render.main(["--instances", "2", "--", *extra])
        assert stop.value.code == 2
    assert "the manifests set --run-id themselves" in capsys.readouterr().err


def test_instances_on_separate_hosts_share_one_run(network):  # noqa: F811
    """The Job's pod command and args, with the environment the Indexed Job sets, run on
    two sender hosts against a receiver host: one run, every instance exits 0."""
    net = network(receivers=2)
    receiver = net.receiver("--processing-time", "0", "--no-file-log", "--quiet",
                            host=net.receiver_hosts[0])
    start_at = time.time_ns() + 3_000_000_000
    docs = rendered(receivers=1, instances=2, start_at=instances.iso_time(start_at),
                    extra=("--workers", "2", "--messages", "100", "--rate", "400",
                           "--report-timeout", "20"))
    pod = container(docs["Job"])
    uid = str(uuid.uuid4())
    hosts = [net.sender_host, net.receiver_hosts[1]]  # host b serves as a sender host
    pods = []
    try:
        for index, host in enumerate(hosts):
            args = expand(pod["args"], {"JOB_COMPLETION_INDEX": str(index), "RUN_ID": uid})
            args = [a.replace("receiver-0.receiver", receiver.host.addr) for a in args]
            out = open(net.workdir / f"pod{index}.out", "wb")
            env = dict(os.environ, JOB_COMPLETION_INDEX=str(index), RUN_ID=uid,
                       SUMMARY_FILE=str(net.workdir / f"pod{index}.json"))
            pods.append((subprocess.Popen(["ip", "netns", "exec", host.ns, *pod["command"],
                                           *args], cwd=ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT), out))
        summaries = []
        for index, (proc, out) in enumerate(pods):
            assert proc.wait(45) == 0, (net.workdir / f"pod{index}.out").read_text()
            log = (net.workdir / f"pod{index}.out").read_text()
            summaries.append(json.loads(log.split("----- JSON summary -----\n", 1)[1]))
    finally:
        for proc, out in pods:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            out.close()
    assert [s["run"]["instance"] for s in summaries] == [0, 1]
    for summary in summaries:
        assert summary["run"]["name"] == uid and summary["sent"] == 200
        assert summary["run"]["received"] == summary["run"]["planned"] == 400
    wait_until(lambda: receiver.lines(r"\[RUN\] run \w+ \| received 400/400"), 10,
               "the receiver's [RUN] line of the whole run")
    assert receiver.stop() == 0
    assert [r["received"] for r in receiver.summary()["runs"]] == [400]
