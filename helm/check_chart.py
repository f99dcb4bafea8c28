#!/usr/bin/env python3
"""Render helm/switchyard with Helm's own engine and check what comes out.

Run by .ci/k8s-check (which installs the packages this needs); see helm/switchyard/README.md,
"How the chart is tested". For every scenario in helm/switchyard/ci/*-values.yaml it:

* renders the chart with the Helm SDK (helm-python-sdk binds Helm's Go packages: the same
  template engine, Sprig functions, `required`/`fail` and values merging as `helm template`),
* checks the properties the chart promises (probes, grace period, checksum, security context,
  SQLite/Postgres wiring, Services, PDB, HPA, ServiceMonitor),
* runs `switchyard check` on the config the ConfigMap carries, when a binary is given,
* validates every manifest with `kubernetes-validate --strict` against the oldest Kubernetes the
  chart supports (Chart.yaml kubeVersion) and the newest the validator knows. ServiceMonitor is
  a CRD the validator has no schema for: its shape is checked here instead.

It also runs `helm lint --strict` and renders values that must be refused, expecting the
chart's own error messages. Exit status 0 when every check passed.

Usage: check_chart.py [--switchyard BIN] [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import helm_python as helm
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "switchyard")
RELEASE = "switchyard"
NAMESPACE = "shop"
# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion), the first with the kubelet's
# preStop sleep action, and the newest schema set of the pinned kubernetes-validate.
KUBE_MIN = "1.25.0"
KUBE_SLEEP_ACTION = "1.30.0"
KUBE_LATEST = "1.37.0"
# Kinds without a schema in kubernetes-validate (CRDs): checked structurally below.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# image.repository has no default (there is no public image); renders outside the scenarios set it.
IMAGE = {"image": {"repository": "registry.example.test/switchyard"}}

passed = 0
failed = 0


def check(condition: bool, what: str, detail: object = "") -> bool:
    global passed, failed
    if condition:
        passed += 1
        print(f"ok   {what}")
    else:
        failed += 1
        print(f"FAIL {what}" + (f": {detail}" if detail != "" else ""))
    return condition


def with_image(values: dict) -> dict:
    if "image" in values:
        return values
    return {**IMAGE, **values}


def render(values: dict, name: str = RELEASE, image: bool = True) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(with_image(values) if image else values, name=name, namespace=NAMESPACE, is_install=True)


def documents(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path in sorted(rendered):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                docs.append(doc)
    return docs


def one(docs: list[dict], kind: str, name: str | None = None) -> dict | None:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return found[0] if len(found) == 1 else None


def load_values(path: str) -> dict:
    # Helm's own values parser, so the scenario means what `helm template -f` makes of it.
    with open(path, encoding="utf-8") as f:
        return helm.values_from_yaml(f.read()) or {}


def merged(values: dict) -> dict:
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(values)


# ---------------------------------------------------------------------------------------------
# Properties of one rendering.


def check_rendering(scenario: str, values: dict, docs: list[dict]) -> str | None:
    """Checks a rendering; returns the switchyard config text the ConfigMap carries."""
    v = merged(values)
    full = RELEASE  # the release name contains the chart name, so fullname is the release name
    admin_svc = f"{full}-admin"
    p = f"[{scenario}]"

    for d in docs:
        check(
            d.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/instance") == RELEASE,
            f"{p} {d['kind']}/{d['metadata']['name']} carries the chart's labels",
        )

    cm = one(docs, "ConfigMap", full)
    dep = one(docs, "Deployment", full)
    if not (check(cm is not None, f"{p} one ConfigMap") and check(dep is not None, f"{p} one Deployment")):
        return None
    config_text = cm["data"]["switchyard.yaml"]
    config = yaml.safe_load(config_text)
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    containers = spec["containers"]
    check(len(containers) == 1, f"{p} one container")
    c = containers[0]

    # The command line and the config path.
    check(
        c["args"][:3] == ["serve", "--config", "/etc/switchyard/switchyard.yaml"],
        f"{p} container runs `serve --config /etc/switchyard/switchyard.yaml`",
        c["args"],
    )
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    volumes = {vol["name"]: vol for vol in spec.get("volumes", [])}
    check(
        mounts.get("config", {}).get("mountPath") == "/etc/switchyard"
        and "subPath" not in mounts.get("config", {})
        and volumes.get("config", {}).get("configMap", {}).get("name") == full,
        f"{p} ConfigMap mounted as the directory /etc/switchyard (no subPath: updates reach it)",
    )

    # Ports and probes.
    ports = {pt["name"]: pt["containerPort"] for pt in c["ports"]}
    check(ports.get("http") == v["ports"]["http"], f"{p} container port http", ports)
    check(ports.get("admin") == v["ports"]["admin"], f"{p} container port admin", ports)
    check(
        config["listen"]["http"] == f"0.0.0.0:{v['ports']['http']}"
        and config["admin"]["listen"] == f"0.0.0.0:{v['ports']['admin']}",
        f"{p} config listens on the container ports",
        (config["listen"], config["admin"]),
    )
    live, ready = c.get("livenessProbe", {}), c.get("readinessProbe", {})
    check(
        live.get("httpGet") == {"path": "/healthz", "port": "admin"},
        f"{p} liveness probe: GET /healthz on the admin port",
        live,
    )
    check(
        ready.get("httpGet") == {"path": "/readyz", "port": "admin"},
        f"{p} readiness probe: GET /readyz on the admin port",
        ready,
    )

    # Shutdown timing: preStop, drain_delay, shutdown_timeout, grace period.
    drain, shutdown = int(v["drainDelaySeconds"]), int(v["shutdownTimeoutSeconds"])
    check(
        config["drain_delay"] == f"{drain}s" and config["shutdown_timeout"] == f"{shutdown}s",
        f"{p} config drain_delay/shutdown_timeout from the values",
        (config.get("drain_delay"), config.get("shutdown_timeout")),
    )
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    mode = v["preStop"]["mode"]
    wait = int(v["preStop"]["sleepSeconds"]) if mode != "none" else 0
    if mode == "exec":
        check(
            pre_stop.get("exec", {}).get("command") == ["sleep", str(wait)],
            f"{p} preStop runs `sleep {wait}`",
            pre_stop,
        )
    elif mode == "sleepAction":
        check(pre_stop.get("sleep") == {"seconds": wait}, f"{p} preStop sleep action", pre_stop)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    check(
        grace > wait + drain + shutdown,
        f"{p} terminationGracePeriodSeconds {grace} > preStop {wait} + drain_delay {drain} + shutdown_timeout {shutdown}",
    )

    # Rolling on config changes: `auto` rolls only when the state lives outside the pod.
    annotations = pod["metadata"].get("annotations", {})
    roll = str(v["rollOnConfigChange"]).lower()
    if roll == "true" or (roll == "auto" and v["state"]["type"] == "postgres"):
        check(
            re.fullmatch(r"[0-9a-f]{64}", str(annotations.get("checksum/config", ""))) is not None,
            f"{p} pod template carries checksum/config",
            annotations,
        )
    else:
        check("checksum/config" not in annotations, f"{p} no checksum/config (hot reload only)")

    # Security.
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and csc.get("runAsNonRoot") is True, f"{p} runAsNonRoot")
    check(
        isinstance(csc.get("runAsUser"), int) and csc["runAsUser"] > 0,
        f"{p} numeric non-root runAsUser",
        csc.get("runAsUser"),
    )
    check(csc.get("readOnlyRootFilesystem") is True, f"{p} readOnlyRootFilesystem")
    check(csc.get("allowPrivilegeEscalation") is False, f"{p} no privilege escalation")
    check(csc.get("capabilities", {}).get("drop") == ["ALL"], f"{p} drops ALL capabilities")
    check(
        psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        f"{p} seccomp RuntimeDefault",
    )
    check(spec.get("automountServiceAccountToken") is False, f"{p} no service account token")
    sa = one(docs, "ServiceAccount")
    if v["serviceAccount"]["create"]:
        check(
            sa is not None
            and sa["metadata"]["name"] == spec.get("serviceAccountName")
            and sa.get("automountServiceAccountToken") is False,
            f"{p} the pods run as the chart's ServiceAccount, which mounts no token",
            (sa, spec.get("serviceAccountName")),
        )
    else:
        want_sa = v["serviceAccount"]["name"] or v["serviceAccountName"] or "default"
        check(
            sa is None and spec.get("serviceAccountName") == want_sa,
            f"{p} the pods run as the existing ServiceAccount {want_sa}",
            spec.get("serviceAccountName"),
        )
    extra = [str(a) for a in v["extraArgs"]]
    check(
        not extra or c["args"][-len(extra):] == extra,
        f"{p} extraArgs end the serve command line",
        c["args"],
    )
    check_network_policy(p, v, docs, ports)
    check_sync_install(p, v, docs, config_text, dep)
    check(bool(c.get("resources", {}).get("requests")), f"{p} resource requests set")

    # Secrets and environment.
    env = {e["name"]: e for e in c.get("env", [])}
    if v["adminToken"]["enabled"]:
        ref = env.get("SWITCHYARD_ADMIN_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        want = v["adminToken"]["existingSecret"] or f"{full}-admin-token"
        check(ref.get("name") == want, f"{p} SWITCHYARD_ADMIN_TOKEN from Secret {want}", ref)
        secret = one(docs, "Secret", f"{full}-admin-token")
        if v["adminToken"]["existingSecret"]:
            check(secret is None, f"{p} no admin-token Secret made when existingSecret is set")
        else:
            check(
                secret is not None and secret.get("data", {}).get("token"),
                f"{p} admin-token Secret made by the chart",
            )
    for d in docs:
        if d["kind"] in ("ConfigMap", "Deployment"):
            text = yaml.safe_dump(d)
            for secret_value in (v["adminToken"]["value"], v["state"]["postgres"]["url"]):
                if secret_value:
                    check(secret_value not in text, f"{p} no secret value in the {d['kind']}")
    if v["adminTokensFile"]["existingSecret"]:
        check(
            config["admin"].get("tokens_file", "").startswith("/etc/switchyard-tokens/")
            and volumes.get("admin-tokens", {}).get("secret", {}).get("secretName")
            == v["adminTokensFile"]["existingSecret"],
            f"{p} tokens file mounted from its Secret",
        )

    # State store.
    if v["state"]["type"] == "sqlite":
        check(
            config["state"]["url"] == "sqlite:///var/lib/switchyard/state.db",
            f"{p} SQLite file on /var/lib/switchyard",
            config["state"],
        )
        check(mounts.get("state", {}).get("mountPath") == "/var/lib/switchyard", f"{p} state volume mounted")
        claim = v["state"]["sqlite"]["existingClaim"]
        if claim:
            check(
                volumes.get("state", {}).get("persistentVolumeClaim", {}).get("claimName") == claim,
                f"{p} SQLite on the PersistentVolumeClaim {claim}",
            )
        else:
            check("emptyDir" in volumes.get("state", {}), f"{p} SQLite on an emptyDir")
        replicas = dep["spec"].get("replicas")
        check(
            replicas == 1 or (replicas is None and v["autoscaling"]["maxReplicas"] <= 1),
            f"{p} SQLite runs one replica",
        )
    else:
        check(config["state"]["url"] == "${SWITCHYARD_STATE_URL}", f"{p} Postgres URL from the environment")
        ref = env.get("SWITCHYARD_STATE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
        want = v["state"]["postgres"]["existingSecret"] or f"{full}-state"
        check(ref.get("name") == want, f"{p} SWITCHYARD_STATE_URL from Secret {want}", ref)
        check("state" not in volumes, f"{p} no SQLite volume with Postgres")

    # Services: the proxy and the admin API apart; the admin one only inside the cluster.
    proxy, admin = one(docs, "Service", full), one(docs, "Service", admin_svc)
    if check(proxy is not None and admin is not None, f"{p} proxy and admin Services"):
        proxy_ports = {pt["name"]: pt for pt in proxy["spec"]["ports"]}
        check(
            proxy_ports.get("http", {}).get("targetPort") == "http" and "admin" not in proxy_ports,
            f"{p} proxy Service forwards http and not admin",
            proxy_ports,
        )
        check(proxy["spec"]["type"] == v["service"]["type"], f"{p} proxy Service type {v['service']['type']}")
        check(admin["spec"]["type"] == "ClusterIP", f"{p} admin Service is ClusterIP")
        check(
            [pt["targetPort"] for pt in admin["spec"]["ports"]] == ["admin"],
            f"{p} admin Service forwards only the admin port",
        )
        selector = dep["spec"]["selector"]["matchLabels"]
        for svc in (proxy, admin):
            check(
                svc["spec"]["selector"] == selector
                and all(pod["metadata"]["labels"].get(k) == val for k, val in selector.items()),
                f"{p} Service {svc['metadata']['name']} selects the pods",
            )
        if v["tls"]["enabled"]:
            check(
                proxy_ports.get("https", {}).get("targetPort") == "https"
                and ports.get("https") == v["ports"]["https"]
                and config["listen"]["https"]["cert"] == "/etc/switchyard-tls/tls.crt"
                and volumes.get("tls", {}).get("secret", {}).get("secretName") == v["tls"]["secretName"],
                f"{p} TLS listener, port and certificate Secret wired",
            )

    # PodDisruptionBudget, HPA, ServiceMonitor.
    pdb = one(docs, "PodDisruptionBudget")
    if v["podDisruptionBudget"]["enabled"]:
        check(
            pdb is not None and pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"],
            f"{p} PodDisruptionBudget selects the pods",
        )
    else:
        check(pdb is None, f"{p} no PodDisruptionBudget when disabled")
    hpa = one(docs, "HorizontalPodAutoscaler")
    if v["autoscaling"]["enabled"]:
        check(
            hpa is not None
            and hpa["apiVersion"] == "autoscaling/v2"
            and hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": full}
            and hpa["spec"]["maxReplicas"] == v["autoscaling"]["maxReplicas"],
            f"{p} HPA (autoscaling/v2) scales the Deployment",
        )
        check("replicas" not in dep["spec"], f"{p} Deployment leaves replicas to the HPA")
    else:
        check(hpa is None, f"{p} no HPA when autoscaling is off")
        check(dep["spec"].get("replicas") == v["replicaCount"], f"{p} replicas = replicaCount")
    sm = one(docs, "ServiceMonitor")
    if v["serviceMonitor"]["enabled"]:
        ok = sm is not None and admin is not None
        if ok:
            endpoints = sm["spec"]["endpoints"]
            admin_port_names = [pt["name"] for pt in admin["spec"]["ports"]]
            labels = admin["metadata"]["labels"]
            ok = (
                sm["apiVersion"] == "monitoring.coreos.com/v1"
                and set(sm["metadata"]) >= {"name", "namespace", "labels"}
                and set(sm["spec"]) <= {"namespaceSelector", "selector", "endpoints"}
                and sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
                and all(labels.get(k) == val for k, val in sm["spec"]["selector"]["matchLabels"].items())
                and proxy is not None
                and not all(
                    proxy["metadata"]["labels"].get(k) == val
                    for k, val in sm["spec"]["selector"]["matchLabels"].items()
                )
                and len(endpoints) == 1
                and endpoints[0]["port"] in admin_port_names
                and endpoints[0]["path"] == "/metrics"
                and set(endpoints[0]) <= {"port", "path", "interval", "scrapeTimeout"}
            )
        check(ok, f"{p} ServiceMonitor scrapes /metrics on the admin Service only", sm)
    else:
        check(sm is None, f"{p} no ServiceMonitor when disabled")
    check_observability(p, v, docs)
    return config_text


def check_network_policy(p: str, v: dict, docs: list[dict], ports: dict) -> None:
    np = one(docs, "NetworkPolicy")
    if not v["networkPolicy"]["enabled"]:
        check(np is None, f"{p} no NetworkPolicy when disabled")
        return
    if not check(np is not None, f"{p} one NetworkPolicy"):
        return
    rules = np["spec"]["ingress"]
    proxy_rule = [r for r in rules if {pt["port"] for pt in r["ports"]} & {"http", "https"}]
    admin_rule = [r for r in rules if {pt["port"] for pt in r["ports"]} == {"admin"}]
    check(
        len(proxy_rule) == 1
        and proxy_rule[0].get("from", []) == v["networkPolicy"]["proxyFrom"]
        and all(pt["port"] in ports for pt in proxy_rule[0]["ports"]),
        f"{p} NetworkPolicy opens the proxy ports to proxyFrom",
        rules,
    )
    check(
        all("admin" not in {pt["port"] for pt in r["ports"]} for r in proxy_rule)
        and (admin_rule[0]["from"] == v["networkPolicy"]["adminFrom"] if admin_rule else not v["networkPolicy"]["adminFrom"]),
        f"{p} NetworkPolicy opens the admin port only to adminFrom",
        rules,
    )
    check(
        ("Egress" in np["spec"]["policyTypes"]) == bool(v["networkPolicy"]["egress"]),
        f"{p} egress restricted only when networkPolicy.egress is given",
    )


def check_sync_install(p: str, v: dict, docs: list[dict], config_text: str, dep: dict) -> None:
    jobs = [d for d in docs if d["kind"] == "Job"]
    if not (v["syncInstall"]["enabled"] and v["config"].get("sync")):
        check(not jobs, f"{p} no sync install Job without sync pairs")
        return
    if not check(len(jobs) == 1, f"{p} one sync install Job"):
        return
    job = jobs[0]
    hooks = set(job["metadata"]["annotations"].get("helm.sh/hook", "").split(","))
    check(hooks == {"pre-install", "pre-upgrade"}, f"{p} sync install Job is a pre-install and pre-upgrade hook", hooks)
    jspec = job["spec"]["template"]["spec"]
    jc = jspec["containers"][0]
    check(
        jc["args"] == ["sync", "install", "--config", "/etc/switchyard/switchyard.yaml"]
        and jc["image"] == dep["spec"]["template"]["spec"]["containers"][0]["image"],
        f"{p} sync install Job runs `sync install` with the pods' image",
        jc["args"],
    )
    cm_name = jspec["volumes"][0]["configMap"]["name"]
    cm = one(docs, "ConfigMap", cm_name)
    check(
        cm is not None
        and cm["data"]["switchyard.yaml"].strip() == config_text.strip()
        and "pre-install" in cm["metadata"]["annotations"].get("helm.sh/hook", "")
        and int(cm["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))
        < int(job["metadata"]["annotations"].get("helm.sh/hook-weight", "0")),
        f"{p} sync install Job reads the pods' config from a hook ConfigMap made before it",
    )
    env_names = [e["name"] for e in jc.get("env", [])]
    check(
        all(e["name"] in env_names for e in v["extraEnv"]),
        f"{p} sync install Job gets extraEnv (for ${{VAR}} in sync URLs)",
        env_names,
    )
    selector = dep["spec"]["selector"]["matchLabels"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    check(
        not all(labels.get(k) == val for k, val in selector.items()),
        f"{p} the Job's pod is not selected by the Services or the PodDisruptionBudget",
        labels,
    )


def check_observability(p: str, v: dict, docs: list) -> None:
    """PrometheusRule and Grafana dashboard: present only when enabled, carrying the chart's
    files unchanged, and every PromQL expression in them accepted by `promtool check rules`."""
    rule = one(docs, "PrometheusRule")
    with open(os.path.join(CHART, "files", "alerts.yaml"), encoding="utf-8") as f:
        shipped = yaml.safe_load(f)
    if v["prometheusRule"]["enabled"]:
        check(
            rule is not None
            and rule["spec"] == {"groups": shipped["groups"]}
            and all(rule["metadata"]["labels"].get(k) == val for k, val in v["prometheusRule"]["labels"].items()),
            f"{p} PrometheusRule carries files/alerts.yaml",
        )
        if rule is not None:
            promtool_rules(p, "PrometheusRule", {"groups": rule["spec"]["groups"]})
    else:
        check(rule is None, f"{p} no PrometheusRule when disabled")
    dash = [d for d in docs if d["kind"] == "ConfigMap" and "switchyard.json" in d.get("data", {})]
    if v["grafanaDashboard"]["enabled"]:
        ok = len(dash) == 1 and dash[0]["metadata"]["labels"].get(v["grafanaDashboard"]["label"]) == v["grafanaDashboard"]["labelValue"]
        check(ok, f"{p} dashboard ConfigMap labelled for Grafana's sidecar")
        if ok:
            board = json.loads(dash[0]["data"]["switchyard.json"])
            exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
            exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
            check(len(exprs) >= 10, f"{p} dashboard has its queries")
            # Grafana's variables, as Grafana would substitute them.
            subst = {"$__rate_interval": "1m", "$route": ".*", "$job": ".*"}

            def concrete(e: str) -> str:
                for k, val in subst.items():
                    e = e.replace(k, val)
                return e

            rules = [{"record": f"dashboard:query_{i}", "expr": concrete(e)} for i, e in enumerate(exprs)]
            promtool_rules(p, "dashboard queries", {"groups": [{"name": "dashboard", "rules": rules}]})
    else:
        check(not dash, f"{p} no dashboard ConfigMap when disabled")


def promtool_rules(p: str, what: str, rules: dict) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        print(f"skip promtool on {what}: no promtool (Debian package `prometheus`)")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(rules, f)
    try:
        out = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    check(out.returncode == 0, f"{p} promtool check rules accepts the {what}", out.stdout + out.stderr)


# ---------------------------------------------------------------------------------------------
# `switchyard check` on the rendered config.


def switchyard_check(scenario: str, config_text: str, binary: str, work: str) -> None:
    """The config as the pod sees it: mounted files are made in a scratch directory."""
    d = os.path.join(work, "check-" + scenario)
    os.makedirs(d, exist_ok=True)
    replacements = {}
    if "/etc/switchyard-tls/" in config_text:
        tls = os.path.join(d, "tls")
        os.makedirs(tls)
        made = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=switchyard.test", "-addext", "subjectAltName=DNS:switchyard.test",
             "-keyout", os.path.join(tls, "tls.key"), "-out", os.path.join(tls, "tls.crt")],
            capture_output=True, text=True,
        ) if shutil.which("openssl") else None
        if made is None or made.returncode != 0:
            print(f"skip [{scenario}] switchyard check: openssl could not make a test certificate")
            return
        replacements["/etc/switchyard-tls/"] = tls + "/"
    if "/etc/switchyard-tokens/" in config_text:
        tokens = os.path.join(d, "tokens")
        os.makedirs(tokens)
        key = re.search(r"/etc/switchyard-tokens/(\S+)", config_text).group(1)
        with open(os.path.join(tokens, key), "w", encoding="utf-8") as f:
            f.write("ci: sha256:" + "0" * 64 + "\n")
        replacements["/etc/switchyard-tokens/"] = tokens + "/"
    for old, new in replacements.items():
        config_text = config_text.replace(old, new)
    path = os.path.join(d, "switchyard.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(config_text)
    env = dict(os.environ)
    env["SWITCHYARD_STATE_URL"] = "postgres://switchyard:secret@postgres.invalid:5432/switchyard"
    env["SWITCHYARD_ADMIN_TOKEN"] = "ci-token"
    # Other `${VAR}`s (sync URLs from extraEnv) name databases the pod reaches; any URL will do.
    for name in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", config_text)) - set(env):
        env[name] = "postgres://switchyard:secret@postgres.invalid:5432/" + name.lower()
    run = subprocess.run(
        [binary, "check", "--config", path], capture_output=True, text=True, env=env, timeout=60
    )
    check(
        run.returncode == 0,
        f"[{scenario}] `switchyard check` accepts the ConfigMap's config",
        (run.stdout + run.stderr).strip(),
    )


# ---------------------------------------------------------------------------------------------
# Values the chart must refuse, and the words that must say why.

REFUSED = [
    ({"replicaCount": 2}, "replicaCount is 2 but state.type is sqlite"),
    ({"autoscaling": {"enabled": True}}, "autoscaling.maxReplicas is 10 but state.type is sqlite"),
    ({"state": {"type": "postgres"}}, "set state.postgres.existingSecret"),
    ({"state": {"type": "mysql"}}, "at '/state/type': value must be one of 'sqlite', 'postgres'"),
    ({"replicaCont": 2}, "additional properties 'replicaCont' not allowed"),
    ({"service": {"typ": "LoadBalancer"}}, "at '/service': additional properties 'typ' not allowed"),
    ({"rollOnConfigChange": "sometimes"}, "rollOnConfigChange"),
    ({"config": {"listen": {"http": "0.0.0.0:80"}}}, "config.listen is set by the chart"),
    ({"config": {"drain_delay": "1s"}}, "config.drain_delay is set by the chart"),
    ({"adminToken": {"enabled": False}}, "needs a token"),
    ({"tls": {"enabled": True}}, "tls.enabled needs tls.secretName"),
    ({"preStop": {"mode": "httpGet"}}, "at '/preStop/mode': value must be one of"),
    (
        {"state": {"type": "postgres", "postgres": {"url": "postgres://x@db/x"}},
         "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
        "minReplicas must not exceed",
    ),
]


def check_refusals() -> None:
    try:
        render({}, image=False)
        check(False, "refuses a release without image.repository", "rendered without error")
    except helm.HelmError as e:
        check(
            "image.repository is required" in str(e) and "docker build" in str(e),
            "refuses a release without image.repository, naming the build command",
            str(e),
        )
    for values, words in REFUSED:
        try:
            render(values)
            check(False, f"refuses {values}", "rendered without error")
        except helm.HelmError as e:
            check(words in str(e), f"refuses {values}: {words!r}", str(e))


def check_accepted_edges() -> None:
    # Postgres with several replicas, from a URL value: the chart makes the Secret.
    docs = documents(render({"replicaCount": 3, "state": {"type": "postgres",
                                                         "postgres": {"url": "postgres://u:pw@db:5432/s"}}}))
    secret = one(docs, "Secret", f"{RELEASE}-state")
    check(secret is not None and "url" in secret.get("data", {}), "postgres.url becomes a Secret")
    dep = one(docs, "Deployment", RELEASE)
    check(dep is not None and dep["spec"]["replicas"] == 3, "3 replicas on Postgres render")
    # SQLite with an HPA that cannot go past one replica is allowed.
    docs = documents(render({"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 1}}))
    check(one(docs, "HorizontalPodAutoscaler") is not None, "SQLite with autoscaling.maxReplicas=1 renders")
    # A config change changes the checksum; the same values give the same checksum.
    def checksum(values: dict) -> str:
        dep = one(documents(render(values)), "Deployment", RELEASE)
        return dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    roll = {"rollOnConfigChange": True}
    base = checksum(roll)
    check(base == checksum(roll), "checksum/config is stable for the same values")
    changed = merged({})["config"]
    changed["routes"][0]["split"]["percentage"]["weight"] = 30
    check(base != checksum({**roll, "config": changed}), "checksum/config changes with the config")
    check(base != checksum({**roll, "drainDelaySeconds": 9}), "checksum/config changes with drainDelaySeconds")
    # The default (SQLite, rollOnConfigChange auto): `helm upgrade` with another config leaves the
    # pod template as it was, so the pod and its runtime weights, rollouts and audit log stay;
    # hot reload applies the new ConfigMap. With Postgres the pods roll.
    def pod_template(values: dict) -> dict:
        return one(documents(render(values)), "Deployment", RELEASE)["spec"]["template"]
    check(
        pod_template({}) == pod_template({"config": changed}),
        "default SQLite release: a config change does not replace the pod (state kept, hot reload)",
    )
    pg = {"state": {"type": "postgres", "postgres": {"url": "postgres://u:pw@db:5432/s"}}}
    check(
        pod_template(pg) != pod_template({**pg, "config": changed}),
        "Postgres release: a config change rolls the pods",
    )
    # Long release names stay within Kubernetes' 63-character limit.
    long = "a-very-long-release-name-that-goes-on-and-on-past-the-limit-x"
    docs = documents(render({}, name=long))
    names = [d["metadata"]["name"] for d in docs]
    check(
        all(len(n) <= 63 for n in names)
        and len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs),
        "names stay unique and within 63 characters for a long release name",
        names,
    )


# ---------------------------------------------------------------------------------------------


def kubernetes_validate(files: list[str], version: str) -> None:
    run = subprocess.run(
        ["kubernetes-validate", "--strict", "--quiet", "-k", version, *files],
        capture_output=True, text=True,
    )
    out = (run.stdout + run.stderr).strip()
    check(
        run.returncode == 0,
        f"kubernetes-validate --strict, Kubernetes {version}: {len(files)} file(s)",
        out,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--switchyard", help="switchyard binary for `switchyard check`")
    ap.add_argument("--out", help="also write each scenario's manifests to this directory")
    args = ap.parse_args()

    print(f"Helm SDK {helm.helm_sdk_version()} (helm-python-sdk, libhelm_c {helm.helm_c_version()})")
    work = tempfile.mkdtemp(prefix="switchyard-chart-")
    try:
        for kube in (KUBE_MIN, KUBE_LATEST):
            report = helm.lint(CHART, IMAGE, strict=True, kube_version="v" + kube, namespace=NAMESPACE)
            problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
            check(
                not problems and not report.get("errors"),
                f"helm lint --strict --kube-version v{kube}",
                problems or report.get("errors"),
            )

        validate: dict[str, list[str]] = {}
        for path in sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml"))):
            scenario = os.path.basename(path)[: -len("-values.yaml")]
            values = load_values(path)
            try:
                rendered = render(values)
            except helm.HelmError as e:
                check(False, f"[{scenario}] renders", e)
                continue
            check("switchyard/templates/NOTES.txt" in rendered, f"[{scenario}] NOTES.txt renders")
            docs = documents(rendered)
            config_text = check_rendering(scenario, values, docs)
            if config_text is not None and args.switchyard:
                switchyard_check(scenario, config_text, args.switchyard, work)

            plain = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
            text = "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in plain)
            target = os.path.join(work, scenario + ".yaml")
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, scenario + ".yaml"), "w", encoding="utf-8") as f:
                    f.write("".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs))
            oldest = KUBE_SLEEP_ACTION if values.get("preStop", {}).get("mode") == "sleepAction" else KUBE_MIN
            for kube in (oldest, KUBE_LATEST):
                validate.setdefault(kube, []).append(target)

        if not args.switchyard:
            print("skip switchyard check: no --switchyard binary given")
        for kube, files in sorted(validate.items()):
            kubernetes_validate(files, kube)

        check_refusals()
        check_accepted_edges()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"chart: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
