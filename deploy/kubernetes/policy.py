"""What the schemas cannot say about the relay's pods in these manifests.

For every pod template that runs the relay image: the relay is a native sidecar where it
runs beside an app (init container, restartPolicy Always); it runs as the image's numeric
non-root user with a read-only root and no capabilities; the spool is a volume; probes
reach the admin port; the grace period is above the relay's stop (2 s for SMTP sessions
plus delivery.shutdown_timeout, 30 s unless the mounted config says otherwise).
Run by validate.sh with PyYAML from kubernetes-validate's environment.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

SPOOL = "/var/spool/relay"


def shutdown_timeout(docs: list[dict[str, Any]]) -> float:
    for doc in docs:
        if doc.get("kind") == "ConfigMap":
            for text in doc.get("data", {}).values():
                m = re.search(r'shutdown_timeout\s*=\s*"?(\d+)s?"?', text)
                if m:
                    return float(m.group(1))
    return 30.0


def check_pod(where: str, pod: dict[str, Any], timeout: float) -> list[str]:
    problems = []
    relays = [(c, True) for c in pod.get("initContainers", []) if c["image"].startswith("relay:")]
    relays += [(c, False) for c in pod.get("containers", []) if c["image"].startswith("relay:")]
    apps = [c for c in pod.get("containers", []) if not c["image"].startswith("relay:")]
    pod_sc = pod.get("securityContext", {})
    for c, is_init in relays:
        name = f"{where}: container {c['name']}"
        if apps and not (is_init and c.get("restartPolicy") == "Always"):
            problems.append(f"{name}: beside an app it must be an init container with "
                            "restartPolicy: Always (a native sidecar)")
        sc = {**pod_sc, **c.get("securityContext", {})}
        if not sc.get("runAsNonRoot") or sc.get("runAsUser") != 10001:
            problems.append(f"{name}: needs runAsNonRoot and runAsUser 10001")
        if not sc.get("readOnlyRootFilesystem"):
            problems.append(f"{name}: needs readOnlyRootFilesystem")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: needs capabilities drop [ALL]")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: needs allowPrivilegeEscalation: false")
        if not any(m["mountPath"] == SPOOL for m in c.get("volumeMounts", [])):
            problems.append(f"{name}: the spool {SPOOL} must be a volume")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            if ports.get(port, port) != 8025:
                problems.append(f"{name}: {probe} must reach the admin port 8025")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace <= timeout + 2:
            problems.append(f"{where}: terminationGracePeriodSeconds {grace} must be above "
                            f"{timeout + 2:g} (delivery.shutdown_timeout + 2 s)")
    return problems


def main(paths: list[str]) -> int:
    problems, pods = [], 0
    for path in paths:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        timeout = shutdown_timeout(docs)
        for doc in docs:
            pod = doc.get("spec", {}).get("template", {}).get("spec")
            if pod:
                pods += 1
                problems += check_pod(f"{Path(path).name} {doc['kind']}/{doc['metadata']['name']}",
                                      pod, timeout)
    for p in problems:
        print(f"ERROR {p}")
    if not problems:
        print(f"relay pod policy holds in {pods} pod templates")
    return 1 if problems or not pods else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
