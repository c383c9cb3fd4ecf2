//! The resources the API serves: names, scope, subresources, and the k8s-openapi type behind
//! each kind (used to check bodies and to build the OpenAPI documents).

use schemars::SchemaGenerator;
use serde_json::Value;

/// A subresource the server implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    Status,
    Scale,
    Binding,
    Eviction,
    /// A container's output, fetched from its node.
    Log,
    /// Streams into a container; answered with a clear error until nodes serve them.
    Exec,
    Attach,
    PortForward,
    /// A ServiceAccount's token (TokenRequest).
    Token,
    /// A pod's ephemeral containers (`kubectl debug`): the only part of a running pod's
    /// spec that may grow.
    EphemeralContainers,
    /// HTTP to a pod's or a Service's port (`api::proxy`).
    Proxy,
    /// A CertificateSigningRequest's Approved or Denied condition (`kubectl certificate`).
    Approval,
}

impl Sub {
    pub fn name(self) -> &'static str {
        match self {
            Sub::Status => "status",
            Sub::Scale => "scale",
            Sub::Binding => "binding",
            Sub::Eviction => "eviction",
            Sub::Log => "log",
            Sub::Exec => "exec",
            Sub::Attach => "attach",
            Sub::PortForward => "portforward",
            Sub::Token => "token",
            Sub::EphemeralContainers => "ephemeralcontainers",
            Sub::Proxy => "proxy",
            Sub::Approval => "approval",
        }
    }

    /// (group, version, kind) of what the subresource answers with.
    pub fn response_kind(self, r: &Resource) -> (&'static str, &'static str, &'static str) {
        match self {
            Sub::Status => (r.group, r.version, r.kind),
            Sub::Scale => ("autoscaling", "v1", "Scale"),
            Sub::Binding => ("", "v1", "Binding"),
            Sub::Eviction => ("policy", "v1", "Eviction"),
            Sub::Log => ("", "v1", "Pod"),
            Sub::Exec | Sub::Attach => ("", "v1", "PodExecOptions"),
            Sub::PortForward => ("", "v1", "PodPortForwardOptions"),
            Sub::Token => ("authentication.k8s.io", "v1", "TokenRequest"),
            Sub::EphemeralContainers => ("", "v1", "Pod"),
            Sub::Proxy if r.kind == "Service" => ("", "v1", "ServiceProxyOptions"),
            Sub::Proxy => ("", "v1", "PodProxyOptions"),
            Sub::Approval => (r.group, r.version, r.kind),
        }
    }

    pub fn verbs(self) -> &'static [&'static str] {
        match self {
            Sub::Status | Sub::Scale | Sub::EphemeralContainers | Sub::Approval => {
                &["get", "patch", "update"]
            }
            Sub::Binding | Sub::Eviction | Sub::Token => &["create"],
            Sub::Log => &["get"],
            Sub::Exec | Sub::Attach | Sub::PortForward => &["create", "get"],
            Sub::Proxy => &["create", "delete", "get", "patch", "update"],
        }
    }
}

/// One resource type.
#[derive(Debug, PartialEq)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short: &'static [&'static str],
    pub namespaced: bool,
    pub categories: &'static [&'static str],
    pub subresources: &'static [Sub],
    /// False for review kinds: create answers, nothing is stored.
    pub stored: bool,
}

impl Resource {
    pub fn api_version(&self) -> String {
        group_version(self.group, self.version)
    }

    /// `deployments.apps`, as messages name the resource.
    pub fn qualified(&self) -> String {
        super::error::qualified(self.group, self.plural)
    }

    /// Read from the nodes when asked (`metrics.k8s.io`), never stored or written.
    pub fn live(&self) -> bool {
        self.group == super::metrics::GROUP
    }

    pub fn verbs(&self) -> &'static [&'static str] {
        if self.live() {
            &["get", "list"]
        } else if self.stored && (self.group, self.kind) == ("", "Namespace") {
            // Namespaces go one at a time, each emptied first: no deletecollection.
            &[
                "create", "delete", "get", "list", "patch", "update", "watch",
            ]
        } else if self.stored {
            &[
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        } else {
            &["create"]
        }
    }

    pub fn has(&self, s: Sub) -> bool {
        self.subresources.contains(&s)
    }

    /// The API path of object `name` (in `ns`, for a namespaced resource).
    pub fn path(&self, ns: Option<&str>, name: &str) -> String {
        let base = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        match ns {
            Some(ns) if self.namespaced => format!("{base}/namespaces/{ns}/{}/{name}", self.plural),
            _ => format!("{base}/{}/{name}", self.plural),
        }
    }

    /// Store key prefix of every object of this resource (in `ns` if given).
    pub fn prefix(&self, ns: Option<&str>) -> String {
        let g = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        match ns {
            Some(ns) if self.namespaced => format!("/registry/{g}/{}/{ns}/", self.plural),
            _ => format!("/registry/{g}/{}/", self.plural),
        }
    }

    pub fn key(&self, ns: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.prefix(ns))
    }
}

pub fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

macro_rules! resources {
    ($( $ty:path => { $group:literal, $version:literal, $kind:literal, $plural:literal, $singular:literal,
        short: [$($short:literal),*], namespaced: $ns:literal, categories: [$($cat:literal),*],
        subs: [$($sub:ident),*], stored: $stored:literal } ),* $(,)?) => {
        /// Every resource, in discovery order.
        pub static RESOURCES: &[Resource] = &[
            $( Resource { group: $group, version: $version, kind: $kind, plural: $plural,
                singular: $singular, short: &[$($short),*], namespaced: $ns,
                categories: &[$($cat),*], subresources: &[$(Sub::$sub),*], stored: $stored } ),*
        ];

        /// Decode `v` as the k8s-openapi type of `kind`: a wrong type anywhere is an error.
        /// With `only`, just those top-level fields of an object are decoded (the rest as
        /// if absent): a status write, whose spec is the stored one, checks only what it
        /// may change.
        pub fn check_types(group: &str, kind: &str, v: &Value, only: Option<&[&str]>) -> Result<(), String> {
            match (group, kind, only.zip(v.as_object())) {
                $( ($group, $kind, None) => <$ty as serde::Deserialize>::deserialize(v).map(|_| ()).map_err(|e| e.to_string()), )*
                $( ($group, $kind, Some((only, m))) => {
                    let fields = m
                        .iter()
                        .filter(|(k, _)| only.contains(&k.as_str()))
                        .map(|(k, v)| (k.as_str(), v));
                    let d = serde::de::value::MapDeserializer::<_, serde_json::Error>::new(fields);
                    <$ty as serde::Deserialize>::deserialize(d).map(|_| ()).map_err(|e| e.to_string())
                } )*
                _ => Ok(()),
            }
        }

        /// The JSON schema of `kind`'s type, its dependencies added to `generator`.
        pub fn schema(group: &str, kind: &str, generator: &mut SchemaGenerator) -> Option<schemars::Schema> {
            match (group, kind) {
                $( ($group, $kind) => Some(generator.subschema_for::<$ty>()), )*
                _ => None,
            }
        }

        /// The schema name (`io.k8s.api.apps.v1.Deployment`) of `kind`'s type.
        pub fn schema_name(group: &str, kind: &str) -> Option<String> {
            use schemars::JsonSchema;
            match (group, kind) {
                $( ($group, $kind) => Some(<$ty as JsonSchema>::schema_name().into_owned()), )*
                _ => None,
            }
        }
    };
}

use k8s_openapi::api::{
    admissionregistration::v1 as admreg, apps::v1 as apps, authentication::v1 as authn,
    authorization::v1 as authz, autoscaling::v2 as autoscaling, batch::v1 as batch,
    certificates::v1 as certs, coordination::v1 as coord, core::v1 as core, discovery::v1 as disc,
    events::v1 as events, flowcontrol::v1 as flow, networking::v1 as net, node::v1 as node,
    policy::v1 as policy, rbac::v1 as rbac, scheduling::v1 as sched, storage::v1 as storage,
};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1 as apireg;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiext;

use super::metrics;

resources! {
    core::Namespace => { "", "v1", "Namespace", "namespaces", "namespace", short: ["ns"], namespaced: false, categories: [], subs: [Status], stored: true },
    core::Node => { "", "v1", "Node", "nodes", "node", short: ["no"], namespaced: false, categories: [], subs: [Status], stored: true },
    core::Pod => { "", "v1", "Pod", "pods", "pod", short: ["po"], namespaced: true, categories: ["all"], subs: [Status, Binding, Eviction, Log, Exec, Attach, PortForward, EphemeralContainers, Proxy], stored: true },
    core::ReplicationController => { "", "v1", "ReplicationController", "replicationcontrollers", "replicationcontroller", short: ["rc"], namespaced: true, categories: ["all"], subs: [Status, Scale], stored: true },
    core::Service => { "", "v1", "Service", "services", "service", short: ["svc"], namespaced: true, categories: ["all"], subs: [Status, Proxy], stored: true },
    core::Endpoints => { "", "v1", "Endpoints", "endpoints", "endpoints", short: ["ep"], namespaced: true, categories: [], subs: [], stored: true },
    core::ConfigMap => { "", "v1", "ConfigMap", "configmaps", "configmap", short: ["cm"], namespaced: true, categories: [], subs: [], stored: true },
    core::Secret => { "", "v1", "Secret", "secrets", "secret", short: [], namespaced: true, categories: [], subs: [], stored: true },
    core::PersistentVolumeClaim => { "", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", "persistentvolumeclaim", short: ["pvc"], namespaced: true, categories: [], subs: [Status], stored: true },
    core::PersistentVolume => { "", "v1", "PersistentVolume", "persistentvolumes", "persistentvolume", short: ["pv"], namespaced: false, categories: [], subs: [Status], stored: true },
    core::PodTemplate => { "", "v1", "PodTemplate", "podtemplates", "podtemplate", short: [], namespaced: true, categories: [], subs: [], stored: true },
    core::ServiceAccount => { "", "v1", "ServiceAccount", "serviceaccounts", "serviceaccount", short: ["sa"], namespaced: true, categories: [], subs: [Token], stored: true },
    core::LimitRange => { "", "v1", "LimitRange", "limitranges", "limitrange", short: ["limits"], namespaced: true, categories: [], subs: [], stored: true },
    core::ResourceQuota => { "", "v1", "ResourceQuota", "resourcequotas", "resourcequota", short: ["quota"], namespaced: true, categories: [], subs: [Status], stored: true },
    core::Event => { "", "v1", "Event", "events", "event", short: ["ev"], namespaced: true, categories: [], subs: [], stored: true },
    events::Event => { "events.k8s.io", "v1", "Event", "events", "event", short: ["ev"], namespaced: true, categories: [], subs: [], stored: true },
    coord::Lease => { "coordination.k8s.io", "v1", "Lease", "leases", "lease", short: [], namespaced: true, categories: [], subs: [], stored: true },
    apps::Deployment => { "apps", "v1", "Deployment", "deployments", "deployment", short: ["deploy"], namespaced: true, categories: ["all"], subs: [Status, Scale], stored: true },
    apps::ReplicaSet => { "apps", "v1", "ReplicaSet", "replicasets", "replicaset", short: ["rs"], namespaced: true, categories: ["all"], subs: [Status, Scale], stored: true },
    apps::DaemonSet => { "apps", "v1", "DaemonSet", "daemonsets", "daemonset", short: ["ds"], namespaced: true, categories: ["all"], subs: [Status], stored: true },
    apps::StatefulSet => { "apps", "v1", "StatefulSet", "statefulsets", "statefulset", short: ["sts"], namespaced: true, categories: ["all"], subs: [Status, Scale], stored: true },
    apps::ControllerRevision => { "apps", "v1", "ControllerRevision", "controllerrevisions", "controllerrevision", short: [], namespaced: true, categories: [], subs: [], stored: true },
    batch::Job => { "batch", "v1", "Job", "jobs", "job", short: [], namespaced: true, categories: ["all"], subs: [Status], stored: true },
    batch::CronJob => { "batch", "v1", "CronJob", "cronjobs", "cronjob", short: ["cj"], namespaced: true, categories: ["all"], subs: [Status], stored: true },
    autoscaling::HorizontalPodAutoscaler => { "autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", "horizontalpodautoscaler", short: ["hpa"], namespaced: true, categories: ["all"], subs: [Status], stored: true },
    net::Ingress => { "networking.k8s.io", "v1", "Ingress", "ingresses", "ingress", short: ["ing"], namespaced: true, categories: [], subs: [Status], stored: true },
    net::IngressClass => { "networking.k8s.io", "v1", "IngressClass", "ingressclasses", "ingressclass", short: [], namespaced: false, categories: [], subs: [], stored: true },
    net::NetworkPolicy => { "networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", "networkpolicy", short: ["netpol"], namespaced: true, categories: [], subs: [], stored: true },
    apiext::CustomResourceDefinition => { "apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", "customresourcedefinition", short: ["crd", "crds"], namespaced: false, categories: ["api-extensions"], subs: [Status], stored: true },
    admreg::MutatingWebhookConfiguration => { "admissionregistration.k8s.io", "v1", "MutatingWebhookConfiguration", "mutatingwebhookconfigurations", "mutatingwebhookconfiguration", short: [], namespaced: false, categories: ["api-extensions"], subs: [], stored: true },
    admreg::ValidatingWebhookConfiguration => { "admissionregistration.k8s.io", "v1", "ValidatingWebhookConfiguration", "validatingwebhookconfigurations", "validatingwebhookconfiguration", short: [], namespaced: false, categories: ["api-extensions"], subs: [], stored: true },
    certs::CertificateSigningRequest => { "certificates.k8s.io", "v1", "CertificateSigningRequest", "certificatesigningrequests", "certificatesigningrequest", short: ["csr"], namespaced: false, categories: [], subs: [Status, Approval], stored: true },
    sched::PriorityClass => { "scheduling.k8s.io", "v1", "PriorityClass", "priorityclasses", "priorityclass", short: ["pc"], namespaced: false, categories: [], subs: [], stored: true },
    node::RuntimeClass => { "node.k8s.io", "v1", "RuntimeClass", "runtimeclasses", "runtimeclass", short: [], namespaced: false, categories: [], subs: [], stored: true },
    storage::StorageClass => { "storage.k8s.io", "v1", "StorageClass", "storageclasses", "storageclass", short: ["sc"], namespaced: false, categories: [], subs: [], stored: true },
    // Stored for the manifests that carry them (a CSI driver's, metrics-server's APIService,
    // a chart's flow control), not acted on: storage goes through local-path, metrics are
    // served by this API itself, and requests are not queued by priority.
    storage::CSIDriver => { "storage.k8s.io", "v1", "CSIDriver", "csidrivers", "csidriver", short: [], namespaced: false, categories: [], subs: [], stored: true },
    storage::CSINode => { "storage.k8s.io", "v1", "CSINode", "csinodes", "csinode", short: [], namespaced: false, categories: [], subs: [], stored: true },
    storage::VolumeAttachment => { "storage.k8s.io", "v1", "VolumeAttachment", "volumeattachments", "volumeattachment", short: [], namespaced: false, categories: [], subs: [Status], stored: true },
    storage::CSIStorageCapacity => { "storage.k8s.io", "v1", "CSIStorageCapacity", "csistoragecapacities", "csistoragecapacity", short: [], namespaced: true, categories: [], subs: [], stored: true },
    apireg::APIService => { "apiregistration.k8s.io", "v1", "APIService", "apiservices", "apiservice", short: [], namespaced: false, categories: ["api-extensions"], subs: [Status], stored: true },
    flow::FlowSchema => { "flowcontrol.apiserver.k8s.io", "v1", "FlowSchema", "flowschemas", "flowschema", short: [], namespaced: false, categories: [], subs: [Status], stored: true },
    flow::PriorityLevelConfiguration => { "flowcontrol.apiserver.k8s.io", "v1", "PriorityLevelConfiguration", "prioritylevelconfigurations", "prioritylevelconfiguration", short: [], namespaced: false, categories: [], subs: [Status], stored: true },
    disc::EndpointSlice => { "discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", "endpointslice", short: [], namespaced: true, categories: [], subs: [], stored: true },
    policy::PodDisruptionBudget => { "policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", "poddisruptionbudget", short: ["pdb"], namespaced: true, categories: [], subs: [Status], stored: true },
    rbac::Role => { "rbac.authorization.k8s.io", "v1", "Role", "roles", "role", short: [], namespaced: true, categories: [], subs: [], stored: true },
    rbac::ClusterRole => { "rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", "clusterrole", short: [], namespaced: false, categories: [], subs: [], stored: true },
    rbac::RoleBinding => { "rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", "rolebinding", short: [], namespaced: true, categories: [], subs: [], stored: true },
    rbac::ClusterRoleBinding => { "rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", "clusterrolebinding", short: [], namespaced: false, categories: [], subs: [], stored: true },
    authz::SelfSubjectAccessReview => { "authorization.k8s.io", "v1", "SelfSubjectAccessReview", "selfsubjectaccessreviews", "selfsubjectaccessreview", short: [], namespaced: false, categories: [], subs: [], stored: false },
    authz::SubjectAccessReview => { "authorization.k8s.io", "v1", "SubjectAccessReview", "subjectaccessreviews", "subjectaccessreview", short: [], namespaced: false, categories: [], subs: [], stored: false },
    authz::LocalSubjectAccessReview => { "authorization.k8s.io", "v1", "LocalSubjectAccessReview", "localsubjectaccessreviews", "localsubjectaccessreview", short: [], namespaced: true, categories: [], subs: [], stored: false },
    authn::TokenReview => { "authentication.k8s.io", "v1", "TokenReview", "tokenreviews", "tokenreview", short: [], namespaced: false, categories: [], subs: [], stored: false },
    authz::SelfSubjectRulesReview => { "authorization.k8s.io", "v1", "SelfSubjectRulesReview", "selfsubjectrulesreviews", "selfsubjectrulesreview", short: [], namespaced: false, categories: [], subs: [], stored: false },
    authn::SelfSubjectReview => { "authentication.k8s.io", "v1", "SelfSubjectReview", "selfsubjectreviews", "selfsubjectreview", short: [], namespaced: false, categories: [], subs: [], stored: false },
    metrics::NodeMetrics => { "metrics.k8s.io", "v1beta1", "NodeMetrics", "nodes", "", short: [], namespaced: false, categories: [], subs: [], stored: false },
    metrics::PodMetrics => { "metrics.k8s.io", "v1beta1", "PodMetrics", "pods", "", short: [], namespaced: true, categories: [], subs: [], stored: false },
}

/// The resource `plural` of `group/version`.
/// The resource `plural` of `group/version`: a built-in one, or a CRD's ([`super::crd`]).
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
        .or_else(|| super::crd::find(group, version, plural))
}

pub fn by_kind(group: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.kind == kind)
        .or_else(|| super::crd::by_kind(group, kind))
}

/// Whether `group` is one of the server's own (not a CRD's).
pub fn builtin(group: &str) -> bool {
    RESOURCES.iter().any(|r| r.group == group)
        || super::convert::VIEWS.iter().any(|v| v.group == group)
}

/// The API groups, each with its one version, in discovery order (core first).
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_status_check_reads_only_the_fields_named() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                         "spec": {"containers": "not a list"}, "status": {"phase": "Running"}});
        let status: &[&str] = &["apiVersion", "kind", "metadata", "status"];
        assert!(check_types("", "Pod", &pod, None).is_err());
        assert_eq!(check_types("", "Pod", &pod, Some(status)), Ok(()));
        let bad = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                         "status": {"phase": 3}});
        let e = check_types("", "Pod", &bad, Some(status)).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
    }
}
