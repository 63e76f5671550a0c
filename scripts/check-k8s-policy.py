#!/usr/bin/env python3
"""Checks a rendered kustomize overlay (one multi-document YAML file) against
Tether's deployment rules, beyond what the Kubernetes schema says:

- every container and init container has CPU and memory requests and limits;
- every Deployment and StatefulSet is covered by a PodDisruptionBudget;
- the ingress Deployment has a HorizontalPodAutoscaler;
- pods run as non-root (pod or container securityContext.runAsNonRoot);
- a NetworkPolicy selects the NATS pods (app=nats or
  app.kubernetes.io/name=nats) and admits clients only from pods labelled
  tether.io/nats-client=true on the client port;
- every pod that sets TETHER_NATS_USER carries that label;
- every Secret a pod refers to is rendered, except tether-nats where the
  overlay says it is created out of band (no NATS workload rendered).

Usage: check-k8s-policy.py RENDERED.yaml  (exit 1 with the broken rules)
"""
import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()) and all(
        (labels.get(e["key"]) in e.get("values", [])) == (e["operator"] == "In")
        for e in selector.get("matchExpressions") or []
        if e["operator"] in ("In", "NotIn")
    )


def main(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    errors = []
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    pdbs = kinds.get("PodDisruptionBudget", [])
    secrets = {s["metadata"]["name"] for s in kinds.get("Secret", [])}
    nats_rendered = False
    for w in [d for k in WORKLOADS for d in kinds.get(k, [])]:
        name = f'{w["kind"]}/{w["metadata"]["name"]}'
        tpl = w["spec"]["template"]
        labels = tpl["metadata"].get("labels", {})
        spec = tpl["spec"]
        if labels.get("app") == "nats":
            nats_rendered = True
        if not any(matches(p["spec"]["selector"], labels) for p in pdbs):
            errors.append(f"{name}: no PodDisruptionBudget selects it")
        pod_nonroot = (spec.get("securityContext") or {}).get("runAsNonRoot")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            cname = f'{name} container {c["name"]}'
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(part) or {}):
                        errors.append(f"{cname}: no {r} {part[:-1]}")
            if not ((c.get("securityContext") or {}).get("runAsNonRoot", pod_nonroot)):
                errors.append(f"{cname}: not runAsNonRoot")
            for e in c.get("env") or []:
                if e["name"] == "TETHER_NATS_USER" and labels.get("tether.io/nats-client") != "true":
                    errors.append(f"{cname}: talks to NATS but lacks tether.io/nats-client=true")
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    w_secret = ref["name"]
                    if w_secret not in secrets and w_secret != "tether-nats":
                        errors.append(f"{cname}: Secret {w_secret} is not rendered")
    if not any(s == "tether-nats" or s.startswith("tether-nats-") for s in secrets) and nats_rendered:
        errors.append("the NATS server is rendered but the Secret tether-nats is not")
    hpas = kinds.get("HorizontalPodAutoscaler", [])
    if not any(h["spec"]["scaleTargetRef"]["name"] == "ingress" for h in hpas):
        errors.append("no HorizontalPodAutoscaler for the ingress")
    nats_labels = [{"app": "nats"}, {"app.kubernetes.io/name": "nats"}]
    nats_policies = [
        p for p in kinds.get("NetworkPolicy", [])
        if any(matches(p["spec"]["podSelector"], l) for l in nats_labels)
    ]
    if not nats_policies:
        errors.append("no NetworkPolicy restricts who talks to NATS")
    for p in nats_policies:
        for rule in p["spec"].get("ingress", []):
            ports = {x.get("port") for x in rule.get("ports", [])}
            if 4222 in ports:
                froms = rule.get("from") or []
                if not froms or not all(
                    (f.get("podSelector") or {}).get("matchLabels") == {"tether.io/nats-client": "true"}
                    for f in froms
                ):
                    errors.append(f'NetworkPolicy/{p["metadata"]["name"]}: NATS client port open beyond tether.io/nats-client pods')
    for e in errors:
        print(f"{path}: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
