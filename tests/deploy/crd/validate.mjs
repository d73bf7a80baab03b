// Validate custom resources against the KEDA and Prometheus Operator CRD schemas.
// Input: a JSON array of objects on stdin. Output: one line per object, "ok KIND NAME" or "error KIND NAME: why".
// Exit status 1 when any object is invalid or of a kind this script does not know.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": TriggerAuthentication,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
let failed = false;
for (const obj of JSON.parse(Buffer.concat(chunks).toString("utf8"))) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const name = obj.metadata?.name;
  const Model = MODELS[key];
  if (!Model) {
    console.log(`error ${key} ${name}: no schema for this kind`);
    failed = true;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`ok ${key} ${name}`);
  } catch (err) {
    console.log(`error ${key} ${name}: ${String(err.message ?? err).replace(/\s+/g, " ")}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
