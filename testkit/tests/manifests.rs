//! The Kubernetes manifests (`deploy/kubernetes`, rendered by `kubectl
//! kustomize` as `kubectl apply -k` would apply them) agree with each
//! other and with what the agent's configuration expects: names and
//! labels, the ConfigMap the agent reads, the metrics port, the socket
//! directory the database pod shares, the host paths, the capabilities
//! (those of the systemd unit) and the image's binary.

use std::{collections::BTreeSet, path::Path, process::Command};

use nodedb_governor_agent::config::{Config, GroupSpec};
use serde::Deserialize;
use yaml_serde::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

fn documents(text: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// What `kubectl kustomize` renders; None without kubectl (it is
/// installed with the machine's packages; under CI its absence fails).
fn rendered() -> Option<Vec<Value>> {
    let out = match Command::new("kubectl")
        .args(["kustomize", &format!("{DEPLOY}/kubernetes")])
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            nodedb_governor_testkit::privileged::skip(
                "the manifest check",
                format!("no kubectl ({e})"),
            );
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(documents(&String::from_utf8(out.stdout).unwrap()))
}

fn str_of<'v>(v: &'v Value, path: &[&str]) -> &'v str {
    let mut at = v;
    for p in path {
        at = &at[*p];
    }
    at.as_str()
        .unwrap_or_else(|| panic!("no string at {path:?} in {v:?}"))
}

fn one<'d>(docs: &'d [Value], kind: &str) -> &'d Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

/// A hostPath volume mounted at the same path it names on the host.
fn host_path_mounted(pod_spec: &Value, container: &Value, path: &str) -> bool {
    let volumes = pod_spec["volumes"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|m| m["mountPath"].as_str() == Some(path))
        .any(|m| {
            volumes
                .iter()
                .any(|v| v["name"] == m["name"] && v["hostPath"]["path"].as_str() == Some(path))
        })
}

#[test]
fn the_manifests_agree_with_each_other_and_with_the_agents_configuration() {
    let Some(docs) = rendered() else {
        return;
    };
    let ds = one(&docs, "DaemonSet");
    let svc = one(&docs, "Service");
    let cm = one(&docs, "ConfigMap");
    let ns = str_of(one(&docs, "Namespace"), &["metadata", "name"]);
    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"].as_str(), Some(ns), "{d:?}");
        }
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/part-of"].as_str(),
            Some("nodedb")
        );
    }
    // The selectors pick the DaemonSet's pods.
    let pod = &ds["spec"]["template"];
    let pod_labels = pod["metadata"]["labels"].as_mapping().expect("pod labels");
    for selector in [
        &ds["spec"]["selector"]["matchLabels"],
        &svc["spec"]["selector"],
    ] {
        for (k, v) in selector.as_mapping().expect("a selector") {
            assert_eq!(pod_labels.get(k), Some(v), "selector {k:?}");
        }
    }
    let spec = &pod["spec"];
    assert_eq!(
        spec["hostPID"].as_bool(),
        Some(true),
        "the host's processes"
    );
    let containers = spec["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let agent = &containers[0];

    // The agent reads the generated ConfigMap where its arguments say.
    let config_volume = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["configMap"].is_mapping())
        .expect("a ConfigMap volume");
    assert_eq!(
        config_volume["configMap"]["name"].as_str(),
        cm["metadata"]["name"].as_str(),
        "the volume names the generated ConfigMap (its hash suffix included)"
    );
    let mount = agent["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == config_volume["name"])
        .expect("the config mounted");
    let (key, text) = cm["data"]
        .as_mapping()
        .unwrap()
        .iter()
        .next()
        .expect("one file");
    let config_path = format!(
        "{}/{}",
        str_of(mount, &["mountPath"]),
        key.as_str().unwrap()
    );
    let args: Vec<&str> = agent["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["run", "--config", config_path.as_str()]);
    let config = Config::parse(text.as_str().unwrap()).expect("the ConfigMap's configuration");

    // Metrics: the configured port, the container's, the probes', the
    // Service's and the scrape annotations'.
    let port = config.metrics_addr.expect("metrics on").port();
    let ports = agent["ports"].as_sequence().unwrap();
    let metrics = ports
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a metrics port");
    assert_eq!(metrics["containerPort"].as_u64(), Some(u64::from(port)));
    assert!(
        config.metrics_addr.unwrap().ip().is_unspecified(),
        "bound where the pod's port reaches it"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["port"].as_str(), Some("metrics"));
        assert_eq!(agent[probe]["httpGet"]["path"].as_str(), Some("/healthz"));
    }
    let svc_port = &svc["spec"]["ports"][0];
    assert_eq!(svc_port["port"].as_u64(), Some(u64::from(port)));
    assert_eq!(svc_port["targetPort"].as_str(), Some("metrics"));
    for annotated in [&pod["metadata"], &svc["metadata"]] {
        assert_eq!(
            annotated["annotations"]["prometheus.io/port"].as_str(),
            Some(port.to_string().as_str())
        );
    }

    // The host's paths the agent works in, mounted where they are.
    for path in [
        config.run_dir.to_str().unwrap(),
        "/sys/fs/cgroup",
        "/sys/fs/bpf",
        "/sys/kernel/tracing",
    ] {
        assert!(
            host_path_mounted(spec, agent, path),
            "{path} mounted from the host"
        );
    }

    // The capabilities: the systemd unit's, and nothing privileged.
    let unit =
        std::fs::read_to_string(format!("{DEPLOY}/systemd/nodedb-governor.service")).unwrap();
    let unit_caps: BTreeSet<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit's capabilities")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    let sc = &agent["securityContext"];
    let added: BTreeSet<String> = sc["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(added, unit_caps);
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert_eq!(sc["privileged"].as_bool(), Some(false));

    // The image runs the binary the command names.
    let dockerfile = std::fs::read_to_string(format!("{DEPLOY}/kubernetes/Dockerfile")).unwrap();
    let binary = str_of(&agent["command"][0], &[]);
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("COPY ") && l.ends_with(&format!(" {binary}"))),
        "the Dockerfile installs {binary}"
    );

    // The database's side: the same socket directory from the host, the
    // control socket's path, a uid the agent allows and the group the
    // socket is given to.
    let example =
        std::fs::read_to_string(format!("{DEPLOY}/kubernetes/database-pod.example.yaml")).unwrap();
    let db = &documents(&example)[0];
    let db_spec = &db["spec"];
    let db_container = &db_spec["containers"][0];
    let run_dir = config.run_dir.to_str().unwrap();
    assert!(host_path_mounted(db_spec, db_container, run_dir));
    let env = |name: &str| {
        let var = db_container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in the database's environment"));
        str_of(var, &["value"]).to_owned()
    };
    assert_eq!(
        Path::new(&env("NODEDB_GOVERNOR_SOCKET")),
        config
            .control_socket
            .clone()
            .unwrap_or(config.run_dir.join("control.sock"))
    );
    let uid = db_spec["securityContext"]["runAsUser"].as_u64().unwrap() as u32;
    assert!(config.allowed_uids.contains(&uid), "uid {uid} allowed");
    let Some(GroupSpec::Gid(gid)) = config.control_group else {
        panic!("control_group as a gid: {:?}", config.control_group);
    };
    let groups: Vec<u64> = db_spec["securityContext"]["supplementalGroups"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(
        groups.contains(&u64::from(gid)),
        "the pod is in group {gid}"
    );
    assert_eq!(env("NODEDB_GOVERNOR_DATABASE"), config.database);
}
