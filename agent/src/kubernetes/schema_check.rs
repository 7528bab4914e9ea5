//! Test-only: the bodies the agent sends to the API server checked against
//! the Kubernetes OpenAPI schema. The schema parts the agent's writes touch
//! are written out here by hand (property names, types, formats and
//! required fields only, no descriptions), from the upstream OpenAPI v3
//! documents in kubernetes/kubernetes `api/openapi-spec/v3/`:
//! `apis__coordination.k8s.io__v1_openapi.json` (Lease, LeaseSpec,
//! MicroTime), `apis__policy__v1_openapi.json` (Eviction, DeleteOptions)
//! and `api__v1_openapi.json` (Node, NodeSpec, NodeStatus, NodeCondition,
//! ObjectMeta, OwnerReference). An unknown property is an error, as the API
//! server's strict field validation makes it; a patch may leave out
//! required fields of objects and set any property to `null` (RFC 7386),
//! but list items (strategic-merge conditions) stay whole.

use serde_json::{json, Value};

/// The named schemas (`$ref` targets).
fn definitions() -> Value {
    let time = json!({"type": "string", "format": "date-time"});
    let string_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    json!({
        "ObjectMeta": {"type": "object", "properties": {
            "annotations": string_map,
            "creationTimestamp": time,
            "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
            "deletionTimestamp": time,
            "finalizers": {"type": "array", "items": {"type": "string"}},
            "generateName": {"type": "string"},
            "generation": {"type": "integer", "format": "int64"},
            "labels": string_map,
            "managedFields": {"type": "array", "items": {"type": "object", "additionalProperties": true}},
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "ownerReferences": {"type": "array", "items": {"$ref": "OwnerReference"}},
            "resourceVersion": {"type": "string"},
            "selfLink": {"type": "string"},
            "uid": {"type": "string"}
        }},
        "OwnerReference": {"type": "object", "required": ["apiVersion", "kind", "name", "uid"], "properties": {
            "apiVersion": {"type": "string"},
            "blockOwnerDeletion": {"type": "boolean"},
            "controller": {"type": "boolean"},
            "kind": {"type": "string"},
            "name": {"type": "string"},
            "uid": {"type": "string"}
        }},
        "Lease": {"type": "object", "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"$ref": "ObjectMeta"},
            "spec": {"$ref": "LeaseSpec"}
        }},
        "LeaseSpec": {"type": "object", "properties": {
            "acquireTime": {"type": "string", "format": "micro-time"},
            "holderIdentity": {"type": "string"},
            "leaseDurationSeconds": {"type": "integer", "format": "int32"},
            "leaseTransitions": {"type": "integer", "format": "int32"},
            "preferredHolder": {"type": "string"},
            "renewTime": {"type": "string", "format": "micro-time"},
            "strategy": {"type": "string"}
        }},
        "Eviction": {"type": "object", "properties": {
            "apiVersion": {"type": "string"},
            "deleteOptions": {"$ref": "DeleteOptions"},
            "kind": {"type": "string"},
            "metadata": {"$ref": "ObjectMeta"}
        }},
        "DeleteOptions": {"type": "object", "properties": {
            "apiVersion": {"type": "string"},
            "dryRun": {"type": "array", "items": {"type": "string"}},
            "gracePeriodSeconds": {"type": "integer", "format": "int64"},
            "ignoreStoreReadErrorWithClusterBreakingPotential": {"type": "boolean"},
            "kind": {"type": "string"},
            "orphanDependents": {"type": "boolean"},
            "preconditions": {"type": "object", "properties": {
                "resourceVersion": {"type": "string"},
                "uid": {"type": "string"}
            }},
            "propagationPolicy": {"type": "string"}
        }},
        "Node": {"type": "object", "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"$ref": "ObjectMeta"},
            "spec": {"$ref": "NodeSpec"},
            "status": {"$ref": "NodeStatus"}
        }},
        "NodeSpec": {"type": "object", "properties": {
            "externalID": {"type": "string"},
            "podCIDR": {"type": "string"},
            "podCIDRs": {"type": "array", "items": {"type": "string"}},
            "providerID": {"type": "string"},
            "taints": {"type": "array", "items": {"type": "object", "required": ["key", "effect"], "properties": {
                "effect": {"type": "string"},
                "key": {"type": "string"},
                "timeAdded": time,
                "value": {"type": "string"}
            }}},
            "unschedulable": {"type": "boolean"}
        }},
        // Only the part the agent writes; the rest of NodeStatus is the
        // kubelet's, and a body of ours naming it is an error.
        "NodeStatus": {"type": "object", "properties": {
            "conditions": {"type": "array", "items": {"$ref": "NodeCondition"}}
        }},
        "NodeCondition": {"type": "object", "required": ["type", "status"], "properties": {
            "lastHeartbeatTime": time,
            "lastTransitionTime": time,
            "message": {"type": "string"},
            "reason": {"type": "string"},
            "status": {"type": "string"},
            "type": {"type": "string"}
        }}
    })
}

/// Which schema a request body must follow, by method and path; `None`
/// for a write the fixture does not describe (a test failure).
pub fn schema_for(method: &str, path: &str) -> Option<(&'static str, bool)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("POST", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases"])
        | ("PUT", ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases", _]) => {
            Some(("Lease", false))
        }
        ("POST", ["api", "v1", "namespaces", _, "pods", _, "eviction"]) => {
            Some(("Eviction", false))
        }
        ("PATCH", ["api", "v1", "nodes", _]) | ("PATCH", ["api", "v1", "nodes", _, "status"]) => {
            Some(("Node", true))
        }
        _ => None,
    }
}

/// Checks `value` against the named schema; the error names the JSON path.
pub fn check(name: &str, value: &Value, patch: bool) -> Result<(), String> {
    let defs = definitions();
    check_node(&defs, &json!({"$ref": name}), value, "$", patch)
}

fn check_node(
    defs: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    patch: bool,
) -> Result<(), String> {
    if let Some(name) = schema.get("$ref").and_then(Value::as_str) {
        let target = defs
            .get(name)
            .ok_or_else(|| format!("{at}: no schema {name}"))?;
        return check_node(defs, target, value, at, patch);
    }
    if value.is_null() && patch {
        return Ok(());
    }
    let ty = schema["type"].as_str().unwrap_or("object");
    match (ty, value) {
        ("string", Value::String(s)) => match schema["format"].as_str() {
            Some("date-time") if !rfc3339(s, false) => {
                Err(format!("{at}: {s:?} is not an RFC 3339 date-time"))
            }
            Some("micro-time") if !rfc3339(s, true) => Err(format!(
                "{at}: {s:?} is not a MicroTime (RFC 3339 with 6 fractional digits)"
            )),
            _ => Ok(()),
        },
        ("integer", Value::Number(n)) => {
            let Some(i) = n.as_i64() else {
                return Err(format!("{at}: {n} is not an integer"));
            };
            if schema["format"] == "int32" && i32::try_from(i).is_err() {
                return Err(format!("{at}: {i} is out of int32 range"));
            }
            Ok(())
        }
        ("boolean", Value::Bool(_)) => Ok(()),
        ("array", Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                // List items are whole objects even in a patch.
                check_node(defs, &schema["items"], item, &format!("{at}[{i}]"), false)?;
            }
            Ok(())
        }
        ("object", Value::Object(map)) => {
            if !patch {
                for req in schema["required"].as_array().into_iter().flatten() {
                    let req = req.as_str().unwrap_or_default();
                    if !map.contains_key(req) {
                        return Err(format!("{at}: required property {req:?} is missing"));
                    }
                }
            }
            let extra = &schema["additionalProperties"];
            for (key, v) in map {
                let here = format!("{at}.{key}");
                match schema["properties"].get(key) {
                    Some(s) => check_node(defs, s, v, &here, patch)?,
                    None if extra == &Value::Bool(true) => {}
                    None if extra.is_object() => check_node(defs, extra, v, &here, patch)?,
                    None => return Err(format!("{here}: unknown property")),
                }
            }
            Ok(())
        }
        (ty, v) => Err(format!("{at}: expected {ty}, got {v}")),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; with `micro`, exactly six
/// fractional digits (metav1.MicroTime's wire form).
fn rfc3339(s: &str, micro: bool) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if !(b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19))
    {
        return false;
    }
    let mut rest = &s[19..];
    let mut frac = 0;
    if let Some(r) = rest.strip_prefix('.') {
        frac = r.bytes().take_while(u8::is_ascii_digit).count();
        if frac == 0 {
            return false;
        }
        rest = &r[frac..];
    }
    if micro && frac != 6 {
        return false;
    }
    rest == "Z"
        || (rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':'
            && digits(s.len() - 5..s.len() - 3)
            && digits(s.len() - 2..s.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_catches_what_the_api_server_would_refuse() {
        let ok = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l", "namespace": "ballast-system"},
            "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 900,
                     "renewTime": "2026-12-02T14:00:00.000000Z"}});
        check("Lease", &ok, false).unwrap();
        let table = [
            (
                json!({"spec": {"holderIdentity": 1}}),
                "$.spec.holderIdentity: expected string",
            ),
            (
                json!({"spec": {"leaseDurationSeconds": 3_000_000_000u64}}),
                "out of int32 range",
            ),
            (
                json!({"spec": {"renewTime": "2026-12-02T14:00:00Z"}}),
                "not a MicroTime",
            ),
            (
                json!({"spec": {"holder": "n1"}}),
                "$.spec.holder: unknown property",
            ),
            (
                json!({"metadata": {"labels": {"a": 1}}}),
                "$.metadata.labels.a: expected string",
            ),
        ];
        for (body, want) in table {
            let err = check("Lease", &body, false).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
        let err = check(
            "Node",
            &json!({"status": {"conditions": [{"type": "BallastHealthy"}]}}),
            true,
        )
        .unwrap_err();
        assert!(err.contains("required property \"status\""), "{err}");
        check(
            "Node",
            &json!({"metadata": {"annotations": {"ballast.dev/cordoned": null}}, "spec": {"unschedulable": false}}),
            true,
        )
        .unwrap();
        assert_eq!(schema_for("DELETE", "/api/v1/namespaces/a/pods/b"), None);
    }
}
