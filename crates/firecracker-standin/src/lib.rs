//! Firecracker's API contract, checked against its own spec.
//!
//! [`ApiSpec`] loads Firecracker's Swagger 2.0 description
//! (`third_party/firecracker/firecracker-api.yaml`, release 1.16.1),
//! resolves which body definition a `METHOD /path` takes and validates a
//! JSON body against that definition's JSON schema (draft 4, which Swagger
//! 2.0 schemas are, checked by the `jsonschema` crate).
//!
//! It serves two users: TVM's contract tests (every request the Firecracker
//! backend sends is validated here) and the `firecracker-standin` binary, a
//! **stand-in** for Firecracker on hosts without KVM, which refuses what the
//! spec refuses before doing anything.

pub mod server;

use std::collections::BTreeMap;

use serde_json::Value;

/// Firecracker's API description (Swagger 2.0, YAML), release 1.16.1.
pub const SPEC_YAML: &str = include_str!("../../../third_party/firecracker/firecracker-api.yaml");

/// The Firecracker release the spec (and the stand-in's answers) follow.
pub const SPEC_VERSION: &str = "1.16.1";

/// Why the spec could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadSpecError {
    /// The YAML did not parse.
    #[error("the Firecracker API spec is not valid YAML")]
    Yaml(#[source] serde_norway::Error),
    /// A definition is not a valid JSON schema.
    #[error("definition {name} of the Firecracker API spec is not a valid schema: {message}")]
    Schema {
        /// The definition.
        name: String,
        /// The schema compiler's complaint.
        message: String,
    },
}

/// Why a request does not match the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// No such path, or not with this method.
    #[error("Invalid request method and/or path: {method} {path}.")]
    NoRoute {
        /// Method.
        method: String,
        /// Path.
        path: String,
    },
    /// The body is missing or not JSON.
    #[error("The body of {method} {path} is not a JSON object: {message}")]
    BadJson {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// Parser message.
        message: String,
    },
    /// The body violates the definition's schema.
    #[error("The body does not match {definition}: {errors}")]
    Schema {
        /// The definition.
        definition: String,
        /// Every violation, `; `-separated, each with its JSON pointer.
        errors: String,
    },
    /// No such definition in the spec.
    #[error("no definition {0} in the Firecracker API spec")]
    NoDefinition(String),
}

#[derive(Debug)]
struct Route {
    method: String,
    segments: Vec<String>,
    body: Option<String>,
}

impl Route {
    fn matches(&self, method: &str, path: &str) -> bool {
        // "/" splits into ["", ""]; trailing slashes are not significant.
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let joined = self.segments.join("/");
        let want: Vec<&str> = joined.trim_end_matches('/').split('/').collect();
        self.method.eq_ignore_ascii_case(method)
            && parts.len() == want.len()
            && parts.iter().zip(&want).all(|(p, w)| (w.starts_with('{') && !p.is_empty()) || p == w)
    }
}

/// Firecracker's API spec, compiled: routes and one validator per definition.
#[derive(Debug)]
pub struct ApiSpec {
    routes: Vec<Route>,
    validators: BTreeMap<String, jsonschema::Validator>,
}

impl ApiSpec {
    /// Parses [`SPEC_YAML`] and compiles a validator for every definition.
    ///
    /// # Errors
    /// [`LoadSpecError`] if the YAML or a schema is broken.
    pub fn load() -> Result<Self, LoadSpecError> {
        Self::from_yaml(SPEC_YAML)
    }

    /// As [`Self::load`], from any Swagger 2.0 YAML text.
    ///
    /// # Errors
    /// [`LoadSpecError`] if the YAML or a schema is broken.
    pub fn from_yaml(yaml: &str) -> Result<Self, LoadSpecError> {
        let doc: Value = serde_norway::from_str(yaml).map_err(LoadSpecError::Yaml)?;
        let definitions = doc.get("definitions").cloned().unwrap_or(Value::Object(Default::default()));
        let mut validators = BTreeMap::new();
        for name in definitions.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
            // Each definition as the root of a document that also holds all
            // definitions, so `#/definitions/X` references resolve.
            let schema = serde_json::json!({
                "definitions": definitions,
                "$ref": format!("#/definitions/{name}"),
            });
            let v = jsonschema::draft4::new(&schema)
                .map_err(|e| LoadSpecError::Schema { name: name.clone(), message: e.to_string() })?;
            validators.insert(name, v);
        }
        let mut routes = Vec::new();
        for (path, ops) in doc.get("paths").and_then(Value::as_object).into_iter().flatten() {
            for (method, op) in ops.as_object().into_iter().flatten() {
                let body = op
                    .get("parameters")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|p| p.get("in").and_then(Value::as_str) == Some("body"))
                    .and_then(|p| p.pointer("/schema/$ref"))
                    .and_then(Value::as_str)
                    .and_then(|r| r.strip_prefix("#/definitions/"))
                    .map(str::to_string);
                routes.push(Route {
                    method: method.to_ascii_uppercase(),
                    segments: path.split('/').map(str::to_string).collect(),
                    body,
                });
            }
        }
        Ok(Self { routes, validators })
    }

    /// The body definition `METHOD path` takes: `Ok(None)` for a route
    /// without a body (GET).
    ///
    /// # Errors
    /// [`ContractError::NoRoute`] for a path or method the API lacks.
    pub fn route(&self, method: &str, path: &str) -> Result<Option<&str>, ContractError> {
        self.routes
            .iter()
            .find(|r| r.matches(method, path))
            .map(|r| r.body.as_deref())
            .ok_or_else(|| ContractError::NoRoute { method: method.into(), path: path.into() })
    }

    /// Validates `body` against the schema of `definition`.
    ///
    /// # Errors
    /// [`ContractError::Schema`] listing every violation,
    /// [`ContractError::NoDefinition`] for an unknown definition.
    pub fn validate(&self, definition: &str, body: &Value) -> Result<(), ContractError> {
        let v = self.validators.get(definition).ok_or_else(|| ContractError::NoDefinition(definition.into()))?;
        let errors: Vec<String> = v.iter_errors(body).map(|e| format!("{} at '{}'", e, e.instance_path())).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ContractError::Schema { definition: definition.into(), errors: errors.join("; ") })
        }
    }

    /// Checks a whole request: the route exists and the body (raw bytes)
    /// is JSON matching the route's definition. Returns the parsed body.
    ///
    /// # Errors
    /// [`ContractError`]: no route, bad JSON, schema violations.
    pub fn check(&self, method: &str, path: &str, body: &[u8]) -> Result<Value, ContractError> {
        match self.route(method, path)? {
            None => Ok(Value::Null),
            Some(def) => {
                let value: Value = serde_json::from_slice(body).map_err(|e| ContractError::BadJson {
                    method: method.into(),
                    path: path.into(),
                    message: e.to_string(),
                })?;
                self.validate(def, &value)?;
                Ok(value)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routes_and_bodies_follow_the_spec() {
        let spec = ApiSpec::load().unwrap();
        assert_eq!(spec.route("PUT", "/boot-source").unwrap(), Some("BootSource"));
        assert_eq!(spec.route("put", "/drives/rootfs").unwrap(), Some("Drive"));
        assert_eq!(spec.route("PUT", "/actions").unwrap(), Some("InstanceActionInfo"));
        assert_eq!(spec.route("GET", "/").unwrap(), None);
        assert!(matches!(spec.route("PUT", "/drives/"), Err(ContractError::NoRoute { .. })));
        assert!(matches!(spec.route("DELETE", "/vsock"), Err(ContractError::NoRoute { .. })));
        assert!(matches!(spec.route("PUT", "/nonsense"), Err(ContractError::NoRoute { .. })));
    }

    #[test]
    fn schemas_accept_valid_and_refuse_invalid_bodies() {
        let spec = ApiSpec::load().unwrap();
        spec.validate("MachineConfiguration", &json!({"vcpu_count": 2, "mem_size_mib": 256})).unwrap();
        let e = spec.validate("MachineConfiguration", &json!({"vcpu_count": 0, "mem_size_mib": 256})).unwrap_err();
        assert!(e.to_string().contains("/vcpu_count"), "{e}");
        let e = spec.validate("Vsock", &json!({"guest_cid": 2})).unwrap_err().to_string();
        assert!(e.contains("uds_path") && e.contains("guest_cid"), "{e}");
        let e = spec.validate("InstanceActionInfo", &json!({"action_type": "Reboot"})).unwrap_err().to_string();
        assert!(e.contains("action_type"), "{e}");
        assert!(matches!(spec.validate("Nope", &json!({})), Err(ContractError::NoDefinition(_))));
        let e = spec.check("PUT", "/boot-source", b"{not json").unwrap_err();
        assert!(matches!(e, ContractError::BadJson { .. }), "{e}");
        assert_eq!(spec.check("GET", "/", b"").unwrap(), Value::Null);
    }
}
