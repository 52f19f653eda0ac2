//! Bearer tokens on every gRPC server: a JWT in `authorization: Bearer …`,
//! verified with a JWKS file (re-read when it changes), a PEM public key
//! (RS256, ES256) or an HS256 secret for development; then each service
//! needs its capability's scope. Health, reflection and `/metrics` stay open
//! unless asked otherwise, so probes and tools work without a token.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::Health;
use super::status::{ERROR_DOMAIN, clip_marked};
use super::wire_status::METRICS_PATH;
use crate::config::{AuthArgs, Unprotected};
use crate::tls::file_stamp;

/// The health service name that says whether the token keys are current:
/// NOT_SERVING while the JWKS file does not load (the last good keys stay).
pub const AUTH_HEALTH: &str = "scaleout.Auth";
/// Longest `authorization` value looked at; a longer one is refused unread.
const MAX_TOKEN_BYTES: usize = 8 << 10;
/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;
/// Tokens remembered as verified; the memory is cleared when it is full.
const CACHED_TOKENS: usize = 4096;
/// How often the JWKS file is checked for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// What a service lets a caller do; a token needs the capability's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    Commands,
    Queries,
    /// The event log's read API.
    Read,
    /// Dead letters, contention, read-model rebuilds and verification.
    Admin,
}

impl Capability {
    /// The scope a token must carry (in `scope`, space-separated, or `scp`).
    pub fn scope(self) -> &'static str {
        match self {
            Self::Commands => "scaleout.commands",
            Self::Queries => "scaleout.queries",
            Self::Read => "scaleout.read",
            Self::Admin => "scaleout.admin",
        }
    }
}

/// Who called, as its verified token says: in the request's extensions
/// for the services (see `command_request::origin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub`.
    pub subject: String,
}

/// Why authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Where the verification keys come from.
#[derive(Debug, Clone)]
enum KeySource {
    Jwks(PathBuf),
    PublicKey(PathBuf),
    Secret(PathBuf),
}

impl KeySource {
    fn path(&self) -> &Path {
        match self {
            Self::Jwks(path) | Self::PublicKey(path) | Self::Secret(path) => path,
        }
    }

    fn load(&self) -> Result<Vec<Key>, AuthError> {
        let path = self.path();
        let bytes = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message: String| AuthError::Invalid {
            path: path.to_owned(),
            message,
        };
        match self {
            Self::Secret(_) => {
                let secret = bytes.trim_ascii();
                if secret.len() < 32 {
                    return Err(invalid("an HS256 secret needs at least 32 bytes".into()));
                }
                Ok(vec![Key {
                    id: None,
                    algorithm: Algorithm::HS256,
                    key: DecodingKey::from_secret(secret),
                }])
            }
            Self::PublicKey(_) => {
                let (algorithm, key) = match DecodingKey::from_rsa_pem(&bytes) {
                    Ok(key) => (Algorithm::RS256, key),
                    Err(_) => DecodingKey::from_ec_pem(&bytes)
                        .map(|key| (Algorithm::ES256, key))
                        .map_err(|e| invalid(format!("not an RSA or P-256 public key: {e}")))?,
                };
                Ok(vec![Key {
                    id: None,
                    algorithm,
                    key,
                }])
            }
            Self::Jwks(_) => {
                let set: JwkSet = serde_json::from_slice(&bytes)
                    .map_err(|e| invalid(format!("not a JWKS: {e}")))?;
                let keys: Vec<Key> = set
                    .keys
                    .iter()
                    .filter_map(|jwk| {
                        let algorithm = match &jwk.algorithm {
                            AlgorithmParameters::RSA(_) => Algorithm::RS256,
                            AlgorithmParameters::EllipticCurve(ec)
                                if ec.curve == EllipticCurve::P256 =>
                            {
                                Algorithm::ES256
                            }
                            // Other curves and symmetric keys are not taken.
                            _ => return None,
                        };
                        let key = DecodingKey::from_jwk(jwk).ok()?;
                        Some(Key {
                            id: jwk.common.key_id.clone(),
                            algorithm,
                            key,
                        })
                    })
                    .collect();
                if keys.is_empty() {
                    return Err(invalid("holds no RS256 or ES256 key".into()));
                }
                Ok(keys)
            }
        }
    }
}

/// One verification key.
#[derive(Clone)]
struct Key {
    id: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The claims read beyond those `jsonwebtoken` validates.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Seconds since the epoch (a NumericDate may have a fraction).
    exp: f64,
    #[serde(default)]
    nbf: Option<f64>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Scopes>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scopes {
    Many(Vec<String>),
    One(String),
}

impl Claims {
    /// Whether the token is within its lifetime now, as `jsonwebtoken`
    /// judges it (with the same leeway).
    fn current(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        let leeway = LEEWAY_SECONDS as f64;
        self.exp >= now - leeway && self.nbf.is_none_or(|nbf| nbf <= now + leeway)
    }

    fn has_scope(&self, wanted: &str) -> bool {
        let spaced = |s: &String| s.split_ascii_whitespace().any(|scope| scope == wanted);
        self.scope.as_ref().is_some_and(spaced)
            || match &self.scp {
                Some(Scopes::Many(scopes)) => scopes.iter().any(|scope| scope == wanted),
                Some(Scopes::One(scopes)) => spaced(scopes),
                None => false,
            }
    }
}

/// Why a call was refused: its status, with the reason in `ErrorInfo`.
#[derive(Debug)]
struct Refusal {
    code: Code,
    reason: &'static str,
    message: String,
    metadata: HashMap<String, String>,
}

impl Refusal {
    fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Code::Unauthenticated,
            reason,
            message: message.into(),
            metadata: HashMap::new(),
        }
    }

    fn into_status(self) -> Status {
        Status::with_error_details(
            self.code,
            self.message,
            ErrorDetails::with_error_info(self.reason, ERROR_DOMAIN, self.metadata),
        )
    }
}

/// Verifies tokens with the current keys.
pub struct Authenticator {
    source: KeySource,
    audience: String,
    issuer: Option<String>,
    keys: RwLock<Arc<Vec<Key>>>,
    /// Tokens already verified with the current keys: a client sends the
    /// same token with every call, and checking a signature costs more than
    /// the rest of a small command. Each use still checks its lifetime.
    verified: std::sync::Mutex<HashMap<String, (Caller, Arc<Claims>)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("source", &self.source)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// The authenticator `args` configure; `None` when they configure none
    /// (every call is let through). Keys that do not load stop the start.
    pub fn from_args(args: &AuthArgs) -> Result<Option<Self>, AuthError> {
        let source = match (
            &args.auth_jwks,
            &args.auth_public_key,
            &args.auth_hs256_secret_file,
        ) {
            (Some(path), _, _) => KeySource::Jwks(path.clone()),
            (_, Some(path), _) => KeySource::PublicKey(path.clone()),
            (_, _, Some(path)) => KeySource::Secret(path.clone()),
            _ => return Ok(None),
        };
        let keys = source.load()?;
        Ok(Some(Self {
            audience: args.auth_audience.clone().unwrap_or_default(),
            issuer: args.auth_issuer.clone(),
            source,
            keys: RwLock::new(Arc::new(keys)),
            verified: std::sync::Mutex::default(),
        }))
    }

    /// The caller a request's `authorization` value proves, and its claims.
    fn verify(&self, authorization: Option<&[u8]>) -> Result<(Caller, Arc<Claims>), Refusal> {
        let Some(value) = authorization else {
            return Err(Refusal::unauthenticated(
                "TOKEN_MISSING",
                "this server needs a bearer token: send the metadata `authorization: Bearer <JWT>`",
            ));
        };
        if value.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::unauthenticated(
                "TOKEN_INVALID",
                format!("the authorization value is over {MAX_TOKEN_BYTES} bytes"),
            ));
        }
        let token = std::str::from_utf8(value)
            .ok()
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| {
                Refusal::unauthenticated(
                    "TOKEN_INVALID",
                    "the authorization value is not `Bearer <JWT>`",
                )
            })?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((caller, claims)) = verified.get(token) {
            if claims.current() {
                return Ok((caller.clone(), Arc::clone(claims)));
            }
            // Expired since: verified again below, which says so.
            verified.remove(token);
        }
        drop(verified);
        let invalid = |e: jsonwebtoken::errors::Error| {
            use jsonwebtoken::errors::ErrorKind;
            let reason = match e.kind() {
                ErrorKind::ExpiredSignature => "TOKEN_EXPIRED",
                ErrorKind::ImmatureSignature => "TOKEN_NOT_YET_VALID",
                ErrorKind::InvalidAudience => "TOKEN_WRONG_AUDIENCE",
                ErrorKind::InvalidIssuer => "TOKEN_WRONG_ISSUER",
                _ => "TOKEN_INVALID",
            };
            // The error may quote the token's header, which is the caller's.
            let message = clip_marked(format!("the bearer token is refused: {e}"));
            Refusal::unauthenticated(reason, message)
        };
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let keys = Arc::clone(&self.keys.read().unwrap_or_else(|p| p.into_inner()));
        // Only a key made for the token's algorithm may verify it: an RSA
        // public key is never taken as an HS256 secret.
        let candidates = keys.iter().filter(|key| {
            key.algorithm == header.alg
                && (header.kid.is_none() || key.id.is_none() || key.id == header.kid)
        });
        let mut refusal = Refusal::unauthenticated(
            "TOKEN_INVALID",
            clip_marked(format!(
                "no key of this server verifies {:?} tokens with key id {:?}",
                header.alg, header.kid
            )),
        );
        for key in candidates {
            let mut validation = Validation::new(key.algorithm);
            validation.leeway = LEEWAY_SECONDS;
            validation.set_audience(&[&self.audience]);
            validation.set_required_spec_claims(&["exp", "aud", "sub"]);
            if let Some(issuer) = &self.issuer {
                validation.set_issuer(&[issuer]);
            }
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    let subject = data.claims.sub.clone().unwrap_or_default();
                    if subject.is_empty() || subject.len() > 256 {
                        return Err(Refusal::unauthenticated(
                            "TOKEN_INVALID",
                            "the bearer token's `sub` must be 1 to 256 bytes",
                        ));
                    }
                    let (caller, claims) = (Caller { subject }, Arc::new(data.claims));
                    let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                    if verified.len() >= CACHED_TOKENS {
                        verified.clear();
                    }
                    verified.insert(token.to_owned(), (caller.clone(), Arc::clone(&claims)));
                    return Ok((caller, claims));
                }
                Err(e) => refusal = invalid(e),
            }
        }
        Err(refusal)
    }

    /// Re-reads the keys whenever their file changes, until `stopping`;
    /// keys that do not load are logged, the last good ones stay, and
    /// health reports [`AUTH_HEALTH`] NOT_SERVING until a good set loads.
    pub async fn reload_on_change(self: Arc<Self>, health: Health, stopping: CancellationToken) {
        let path = self.source.path().to_owned();
        let mut seen = file_stamp(&path);
        health.report(AUTH_HEALTH, true).await;
        loop {
            tokio::select! {
                () = stopping.cancelled() => return,
                () = tokio::time::sleep(RELOAD_CHECK) => {}
            }
            let now = file_stamp(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match self.source.load() {
                Ok(keys) => {
                    *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
                    // A token of a key that is gone must not pass on memory.
                    self.verified
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                    tracing::info!(path = %path.display(), "token keys reloaded");
                    health.report(AUTH_HEALTH, true).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "token keys changed but do not load: keeping the last good ones");
                    health.report(AUTH_HEALTH, false).await;
                }
            }
        }
    }
}

/// What a server asks of each call.
#[derive(Debug)]
pub struct Gate {
    authenticator: Arc<Authenticator>,
    /// The capability each service needs, by full name.
    capabilities: HashMap<String, Capability>,
    unprotected: HashSet<Unprotected>,
}

impl Gate {
    pub fn new(
        authenticator: Arc<Authenticator>,
        capabilities: HashMap<String, Capability>,
        unprotected: HashSet<Unprotected>,
    ) -> Self {
        Self {
            authenticator,
            capabilities,
            unprotected,
        }
    }

    fn open(&self, path: &str, service: &str) -> bool {
        let what = if path == METRICS_PATH {
            Unprotected::Metrics
        } else if service == "grpc.health.v1.Health" {
            Unprotected::Health
        } else if service.starts_with("grpc.reflection.") {
            Unprotected::Reflection
        } else {
            return false;
        };
        self.unprotected.contains(&what)
    }
}

/// Lets a call through only with a token that carries its service's scope
/// (or to what is left open), the caller in its extensions.
pub async fn authorize(
    State(gate): State<Arc<Gate>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if gate.open(path, service) {
        return next.run(request).await;
    }
    // An unknown service needs a valid token too, then answers UNIMPLEMENTED.
    let needed = gate.capabilities.get(service).copied();
    let authorization = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    let (caller, claims) = match gate.authenticator.verify(authorization) {
        Ok(verified) => verified,
        Err(refusal) => return refusal.into_status().into_http(),
    };
    if let Some(capability) = needed
        && !claims.has_scope(capability.scope())
    {
        let refusal = Refusal {
            code: Code::PermissionDenied,
            reason: "SCOPE_MISSING",
            message: format!(
                "{} needs a token with the scope {}",
                service,
                capability.scope()
            ),
            metadata: HashMap::from([
                ("required_scope".to_owned(), capability.scope().to_owned()),
                ("subject".to_owned(), caller.subject.clone()),
            ]),
        };
        return refusal.into_status().into_http();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp_from_now: f64, nbf_from_now: Option<f64>) -> Claims {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        Claims {
            sub: Some("alice".into()),
            exp: now + exp_from_now,
            nbf: nbf_from_now.map(|n| now + n),
            scope: Some("scaleout.read scaleout.commands".into()),
            scp: None,
        }
    }

    #[test]
    fn a_remembered_token_is_current_only_within_its_lifetime_and_leeway() {
        assert!(claims(60.0, None).current());
        assert!(claims(-10.0, None).current(), "within the 30 s leeway");
        assert!(!claims(-60.0, None).current());
        assert!(!claims(600.0, Some(120.0)).current(), "not yet valid");
        assert!(claims(600.0, Some(10.0)).current());
    }

    #[test]
    fn scopes_are_whole_words_of_scope_or_entries_of_scp() {
        let token = claims(60.0, None);
        assert!(token.has_scope("scaleout.commands"));
        assert!(!token.has_scope("scaleout.command"));
        let listed = Claims {
            scope: None,
            scp: Some(Scopes::Many(vec!["scaleout.admin".into()])),
            ..claims(60.0, None)
        };
        assert!(listed.has_scope("scaleout.admin"));
        assert!(!listed.has_scope("scaleout.read"));
    }
}
