// Validates rendered manifests (multi-document YAML files given as arguments), offline:
// - every object against its schema from kubernetes-models (Kubernetes, KEDA, Prometheus
//   Operator); kubernetes-validate --strict (run beside this by tests/k8s.rs) adds the
//   Kubernetes schemas' unknown-field check;
// - Metronome's own rules: the restricted Pod Security profile for every pod, resources set,
//   the processors' probes, preStop and API token (from a Secret), agents' records on the
//   broker's clock, a required key file mounted from a Secret so rotations reach the pods, and
//   no autoscaler allowed more replicas than the input topic has partitions.
// Prints one line per problem and exits 1 if there is any.

import { readFileSync } from "node:fs";
import yaml from "js-yaml";

const MODELS = {
  "v1/Namespace": "kubernetes-models/v1/Namespace",
  "v1/ConfigMap": "kubernetes-models/v1/ConfigMap",
  "v1/Secret": "kubernetes-models/v1/Secret",
  "v1/Service": "kubernetes-models/v1/Service",
  "v1/ServiceAccount": "kubernetes-models/v1/ServiceAccount",
  "apps/v1/StatefulSet": "kubernetes-models/apps/v1/StatefulSet",
  "batch/v1/CronJob": "kubernetes-models/batch/v1/CronJob",
  "policy/v1/PodDisruptionBudget": "kubernetes-models/policy/v1/PodDisruptionBudget",
  "networking.k8s.io/v1/NetworkPolicy": "kubernetes-models/networking.k8s.io/v1/NetworkPolicy",
  "autoscaling/v2/HorizontalPodAutoscaler": "kubernetes-models/autoscaling/v2/HorizontalPodAutoscaler",
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
  "monitoring.coreos.com/v1/ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
};

const problems = [];
const objects = [];
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (doc) objects.push({ file, doc });
  }
}
if (objects.length === 0) problems.push("no objects to validate");

const name = (d) => `${d.kind}/${d.metadata?.name ?? "?"}`;

for (const { file, doc } of objects) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const module = MODELS[key];
  if (!module) {
    problems.push(`${file}: ${name(doc)}: no schema known for ${key}`);
    continue;
  }
  const Model = Object.values(await import(module))[0];
  try {
    new Model(doc).validate();
  } catch (e) {
    problems.push(`${file}: ${name(doc)}: ${e.message.split("\n").join("; ")}`);
  }
}

// The restricted Pod Security profile and resource requests, for every pod template.
function podTemplate(doc) {
  if (doc.kind === "StatefulSet" || doc.kind === "Deployment") return doc.spec?.template;
  if (doc.kind === "CronJob") return doc.spec?.jobTemplate?.spec?.template;
  return undefined;
}
for (const { doc } of objects) {
  const template = podTemplate(doc);
  if (!template) continue;
  const pod = template.spec ?? {};
  const psc = pod.securityContext ?? {};
  const where = name(doc);
  if (psc.runAsNonRoot !== true) problems.push(`${where}: pod securityContext.runAsNonRoot is not true`);
  if (psc.seccompProfile?.type !== "RuntimeDefault") problems.push(`${where}: pod seccompProfile is not RuntimeDefault`);
  if (pod.hostNetwork || pod.hostPID || pod.hostIPC) problems.push(`${where}: uses host namespaces`);
  for (const v of pod.volumes ?? []) {
    if (v.hostPath) problems.push(`${where}: volume ${v.name} is a hostPath`);
  }
  for (const c of [...(pod.initContainers ?? []), ...(pod.containers ?? [])]) {
    const sc = c.securityContext ?? {};
    const at = `${where} container ${c.name}`;
    if (sc.allowPrivilegeEscalation !== false) problems.push(`${at}: allowPrivilegeEscalation is not false`);
    if (sc.privileged) problems.push(`${at}: privileged`);
    if (sc.readOnlyRootFilesystem !== true) problems.push(`${at}: root filesystem is writable`);
    const dropped = sc.capabilities?.drop ?? [];
    if (!dropped.includes("ALL")) problems.push(`${at}: capabilities do not drop ALL`);
    if ((sc.capabilities?.add ?? []).some((cap) => cap !== "NET_BIND_SERVICE")) problems.push(`${at}: adds capabilities`);
    if (!c.resources?.requests?.cpu || !c.resources?.requests?.memory) problems.push(`${at}: no cpu/memory requests`);
    if (!c.resources?.limits?.memory) problems.push(`${at}: no memory limit`);
  }
  if (doc.kind === "StatefulSet") {
    const c = pod.containers?.[0] ?? {};
    if (c.readinessProbe?.httpGet?.path !== "/readyz") problems.push(`${where}: readiness probe is not /readyz`);
    if (!c.lifecycle?.preStop) problems.push(`${where}: no preStop hook`);
    const token = (c.env ?? []).find((e) => e.name === "METRONOME_HTTP__BEARER_TOKEN");
    if (!token?.valueFrom?.secretKeyRef) problems.push(`${where}: the API's bearer token is not taken from a Secret`);
    if (!(doc.spec.volumeClaimTemplates ?? []).length) problems.push(`${where}: no volume claim for RocksDB`);
  }
}

// With signatures required, the processors' key file comes from a Secret mounted as a
// directory: a subPath mount is never updated, so a rotated key would not reach the pods.
const configText = objects.find(({ doc }) => doc.kind === "ConfigMap" && doc.data?.["config.toml"])?.doc.data["config.toml"] ?? "";
const setting = (key) => configText.match(new RegExp(`^\\s*${key}\\s*=\\s*(.+?)\\s*(#.*)?$`, "m"))?.[1];
if (setting("input_log_append_time") !== "true") problems.push("config.toml: stream.input_log_append_time is not true (agents' clocks would set event time)");
if (setting("require_signed") === "true") {
  const keysFile = JSON.parse(setting("device_keys_file") ?? '""');
  const statefulSet = objects.find(({ doc }) => doc.kind === "StatefulSet")?.doc;
  const pod = statefulSet?.spec?.template?.spec ?? {};
  const mount = (pod.containers?.[0]?.volumeMounts ?? []).find((m) => keysFile === m.mountPath || keysFile.startsWith(`${m.mountPath}/`));
  const volume = (pod.volumes ?? []).find((v) => v.name === mount?.name);
  if (!keysFile) problems.push("config.toml: require_signed without device_keys_file");
  else if (!mount || !volume?.secret) problems.push(`${keysFile}: not mounted from a Secret`);
  else if (mount.subPath) problems.push(`${keysFile}: mounted with subPath, so a rotation never reaches the pod`);
}

// Parallelism is bounded by partitions: no autoscaler may go past stream.topic_partitions.
const config = objects.find(({ doc }) => doc.kind === "ConfigMap" && doc.data?.["config.toml"]);
const partitions = Number(config?.doc.data["config.toml"].match(/^\s*topic_partitions\s*=\s*(\d+)/m)?.[1]);
for (const { doc } of objects) {
  const max = doc.kind === "ScaledObject" ? doc.spec?.maxReplicaCount : doc.kind === "HorizontalPodAutoscaler" ? doc.spec?.maxReplicas : undefined;
  if (max === undefined) continue;
  if (!Number.isInteger(partitions)) problems.push(`${name(doc)}: no stream.topic_partitions in the ConfigMap to cap it by`);
  else if (max > partitions) problems.push(`${name(doc)}: up to ${max} replicas for ${partitions} partitions`);
}

for (const p of problems) console.log(p);
console.log(`${objects.length} objects, ${problems.length} problems`);
process.exit(problems.length ? 1 : 0);
