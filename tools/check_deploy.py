#!/usr/bin/env python3
"""Checks deploy/: renders every kustomize overlay (`kubectl kustomize`), validates the output
strictly and offline (`kubernetes-validate --strict`), then for every container that runs an
ExpertMesh binary: runs that binary with the container's arguments and environment and
`--check-config` (the configuration must parse), and checks that its --listen and
--metrics-listen ports are the container's `grpc` and `metrics` ports, that every probe
targets a declared container port, and that every Service's targetPort exists on the pods it
selects.

    python3 tools/check_deploy.py [--bin-dir target/release]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ROOT / "deploy" / "kustomize" / "overlays"
BINARIES = {"router", "prefill-worker", "decode-worker", "expert-worker", "expert-controller"}
# Values the downward API would give.
DOWNWARD = {"metadata.name": "pod-0", "status.podIP": "10.0.0.7"}


def render(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(out)
    try:
        subprocess.run(["kubernetes-validate", "--strict", "--quiet", f.name], check=True)
    finally:
        os.unlink(f.name)
    return [d for d in yaml.safe_load_all(out) if d]


def pod_templates(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d, d["spec"]["template"]


def container_env(container, configmaps):
    env = {}
    for src in container.get("envFrom", []):
        env.update(configmaps[src["configMapRef"]["name"]])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        else:
            env[e["name"]] = DOWNWARD[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def port_of(ports, ref):
    """The container port a probe or Service refers to (by name or number), or None."""
    for p in ports:
        if ref in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    return None


def check(overlay, bin_dir, errors):
    docs = render(overlay)
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    pods = []
    for workload, template in pod_templates(docs):
        name = f"{overlay.name}/{workload['kind']}/{workload['metadata']['name']}"
        labels = template["metadata"].get("labels", {})
        for c in template["spec"]["containers"]:
            ports = c.get("ports", [])
            pods.append((labels, ports))
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                p = c.get(probe)
                if not p:
                    continue
                ref = (p.get("grpc") or p.get("httpGet") or p.get("tcpSocket") or {}).get("port")
                if port_of(ports, ref) is None:
                    errors.append(f"{name}: {probe} port {ref!r} is not a container port")
            binary = (c.get("command") or [""])[0]
            if binary not in BINARIES:
                continue
            env = container_env(c, configmaps)
            run_env = {"PATH": os.environ.get("PATH", ""), **env}
            cmd = [str(bin_dir / binary), *c.get("args", []), "--check-config"]
            out = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
            if out.returncode != 0:
                errors.append(f"{name}: `{' '.join(cmd)}` refused its configuration:\n{out.stderr}")
                continue
            listen = re.search(r'\blisten: "[^"]*:(\d+)"', out.stdout)
            if listen and int(listen.group(1)) != port_of(ports, "grpc"):
                errors.append(f"{name}: listens on {listen.group(1)}, grpc container port is {port_of(ports, 'grpc')}")
            metrics = re.search(r"metrics_listen: Some\(\s*[\d.]+:(\d+)", out.stdout)
            if not metrics:
                errors.append(f"{name}: no --metrics-listen")
            elif int(metrics.group(1)) != port_of(ports, "metrics"):
                errors.append(f"{name}: metrics on {metrics.group(1)}, metrics container port is {port_of(ports, 'metrics')}")
    for d in docs:
        if d["kind"] != "Service":
            continue
        selector = d["spec"].get("selector", {})
        matching = [ports for labels, ports in pods if selector.items() <= labels.items()]
        if not matching:
            errors.append(f"{overlay.name}/Service/{d['metadata']['name']}: selects no pod")
        for sp in d["spec"]["ports"]:
            target = sp.get("targetPort", sp["port"])
            if any(port_of(ports, target) is None for ports in matching):
                errors.append(f"{overlay.name}/Service/{d['metadata']['name']}: targetPort {target!r} missing on its pods")
    print(f"{overlay.name}: {len(docs)} objects rendered and valid, {len(pods)} containers checked")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", type=Path, default=ROOT / "target" / "release")
    args = parser.parse_args()
    errors = []
    for overlay in sorted(p for p in OVERLAYS.iterdir() if p.is_dir()):
        check(overlay, args.bin_dir, errors)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
