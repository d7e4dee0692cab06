"""Deployment files: Kubernetes manifests and the compose file pass offline schema
validation; the pieces point at each other; the dashboard only uses exported metrics."""

import copy
import json
import re
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import openai
import pytest
import yaml

from rlvrx.server.api.drain import ENGINE_EXIT_S
from rlvrx.server.cli import DEFAULT_SHUTDOWN_TIMEOUT, our_parser
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37.0"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def merge_patch(base, patch):
    """Strategic-merge-style patch as kustomize applies it here: dicts merge, lists of
    named objects merge by name, other values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = merge_patch(base.get(key), value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in base + patch):
        out = copy.deepcopy(base)
        names = [x["name"] for x in out]
        for item in patch:
            if item["name"] in names:
                i = names.index(item["name"])
                out[i] = merge_patch(out[i], item)
            else:
                out.append(item)
        return out
    return patch


def kustomize(folder: Path) -> list[dict]:
    """Render a kustomization: resources, common labels, patches (the subset used here)."""
    kustomization = load_yaml(folder / "kustomization.yaml")
    resources = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        resources += kustomize(path) if path.is_dir() else [load_yaml(path)]
    for label_set in kustomization.get("labels", []):
        for resource in resources:
            resource.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
            if label_set.get("includeSelectors") and resource["kind"] == "Deployment":
                resource["spec"]["selector"]["matchLabels"].update(label_set["pairs"])
                resource["spec"]["template"]["metadata"]["labels"].update(label_set["pairs"])
            if label_set.get("includeSelectors") and resource["kind"] == "Service":
                resource["spec"]["selector"].update(label_set["pairs"])
    for patch in kustomization.get("patches", []):
        body = load_yaml(folder / patch["path"])
        resources = [merge_patch(r, body) if (r["kind"], r["metadata"]["name"]) ==
                     (body["kind"], body["metadata"]["name"]) else r for r in resources]
    return resources


@pytest.mark.parametrize("overlay", ["base", "overlays/tp2"])
def test_kubernetes_manifests_validate(overlay):
    resources = {r["kind"]: r for r in kustomize(DEPLOY / "k8s" / overlay)}
    assert set(resources) == {"Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler"}
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler"):
        kubernetes_validate.validate(resources[kind], K8S_VERSION, strict=True)

    deployment, service, monitor = resources["Deployment"], resources["Service"], resources["ServiceMonitor"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    # A draining server answers /health with 503: liveness must not kill it mid-drain.
    assert container["livenessProbe"]["tcpSocket"]["port"] == "http"
    drain = next((int(a.split("=")[1]) for a in container["args"] if a.startswith("--shutdown-timeout=")),
                 DEFAULT_SHUTDOWN_TIMEOUT)
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain + ENGINE_EXIT_S
    ours, vllm_args = our_parser().parse_known_args(["serve", *container["args"]])
    assert ours.rl == "/models/rl" and ours.base == "/models/base"
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    tp = [a for a in vllm_args if a.startswith("--tensor-parallel-size=")]
    assert int(gpus) == (int(tp[0].split("=")[1]) if tp else 1)
    assert (overlay == "overlays/tp2") == bool(tp)

    # The ServiceMonitor (a CRD: no schema offline) must find the Service and its port.
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert all(e["port"] in port_names and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


def test_compose_file_matches_the_compose_spec_and_wires_the_stack():
    import check_jsonschema.builtin_schemas as builtin

    schema = json.loads((Path(builtin.__file__).parent / "vendor" / "compose-spec.json").read_text())
    compose = load_yaml(DEPLOY / "docker-compose.yaml")
    jsonschema.validators.validator_for(schema)(schema).validate(compose)
    assert set(compose["services"]) == {"rlvrx", "prometheus", "grafana"}
    assert (DEPLOY / compose["services"]["rlvrx"]["build"]["context"] / "pyproject.toml").is_file()
    # `docker compose stop` waits this long before its SIGKILL (10 s unless set): past the drain.
    assert int(compose["services"]["rlvrx"]["stop_grace_period"].removesuffix("s")) > \
        DEFAULT_SHUTDOWN_TIMEOUT + ENGINE_EXIT_S

    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["rlvrx:8000"]

    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/dashboards.yaml")["providers"][0]
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.endswith(":" + provider["options"]["path"] + ":ro") for m in mounts)


METRIC = re.compile(r"\b((?:vllm|rlvrx):[a-zA-Z0-9_:]+)")


def test_dashboard_queries_only_use_exported_metrics(live_server):
    url, name, _ = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for model in (name, f"{name}:rl", f"{name}:base"):  # give every labelled metric a sample
        list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                            stream=True, extra_body={"ignore_eos": True}))
    client.completions.create(model=f"{name}:rl", prompt="hi", max_tokens=2)
    exported = {line.split("{")[0].split(" ")[0]
                for line in urllib.request.urlopen(url + "/metrics", timeout=30).read().decode().splitlines()
                if line and not line.startswith("#")}

    dashboard = json.loads((DEPLOY / "grafana/dashboards/rlvrx.json").read_text())
    datasource_uid = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]["uid"]
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource_uid
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(METRIC.findall(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        used |= set(METRIC.findall(variable["query"]["query"]))
    assert len(used) >= 10
    missing = sorted(used - exported)
    assert not missing, f"dashboard uses metrics the server does not export: {missing}"
