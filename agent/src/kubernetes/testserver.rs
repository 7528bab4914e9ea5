//! A Kubernetes API server for tests: real HTTP on 127.0.0.1, real JSON,
//! in-memory objects. It speaks the part of the API the agent uses: Nodes
//! (GET; PATCH of the object and of `/status`, merge and strategic merge
//! with conditions merged by `type`), Leases (GET, POST, PUT with
//! `resourceVersion` checks answering 409), Pods (list with
//! `fieldSelector`, GET, DELETE) and Evictions (a configurable number of
//! 429s per pod, then the pod goes). Errors are `Status` objects as the real
//! server sends them. Faults (500s) and a bearer token can be injected.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::client::{Auth, ClientConfig, KubeClient, RetryPolicy};

/// How a test pod looks to the drain code.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    /// Owned by a DaemonSet.
    pub daemonset: bool,
    /// A static pod's mirror (annotation `kubernetes.io/config.mirror`).
    pub mirror: bool,
    /// `status.phase`; `Running` when not set.
    pub phase: Option<&'static str>,
    /// No controller owns it (a bare pod).
    pub unmanaged: bool,
    /// It has an `emptyDir` volume named `scratch`.
    pub empty_dir: bool,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Value>,
    resource_version: u64,
    fail_next: u32,
    token: Option<String>,
    /// Pod path -> 429 answers still to give to evictions.
    evict_429: HashMap<String, u32>,
    /// Pod path -> pod lists it stays in (terminating) after deletion.
    linger: HashMap<String, u32>,
    /// Every request, as (method, path).
    requests: Vec<(String, String)>,
    deleted: Vec<String>,
    evicted: Vec<String>,
    /// Lease PUTs still to meet a concurrent write just before them.
    conflict_puts: u32,
    /// Evictions answer 403, as without the RBAC for pods/eviction.
    forbid_evictions: bool,
    /// A namespace that does not exist: creates in it answer 404.
    absent_namespace: Option<String>,
    /// The node a client certificate without a token speaks for.
    node_identity: Option<String>,
    /// Requests made as that node, as (method, path).
    node_requests: Vec<(String, String)>,
    /// Every JSON body sent, as (method, path, body).
    bodies: Vec<(String, String, Value)>,
}

#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Answer = (StatusCode, Value);

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_inner(None, None).await
    }

    /// A server that answers 401 unless `Authorization: Bearer <token>`.
    pub async fn start_with_token(token: &str) -> TestServer {
        Self::start_inner(Some(token.to_string()), None).await
    }

    /// The same server over HTTPS with [`tls::SERVER_PEM`] (for 127.0.0.1,
    /// signed by [`tls::CA_PEM`]); with `require_client_cert`, a client certificate
    /// signed by the test CA is required.
    pub async fn start_tls(require_client_cert: bool) -> TestServer {
        Self::start_inner(None, Some(tls::acceptor(require_client_cert))).await
    }

    /// HTTPS where a client certificate is optional, like an API server
    /// with the Node authorizer and NodeRestriction: a request with a
    /// certificate of the test CA and no token is `system:node:<node>`,
    /// allowed only to GET and PATCH its own Node and its status (403
    /// otherwise); every other request needs `Bearer <token>`.
    pub async fn start_with_node_authorizer(token: &str, node: &str) -> TestServer {
        let server =
            Self::start_inner(Some(token.to_string()), Some(tls::acceptor_optional_cert())).await;
        server.lock().node_identity = Some(node.to_owned());
        server
    }

    /// HTTPS for a client that reaches the server as `host` (an IP address
    /// or DNS name, e.g. a guest's guestfwd address): a fresh CA and a
    /// server certificate for `host` are made here, and every request
    /// needs `Bearer <token>`. Returns the server and the CA's PEM, for the
    /// client's trust. Listens on 127.0.0.1.
    pub async fn start_tls_for(host: &str, token: &str) -> (TestServer, String) {
        let (acceptor, ca_pem) = tls::acceptor_for(host);
        let server = Self::start_inner(Some(token.to_string()), Some(acceptor)).await;
        (server, ca_pem)
    }

    /// Every request, as (method, path without the query), in order.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.lock().requests.clone()
    }

    /// Every JSON body the clients sent, as (method, path, body).
    pub fn bodies(&self) -> Vec<(String, String, Value)> {
        self.lock().bodies.clone()
    }

    /// The requests made with the node's certificate, as (method, path).
    pub fn requests_as_node(&self) -> Vec<(String, String)> {
        self.lock().node_requests.clone()
    }

    async fn start_inner(
        token: Option<String>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State {
            token,
            ..State::default()
        }));
        let shared = state.clone();
        let tls_on = tls.is_some();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let service = hyper::service::service_fn(move |req| {
                                handle(req, state.clone(), false)
                            });
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            // A refused handshake just ends the connection.
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let cert = stream.get_ref().1.peer_certificates().is_some();
                                let service = hyper::service::service_fn(move |req| {
                                    handle(req, state.clone(), cert)
                                });
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        let scheme = if tls_on { "https" } else { "http" };
        TestServer {
            addr,
            scheme,
            state,
            task,
        }
    }

    /// Where the server listens (for a proxy in front of it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// A client with short retry pauses (tests should not sleep long).
    /// Unit tests only: [`Auth::None`] is not in the agent outside them.
    #[cfg(test)]
    pub fn client(&self) -> KubeClient {
        self.client_with(Auth::None)
    }

    pub fn client_with(&self, auth: Auth) -> KubeClient {
        let ca = (self.scheme == "https").then(|| tls::CA_PEM.as_bytes().to_vec());
        KubeClient::new(self.config(ca, auth)).expect("test client")
    }

    /// Client settings for this server with short retry pauses.
    pub fn config(&self, ca_pem: Option<Vec<u8>>, auth: Auth) -> ClientConfig {
        let mut config = ClientConfig::new(self.url(), ca_pem, auth);
        config.timeout = Duration::from_secs(5);
        config.retry = RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        };
        config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("test server state")
    }

    pub fn set_token(&self, token: &str) {
        self.lock().token = Some(token.to_string());
    }

    /// The next `n` requests get a 500.
    pub fn fail_next(&self, n: u32) {
        self.lock().fail_next = n;
    }

    /// How many requests had this method and path (query excluded).
    pub fn requests_matching(&self, method: &str, path: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|(m, p)| m == method && p == path)
            .count()
    }

    pub fn add_node(&self, name: &str) {
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "kubelet is posting ready status",
                 "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ]}
        });
        self.lock().create(format!("/api/v1/nodes/{name}"), node);
    }

    /// Mark a node unschedulable as an operator would (no ballast annotation).
    pub fn cordon_by_operator(&self, name: &str) {
        let mut st = self.lock();
        let path = format!("/api/v1/nodes/{name}");
        let mut node = st.objects.get(&path).cloned().expect("node exists");
        node["spec"]["unschedulable"] = json!(true);
        st.store(path, node);
    }

    pub fn node(&self, name: &str) -> Node {
        let st = self.lock();
        let v = st
            .objects
            .get(&format!("/api/v1/nodes/{name}"))
            .cloned()
            .expect("node exists");
        serde_json::from_value(v).expect("node decodes")
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Lease> {
        let st = self.lock();
        st.objects
            .get(&lease_path(namespace, name))
            .cloned()
            .map(|v| serde_json::from_value(v).expect("lease decodes"))
    }

    pub fn add_pod(&self, namespace: &str, name: &str, node: &str, spec: PodSpec) {
        let mut metadata = json!({"name": name, "namespace": namespace});
        if spec.daemonset {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds",
                "uid": "0000-ds", "controller": true
            }]);
        } else {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                "uid": "0000-rs", "controller": true
            }]);
        }
        if spec.unmanaged {
            metadata
                .as_object_mut()
                .expect("an object")
                .remove("ownerReferences");
        }
        if spec.mirror {
            metadata["annotations"] = json!({"kubernetes.io/config.mirror": "abc123"});
            metadata["ownerReferences"] = json!([{
                "apiVersion": "v1", "kind": "Node", "name": node, "uid": "0000-node",
                "controller": true
            }]);
        }
        let mut pod_spec =
            json!({"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]});
        if spec.empty_dir {
            pod_spec["volumes"] = json!([
                {"name": "config", "configMap": {"name": "cm"}},
                {"name": "scratch", "emptyDir": {}}
            ]);
        }
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": metadata,
            "spec": pod_spec,
            "status": {"phase": spec.phase.unwrap_or("Running")}
        });
        self.lock().create(pod_path(namespace, name), pod);
    }

    pub fn pod_exists(&self, namespace: &str, name: &str) -> bool {
        self.lock().objects.contains_key(&pod_path(namespace, name))
    }

    /// Evictions of this pod answer 429 (a disruption budget) `n` times.
    pub fn set_evict_429(&self, namespace: &str, name: &str, n: u32) {
        self.lock().evict_429.insert(pod_path(namespace, name), n);
    }

    /// Evictions are refused with 403 Forbidden (missing RBAC).
    /// Creates in `namespace` answer 404, as when it does not exist.
    pub fn without_namespace(&self, namespace: &str) {
        self.lock().absent_namespace = Some(namespace.to_owned());
    }

    pub fn forbid_evictions(&self) {
        self.lock().forbid_evictions = true;
    }

    /// The next `n` Lease PUTs find the Lease rewritten by someone else
    /// between the client's read and its write (so they get 409).
    pub fn conflict_next_puts(&self, n: u32) {
        self.lock().conflict_puts = n;
    }

    /// After deletion the pod stays listed (terminating) for `n` lists.
    pub fn set_linger(&self, namespace: &str, name: &str, n: u32) {
        self.lock().linger.insert(pod_path(namespace, name), n);
    }

    /// Pods removed by eviction, as `ns/name`.
    pub fn evicted(&self) -> Vec<String> {
        self.lock().evicted.clone()
    }

    /// Pods removed by DELETE, as `ns/name`.
    pub fn deleted(&self) -> Vec<String> {
        self.lock().deleted.clone()
    }
}

fn lease_path(namespace: &str, name: &str) -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")
}

fn pod_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{name}")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Answer {
    (
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": if code.is_success() { "Success" } else { "Failure" },
            "message": message, "reason": reason, "code": code.as_u16()
        }),
    )
}

impl State {
    fn next_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn create(&mut self, path: String, mut object: Value) {
        let rv = self.next_version();
        object["metadata"]["resourceVersion"] = json!(rv);
        object["metadata"]["uid"] = json!(format!("uid-{rv}"));
        object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        self.objects.insert(path, object);
    }

    fn store(&mut self, path: String, mut object: Value) -> Value {
        object["metadata"]["resourceVersion"] = json!(self.next_version());
        self.objects.insert(path, object.clone());
        object
    }

    /// 409 unless `body`'s resourceVersion (when `required` or present)
    /// matches the stored object's.
    fn check_version(
        &self,
        current: &Value,
        body: &Value,
        required: bool,
        what: &str,
    ) -> Result<(), Answer> {
        let sent = body["metadata"]["resourceVersion"].as_str();
        if sent.is_none() && !required {
            return Ok(());
        }
        if sent != current["metadata"]["resourceVersion"].as_str() {
            return Err(status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {what}: the object has been modified; \
                     please apply your changes to the latest version and try again"
                ),
            ));
        }
        Ok(())
    }

    fn remove_pod(&mut self, path: &str) {
        let linger = self.linger.remove(path).unwrap_or(0);
        if linger == 0 {
            self.objects.remove(path);
            return;
        }
        self.linger.insert(path.to_string(), linger);
        if let Some(pod) = self.objects.get_mut(path) {
            pod["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
    }

    fn route(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        body: &Value,
        strategic: bool,
    ) -> Answer {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segs.as_slice()) {
            ("GET", ["api", "v1", "nodes", _]) | ("GET", ["api", "v1", "nodes", _, "status"]) => {
                self.get(&format!("/api/v1/nodes/{}", segs[3]))
            }
            ("PATCH", ["api", "v1", "nodes", name]) => {
                self.patch_node(name, body, false, strategic)
            }
            ("PATCH", ["api", "v1", "nodes", name, "status"]) => {
                self.patch_node(name, body, true, strategic)
            }
            ("GET", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => {
                self.get(&lease_path(ns, name))
            }
            ("POST", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"]) => {
                if self.absent_namespace.as_deref() == Some(*ns) {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("namespaces \"{ns}\" not found"),
                    );
                }
                self.create_lease(ns, body)
            }
            ("PUT", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => {
                self.put_lease(ns, name, body)
            }
            ("GET", ["api", "v1", "pods"]) => self.list_pods(query),
            ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => self.get(&pod_path(ns, name)),
            ("DELETE", ["api", "v1", "namespaces", ns, "pods", name]) => {
                let p = pod_path(ns, name);
                match self.objects.get(&p).cloned() {
                    None => status(StatusCode::NOT_FOUND, "NotFound", "pods not found"),
                    Some(pod) => {
                        self.deleted.push(format!("{ns}/{name}"));
                        self.remove_pod(&p);
                        (StatusCode::OK, pod)
                    }
                }
            }
            ("POST", ["api", "v1", "namespaces", ns, "pods", name, "eviction"]) => {
                self.evict(ns, name, body)
            }
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("the server could not find the requested resource ({method} {path})"),
            ),
        }
    }

    fn get(&self, path: &str) -> Answer {
        match self.objects.get(path) {
            Some(v) => (StatusCode::OK, v.clone()),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{path} not found"),
            ),
        }
    }

    fn patch_node(
        &mut self,
        name: &str,
        patch: &Value,
        status_subresource: bool,
        strategic: bool,
    ) -> Answer {
        let path = format!("/api/v1/nodes/{name}");
        let Some(current) = self.objects.get(&path).cloned() else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("nodes \"{name}\" not found"),
            );
        };
        if let Err(a) = self.check_version(&current, patch, false, &format!("nodes \"{name}\"")) {
            return a;
        }
        // The status subresource changes only status, the object only the rest.
        let mut patch = patch.clone();
        if let Some(obj) = patch.as_object_mut() {
            if status_subresource {
                obj.retain(|k, _| k == "status" || k == "metadata");
                if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.retain(|k, _| k == "resourceVersion");
                }
            } else {
                obj.remove("status");
            }
        }
        let mut updated = current;
        apply_patch(&mut updated, &patch, strategic);
        let stored = self.store(path, updated);
        (StatusCode::OK, stored)
    }

    fn create_lease(&mut self, ns: &str, body: &Value) -> Answer {
        if body["kind"] != "Lease" || body["apiVersion"] != "coordination.k8s.io/v1" {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "not a Lease");
        }
        let Some(name) = body["metadata"]["name"].as_str() else {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "name required");
        };
        let path = lease_path(ns, name);
        if self.objects.contains_key(&path) {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("leases.coordination.k8s.io \"{name}\" already exists"),
            );
        }
        let mut lease = body.clone();
        lease["metadata"]["namespace"] = json!(ns);
        self.create(path.clone(), lease);
        (StatusCode::CREATED, self.objects[&path].clone())
    }

    fn put_lease(&mut self, ns: &str, name: &str, body: &Value) -> Answer {
        let path = lease_path(ns, name);
        let Some(current) = self.objects.get(&path).cloned() else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("leases.coordination.k8s.io \"{name}\" not found"),
            );
        };
        let current = if self.conflict_puts > 0 {
            self.conflict_puts -= 1;
            self.store(path.clone(), current)
        } else {
            current
        };
        if body["metadata"]["name"] != name {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            );
        }
        if let Err(a) = self.check_version(
            &current,
            body,
            true,
            &format!("leases.coordination.k8s.io \"{name}\""),
        ) {
            return a;
        }
        let mut lease = body.clone();
        lease["metadata"]["uid"] = current["metadata"]["uid"].clone();
        lease["metadata"]["namespace"] = json!(ns);
        let stored = self.store(path, lease);
        (StatusCode::OK, stored)
    }

    fn list_pods(&mut self, query: &str) -> Answer {
        let url = reqwest::Url::parse(&format!("http://x/?{query}")).expect("query parses");
        let selector = url
            .query_pairs()
            .find(|(k, _)| k == "fieldSelector")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let mut terms = Vec::new();
        for term in selector.split(',').filter(|t| !t.is_empty()) {
            let (field, negate, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, false, v)
            } else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid field selector {term:?}"),
                );
            };
            let pointer = match field {
                "spec.nodeName" => "/spec/nodeName",
                "status.phase" => "/status/phase",
                "metadata.namespace" => "/metadata/namespace",
                "metadata.name" => "/metadata/name",
                other => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("field label not supported: {other}"),
                    )
                }
            };
            terms.push((pointer, negate, value.to_string()));
        }
        let mut items = Vec::new();
        let mut gone = Vec::new();
        for (path, pod) in self.objects.iter() {
            if !path.starts_with("/api/v1/namespaces/") || !path.contains("/pods/") {
                continue;
            }
            let matches = terms.iter().all(|(ptr, negate, value)| {
                let actual = pod.pointer(ptr).and_then(Value::as_str).unwrap_or("");
                (actual == value) != *negate
            });
            if matches {
                items.push(pod.clone());
            }
            // A terminating pod goes away after its lingering lists.
            if pod["metadata"]["deletionTimestamp"].is_string() {
                gone.push(path.clone());
            }
        }
        for path in gone {
            let left = self.linger.get(&path).copied().unwrap_or(0);
            if left <= 1 {
                self.linger.remove(&path);
                self.objects.remove(&path);
            } else {
                self.linger.insert(path, left - 1);
            }
        }
        let rv = self.resource_version.to_string();
        (
            StatusCode::OK,
            json!({"kind": "PodList", "apiVersion": "v1",
                   "metadata": {"resourceVersion": rv}, "items": items}),
        )
    }

    fn evict(&mut self, ns: &str, name: &str, body: &Value) -> Answer {
        if body["kind"] != "Eviction" || body["apiVersion"] != "policy/v1" {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "not a policy/v1 Eviction",
            );
        }
        if body["metadata"]["name"] != name || body["metadata"]["namespace"] != ns {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "name in URL does not match name in Eviction object",
            );
        }
        if self.forbid_evictions {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!("pods \"{name}\" is forbidden: User \"system:node:n1\" cannot create resource \"pods/eviction\" in API group \"\" in the namespace \"{ns}\""),
            );
        }
        let path = pod_path(ns, name);
        if !self.objects.contains_key(&path) {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("pods \"{name}\" not found"),
            );
        }
        if let Some(n) = self.evict_429.get_mut(&path) {
            if *n > 0 {
                *n -= 1;
                return status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                );
            }
        }
        self.evicted.push(format!("{ns}/{name}"));
        self.remove_pod(&path);
        status(StatusCode::CREATED, "", "")
    }
}

/// Merge `patch` into `target`: RFC 7386 merge patch, and when `strategic`,
/// lists named `conditions` merge their elements by `type` as the API
/// server's strategic merge patch does for Node and Pod conditions.
fn apply_patch(target: &mut Value, patch: &Value, strategic: bool) {
    let Some(patch_obj) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Some(target_obj) = target.as_object_mut() else {
        return;
    };
    for (key, value) in patch_obj {
        if value.is_null() {
            target_obj.remove(key);
        } else if strategic && key == "conditions" && value.is_array() {
            let existing = target_obj.entry(key.clone()).or_insert_with(|| json!([]));
            if !existing.is_array() {
                *existing = json!([]);
            }
            let list = existing.as_array_mut().expect("checked array");
            for cond in value.as_array().expect("checked array") {
                match list.iter_mut().find(|c| c["type"] == cond["type"]) {
                    Some(old) => apply_patch(old, cond, strategic),
                    None => list.push(cond.clone()),
                }
            }
        } else if value.is_object() {
            let entry = target_obj.entry(key.clone()).or_insert(Value::Null);
            apply_patch(entry, value, strategic);
        } else {
            target_obj.insert(key.clone(), value.clone());
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    client_cert: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let ctype = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (code, body) = {
        let mut st = state.lock().expect("test server state");
        st.requests.push((method.clone(), path.clone()));
        answer(
            &mut st,
            &method,
            &path,
            &query,
            &ctype,
            Caller {
                auth: auth.as_deref(),
                client_cert,
            },
            &bytes,
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Who asks: the `Authorization` header and whether the TLS client sent a
/// certificate of the test CA.
struct Caller<'a> {
    auth: Option<&'a str>,
    client_cert: bool,
}

fn answer(
    st: &mut State,
    method: &str,
    path: &str,
    query: &str,
    ctype: &str,
    caller: Caller<'_>,
    bytes: &[u8],
) -> Answer {
    let Caller { auth, client_cert } = caller;
    let as_node = match (&st.node_identity, client_cert, auth) {
        (Some(node), true, None) => Some(node.clone()),
        _ => None,
    };
    if let Some(node) = &as_node {
        st.node_requests.push((method.to_owned(), path.to_owned()));
        let own = path == format!("/api/v1/nodes/{node}")
            || path == format!("/api/v1/nodes/{node}/status");
        if !(own && matches!(method, "GET" | "PATCH")) {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!("system:node:{node} may not {method} {path}"),
            );
        }
    } else if let Some(token) = &st.token {
        if auth != Some(format!("Bearer {token}").as_str()) {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
    }
    if st.fail_next > 0 {
        st.fail_next -= 1;
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "injected failure",
        );
    }
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("body is not JSON: {e}"),
                )
            }
        }
    };
    if !body.is_null() {
        st.bodies
            .push((method.to_owned(), path.to_owned(), body.clone()));
    }
    let mut strategic = false;
    match method {
        "PATCH" => match ctype {
            "application/merge-patch+json" => {}
            "application/strategic-merge-patch+json" => strategic = true,
            other => {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    &format!("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"),
                )
            }
        },
        "POST" | "PUT" if ctype != "application/json" => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                &format!("expected application/json, got {ctype:?}"),
            )
        }
        _ => {}
    }
    st.route(method, path, query, &body, strategic)
}

/// A throwaway test CA (EC P-256, valid 100 years, made with openssl for
/// these tests only), a server certificate for 127.0.0.1 and a node client
/// certificate (`system:node:n1`) it signed, and an unrelated CA.
pub mod tls {
    use std::sync::Arc;

    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    pub const CA_PEM: &str = "\
    -----BEGIN CERTIFICATE-----\n\
    MIIBmjCCAUGgAwIBAgIUG3Q3qV1bCV3zuwrMGNbE9aioGfcwCgYIKoZIzj0EAwIw\n\
    GjEYMBYGA1UEAwwPYmFsbGFzdC10ZXN0LWNhMCAXDTI2MTEyNjE0MTE0M1oYDzIx\n\
    MjYxMTAyMTQxMTQzWjAaMRgwFgYDVQQDDA9iYWxsYXN0LXRlc3QtY2EwWTATBgcq\n\
    hkjOPQIBBggqhkjOPQMBBwNCAAQSNr7X31KzDERoajaJYRDTuh34NzG1GTO6k8GG\n\
    KmaYwG0jppRjdsruEhE2xvHy5PkCBJO6Oqh1PbgltJWeqjD6o2MwYTAdBgNVHQ4E\n\
    FgQUDNdkxA8DHtjIdZ2RXTQaA/1tgTcwHwYDVR0jBBgwFoAUDNdkxA8DHtjIdZ2R\n\
    XTQaA/1tgTcwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwCgYIKoZI\n\
    zj0EAwIDRwAwRAIgZuQHMlMpOknIutAnCkX/fpoIEEx1Yzg9I1M9nLYF9YoCIEdP\n\
    P4fr7Jg68Ldvs8O6S5B2Ej+oc1x6vCZVz0zhP3bT\n\
    -----END CERTIFICATE-----\n\
    ";
    pub const SERVER_PEM: &str = "\
    -----BEGIN CERTIFICATE-----\n\
    MIIBuzCCAWKgAwIBAgIUSDbndqq1KcaOeKyRfc4PVY3mmH0wCgYIKoZIzj0EAwIw\n\
    GjEYMBYGA1UEAwwPYmFsbGFzdC10ZXN0LWNhMCAXDTI2MTEyNjE0MTE0M1oYDzIx\n\
    MjYxMTAyMTQxMTQzWjAZMRcwFQYDVQQDDA5rdWJlLWFwaXNlcnZlcjBZMBMGByqG\n\
    SM49AgEGCCqGSM49AwEHA0IABAJhB1HUVATQJxFXoIZew5NXYE6NpT/j4q7U1/DG\n\
    ip8bJkUWcTSKX1y4oy6VEkRgp33DXrIBLo1o91iS0so/4c2jgYQwgYEwCQYDVR0T\n\
    BAIwADAOBgNVHQ8BAf8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwEwDwYDVR0R\n\
    BAgwBocEfwAAATAdBgNVHQ4EFgQUzZ+h2G+NTP7eo1t376XH9m6Qu+owHwYDVR0j\n\
    BBgwFoAUDNdkxA8DHtjIdZ2RXTQaA/1tgTcwCgYIKoZIzj0EAwIDRwAwRAIgfjGz\n\
    SWP8+foeE0I0p1xgJ0s50HzsOEwQtCqFIcsoB/MCICgEOd4zHifg13Zp6sDc6D2v\n\
    9l6dRSnPbkpP/yjKU9V4\n\
    -----END CERTIFICATE-----\n\
    ";
    pub const SERVER_KEY: &str = "\
    -----BEGIN PRIVATE KEY-----\n\
    MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgrCmYSw5B89ZZs7eW\n\
    S61A5wrJd0GBNAtEBmn3YXNtRsGhRANCAAQCYQdR1FQE0CcRV6CGXsOTV2BOjaU/\n\
    4+Ku1NfwxoqfGyZFFnE0il9cuKMulRJEYKd9w16yAS6NaPdYktLKP+HN\n\
    -----END PRIVATE KEY-----\n\
    ";
    pub const CLIENT_PEM: &str = "\
    -----BEGIN CERTIFICATE-----\n\
    MIIBvzCCAWagAwIBAgIUSDbndqq1KcaOeKyRfc4PVY3mmH4wCgYIKoZIzj0EAwIw\n\
    GjEYMBYGA1UEAwwPYmFsbGFzdC10ZXN0LWNhMCAXDTI2MTEyNjE0MTE0M1oYDzIx\n\
    MjYxMTAyMTQxMTQzWjAwMRUwEwYDVQQKDAxzeXN0ZW06bm9kZXMxFzAVBgNVBAMM\n\
    DnN5c3RlbTpub2RlOm4xMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE57nowBBC\n\
    djSepOnacYKbQQaYrsq8uM8sVWjV1qFtZaT3D8zOph+ViEwHctIb3qQi18PfsFtz\n\
    OFixH5HM3lu4EqNyMHAwCQYDVR0TBAIwADAOBgNVHQ8BAf8EBAMCB4AwEwYDVR0l\n\
    BAwwCgYIKwYBBQUHAwIwHQYDVR0OBBYEFM92nWXxw99mOMB2rNUsboPUoPw5MB8G\n\
    A1UdIwQYMBaAFAzXZMQPAx7YyHWdkV00GgP9bYE3MAoGCCqGSM49BAMCA0cAMEQC\n\
    IAFdY/rT0PM/dCMmucBK6yuUnmT4hwwMoz1VQ+pRDfNWAiBMnxCitVEWqdYycPHj\n\
    dAqbH5I/wXCXAG/sqq8VJJEAxw==\n\
    -----END CERTIFICATE-----\n\
    ";
    pub const CLIENT_KEY: &str = "\
    -----BEGIN PRIVATE KEY-----\n\
    MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgQGMFXwT7U0/1zHbr\n\
    lFhOglGAJj2PkXj/p5bvHZwkhwShRANCAATnuejAEEJ2NJ6k6dpxgptBBpiuyry4\n\
    zyxVaNXWoW1lpPcPzM6mH5WITAdy0hvepCLXw9+wW3M4WLEfkczeW7gS\n\
    -----END PRIVATE KEY-----\n\
    ";
    pub const OTHER_PEM: &str = "\
    -----BEGIN CERTIFICATE-----\n\
    MIIBjDCCATOgAwIBAgIUJ3G2Knge7q2X3im95jPEx3r6WGEwCgYIKoZIzj0EAwIw\n\
    EzERMA8GA1UEAwwIb3RoZXItY2EwIBcNMjYxMTI2MTQxMTQzWhgPMjEyNjExMDIx\n\
    NDExNDNaMBMxETAPBgNVBAMMCG90aGVyLWNhMFkwEwYHKoZIzj0CAQYIKoZIzj0D\n\
    AQcDQgAEvfLdRukU8tPNga/d3yD52i+Sy/e7ESqPyW/QODdEkxE/d/ZtwoI4SDOk\n\
    oGCcWb8PWS5hF8LX3t/c5jYfzbq2AaNjMGEwHQYDVR0OBBYEFN2C2JCyRB7pfKvV\n\
    C5b8AJmB5ZLGMB8GA1UdIwQYMBaAFN2C2JCyRB7pfKvVC5b8AJmB5ZLGMA8GA1Ud\n\
    EwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMAoGCCqGSM49BAMCA0cAMEQCIFJ0\n\
    Ipthv2qJfCEb1q6CbihWJX5X7pOg4xNdd4uKrtrMAiBiO5G6tMSAttbDcI5SlzvX\n\
    lqoO0K4coaiACMKM1Q8f5A==\n\
    -----END CERTIFICATE-----\n\
    ";

    /// TLS with [`SERVER_PEM`]; a client certificate of [`CA_PEM`] is
    /// checked when one is sent, and not required.
    pub(super) fn acceptor_optional_cert() -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(SERVER_PEM.as_bytes())
                .collect::<Result<_, _>>()
                .expect("server cert");
        let key = PrivateKeyDer::from_pem_slice(SERVER_KEY.as_bytes()).expect("server key");
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(CA_PEM.as_bytes()) {
            roots.add(c.expect("ca cert")).expect("ca added");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// TLS with a certificate for `host` signed by a CA made here (no
    /// client certificates); also the CA's PEM.
    pub(super) fn acceptor_for(host: &str) -> (tokio_rustls::TlsAcceptor, String) {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ballast-test-cluster-ca");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let key = rcgen::KeyPair::generate().expect("server key");
        let mut params =
            rcgen::CertificateParams::new(vec![host.to_owned()]).expect("server params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server config");
        (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem())
    }

    pub(super) fn acceptor(require_client_cert: bool) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(SERVER_PEM.as_bytes())
                .collect::<Result<_, _>>()
                .expect("server cert");
        let key = PrivateKeyDer::from_pem_slice(SERVER_KEY.as_bytes()).expect("server key");
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(CA_PEM.as_bytes()) {
                roots.add(c.expect("ca cert")).expect("ca added");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key).expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategic_patch_merges_conditions_by_type_and_merge_patch_replaces() {
        let base = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "X", "status": "False"}
        ]}, "metadata": {"annotations": {"a": "1", "b": "2"}}});
        let patch = json!({"status": {"conditions": [{"type": "X", "status": "True"},
                                                      {"type": "Y", "status": "Unknown"}]},
                           "metadata": {"annotations": {"a": null, "c": "3"}}});
        let mut smp = base.clone();
        apply_patch(&mut smp, &patch, true);
        assert_eq!(smp["status"]["conditions"].as_array().unwrap().len(), 3);
        assert_eq!(smp["status"]["conditions"][1]["status"], "True");
        assert_eq!(smp["metadata"]["annotations"], json!({"b": "2", "c": "3"}));
        let mut mp = base;
        apply_patch(&mut mp, &patch, false);
        assert_eq!(mp["status"]["conditions"].as_array().unwrap().len(), 2);
        assert_eq!(mp["status"]["conditions"][0]["type"], "X");
    }

    #[tokio::test]
    async fn a_server_for_an_address_is_trusted_through_its_own_ca_only() {
        let (server, ca) = TestServer::start_tls_for("127.0.0.1", "tok").await;
        server.add_node("n1");
        let client = |ca: &str, token: &str| {
            KubeClient::new(
                server.config(Some(ca.as_bytes().to_vec()), Auth::Token(token.to_owned())),
            )
            .unwrap()
        };
        let node = client(&ca, "tok").get_node("n1").await.unwrap();
        assert_eq!(node.metadata.name.as_deref(), Some("n1"));
        assert_eq!(
            server.requests(),
            [("GET".to_owned(), "/api/v1/nodes/n1".to_owned())]
        );
        // Another CA is refused at the handshake; a wrong token gets 401.
        assert!(client(tls::CA_PEM, "tok").get_node("n1").await.is_err());
        assert!(client(&ca, "other").get_node("n1").await.is_err());
        assert_eq!(server.requests().len(), 2);
    }
}
