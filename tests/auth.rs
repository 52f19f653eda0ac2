//! Bearer tokens on a gRPC server, as callers and adversaries send them:
//! none, malformed, the wrong signature, `alg: none`, an HS256 token
//! signed with the public key, expired, the wrong audience or issuer, the
//! wrong scope, huge — each the right status with its reason and nothing
//! written; a good one is served and its subject is who the events say did
//! it. Health and reflection stay open unless protected; a JWKS file that
//! breaks keeps the last good keys and health says so. Keys are made here.

mod support;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;
use reference::pb::{self, command_service_client::CommandServiceClient};
use scaleout::config::{AuthArgs, ServerArgs, Unprotected};
use scaleout::pb::read_service_client::ReadServiceClient;
use support::CommandService;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

const AUDIENCE: &str = "scaleout";
const ISSUER: &str = "https://issuer.test";

/// An ES256 signing key and its id.
struct Signer {
    id: &'static str,
    key: KeyPair,
}

impl Signer {
    fn new(id: &'static str) -> Self {
        Self {
            id,
            key: KeyPair::generate().unwrap(),
        }
    }

    /// Its public half as a JWK.
    fn jwk(&self) -> serde_json::Value {
        // An uncompressed P-256 point: 0x04, then x and y.
        let point = self.key.public_key_raw();
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.id,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
        })
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.id.to_owned());
        let key = EncodingKey::from_ec_pem(self.key.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims of `subject` with `scope`, valid for 10 minutes.
fn claims(subject: &str, scope: &str) -> serde_json::Value {
    serde_json::json!({
        "sub": subject, "aud": AUDIENCE, "iss": ISSUER,
        "exp": now() + 600, "iat": now(), "scope": scope,
    })
}

fn write_jwks(path: &Path, signers: &[&Signer]) {
    let jwks = serde_json::json!({ "keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>() });
    let partial = path.with_extension("partial");
    std::fs::write(&partial, jwks.to_string()).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

async fn serve(auth: AuthArgs) -> (CommandService, tempfile::TempDir) {
    let (store, dir) = support::redb_store();
    let args = ServerArgs {
        auth,
        ..ServerArgs::default()
    };
    (CommandService::start_with(store, args).await, dir)
}

fn jwks_auth(path: &Path) -> AuthArgs {
    AuthArgs {
        auth_jwks: Some(path.to_owned()),
        auth_audience: Some(AUDIENCE.into()),
        auth_issuer: Some(ISSUER.into()),
        ..AuthArgs::default()
    }
}

/// `body` with `authorization: <value>` when given.
fn request<T>(body: T, authorization: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

async fn increment(
    channel: &Channel,
    authorization: Option<&str>,
) -> Result<pb::CommandResult, tonic::Status> {
    let body = pb::IncrementCounterRequest {
        counter_id: "guarded".into(),
        ..Default::default()
    };
    let answer = CommandServiceClient::new(channel.clone())
        .increment_counter(request(body, authorization))
        .await?;
    Ok(answer.into_inner().result.unwrap())
}

/// The events the log holds, read with `authorization`.
async fn logged(channel: &Channel, authorization: &str) -> Vec<scaleout::pb::LoggedEvent> {
    let body = scaleout::pb::ReadAllRequest {
        limit: 100,
        ..Default::default()
    };
    ReadServiceClient::new(channel.clone())
        .read_all(request(body, Some(authorization)))
        .await
        .unwrap()
        .into_inner()
        .events
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_token_is_refused_with_its_reason_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, stranger) = (Signer::new("k1"), Signer::new("k1"));
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&signer]);
    let (service, _data) = serve(jwks_auth(&jwks)).await;
    let channel = service.channel().await;

    let bearer = |token: String| format!("Bearer {token}");
    let mut expired = claims("alice", "scaleout.commands");
    expired["exp"] = (now() - 3_600).into();
    let mut elsewhere = claims("alice", "scaleout.commands");
    elsewhere["aud"] = "another-service".into();
    let mut other_issuer = claims("alice", "scaleout.commands");
    other_issuer["iss"] = "https://evil.test".into();
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("alice", "scaleout.commands").to_string())
    );
    // The public key used as an HS256 secret: an old algorithm confusion.
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("alice", "scaleout.commands"),
        &EncodingKey::from_secret(signer.key.public_key_pem().as_bytes()),
    )
    .unwrap();
    let cases: Vec<(&str, Option<String>, Code, &str)> = vec![
        ("no token", None, Code::Unauthenticated, "TOKEN_MISSING"),
        (
            "not bearer",
            Some("Basic YWxpY2U6c2VjcmV0".into()),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "malformed",
            Some(bearer("not.a.jwt".into())),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "another key's signature",
            Some(bearer(stranger.sign(&claims("alice", "scaleout.commands")))),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "alg none",
            Some(bearer(unsigned)),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "HS256 with the public key",
            Some(bearer(confused)),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
        (
            "expired",
            Some(bearer(signer.sign(&expired))),
            Code::Unauthenticated,
            "TOKEN_EXPIRED",
        ),
        (
            "another audience",
            Some(bearer(signer.sign(&elsewhere))),
            Code::Unauthenticated,
            "TOKEN_WRONG_AUDIENCE",
        ),
        (
            "another issuer",
            Some(bearer(signer.sign(&other_issuer))),
            Code::Unauthenticated,
            "TOKEN_WRONG_ISSUER",
        ),
        (
            "queries only",
            Some(bearer(
                signer.sign(&claims("alice", "scaleout.queries scaleout.read")),
            )),
            Code::PermissionDenied,
            "SCOPE_MISSING",
        ),
        (
            "9 KiB",
            Some(bearer("a".repeat(9 << 10))),
            Code::Unauthenticated,
            "TOKEN_INVALID",
        ),
    ];
    for (case, authorization, code, wanted) in cases {
        let refused = increment(&channel, authorization.as_deref())
            .await
            .expect_err(case);
        assert_eq!(refused.code(), code, "{case}: {refused:?}");
        assert_eq!(reason(&refused), wanted, "{case}: {refused:?}");
    }
    // A 5 KiB key id or algorithm, which the refusal names: cut to fit the
    // headers every client accepts.
    let long = "k".repeat(5 << 10);
    for header in [
        format!(r#"{{"alg":"ES256","kid":"{long}"}}"#),
        format!(r#"{{"alg":"{long}"}}"#),
    ] {
        let token = format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(&header),
            URL_SAFE_NO_PAD.encode(claims("alice", "scaleout.commands").to_string())
        );
        let refused = increment(&channel, Some(&bearer(token)))
            .await
            .expect_err("a long header field");
        assert_eq!(reason(&refused), "TOKEN_INVALID", "{refused:?}");
        assert!(
            refused.message().len() <= 512,
            "{}",
            refused.message().len()
        );
    }
    // Past what HTTP/2 headers carry: refused by the transport, and the
    // server goes on. That connection may be closing after the error (a
    // call sent on it meanwhile is cancelled), so the rest use a new one.
    assert!(
        increment(&channel, Some(&bearer("a".repeat(100 << 10))))
            .await
            .is_err()
    );
    let channel = service.channel().await;

    let reader = bearer(signer.sign(&claims("auditor", "scaleout.read")));
    assert!(
        logged(&channel, &reader).await.is_empty(),
        "a refused call wrote"
    );

    let writer = bearer(signer.sign(&claims("alice", "scaleout.commands")));
    let written = increment(&channel, Some(&writer)).await.unwrap();
    assert_eq!(written.version, 1);
    // Who did it: the token's subject, in the events' metadata.
    let events = logged(&channel, &reader).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event.as_ref().unwrap().actor, "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_stay_open_unless_protected() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new("k1");
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&signer]);
    let (open, _data) = serve(jwks_auth(&jwks)).await;
    support::wait_for_health(open.channel().await, "", ServingStatus::Serving).await;
    let metrics = support::http_get(&open.addr.to_string(), "/metrics").await;
    assert!(
        metrics.contains("scaleout_grpc_requests_total"),
        "{metrics}"
    );

    let (guarded, _data) = serve(AuthArgs {
        auth_protect: vec![Unprotected::Health],
        ..jwks_auth(&jwks)
    })
    .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(guarded.channel().await);
    let refused = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let token = format!("Bearer {}", signer.sign(&claims("probe", "")));
    let checked = health
        .check(request(
            tonic_health::pb::HealthCheckRequest::default(),
            Some(&token),
        ))
        .await;
    assert!(checked.is_ok(), "{checked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_jwks_keeps_the_last_good_keys_and_health_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Signer::new("old"), Signer::new("new"));
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&old]);
    let (service, _data) = serve(jwks_auth(&jwks)).await;
    let channel = service.channel().await;
    let token = |signer: &Signer| {
        format!(
            "Bearer {}",
            signer.sign(&claims("alice", "scaleout.commands"))
        )
    };
    support::wait_for_health(channel.clone(), "scaleout.Auth", ServingStatus::Serving).await;

    // Verified once, so remembered: forgotten only when the keys reload.
    let remembered = token(&old);
    assert!(increment(&channel, Some(&remembered)).await.is_ok());

    std::fs::write(&jwks, "{ not json").unwrap();
    support::wait_for_health(channel.clone(), "scaleout.Auth", ServingStatus::NotServing).await;
    // ES256 signatures differ each time: a new token is verified afresh.
    assert!(increment(&channel, Some(&token(&old))).await.is_ok());

    std::fs::remove_file(&jwks).unwrap();
    // Still the last good keys, however long the file stays away.
    assert!(increment(&channel, Some(&token(&old))).await.is_ok());

    write_jwks(&jwks, &[&new]);
    support::wait_for_health(channel.clone(), "scaleout.Auth", ServingStatus::Serving).await;
    assert!(increment(&channel, Some(&token(&new))).await.is_ok());
    let retired = increment(&channel, Some(&token(&old))).await.unwrap_err();
    assert_eq!(retired.code(), Code::Unauthenticated);
    let forgotten = increment(&channel, Some(&remembered)).await.unwrap_err();
    assert_eq!(
        forgotten.code(),
        Code::Unauthenticated,
        "a retired key's token passed on memory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs256_secret_file_verifies_development_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "a development secret of at least 32 bytes";
    let path = dir.path().join("secret");
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    let (service, _data) = serve(AuthArgs {
        auth_hs256_secret_file: Some(path),
        auth_audience: Some(AUDIENCE.into()),
        ..AuthArgs::default()
    })
    .await;
    let channel = service.channel().await;
    let sign = |secret: &str| {
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims("dev", "scaleout.commands"),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        format!("Bearer {token}")
    };
    assert!(increment(&channel, Some(&sign(secret))).await.is_ok());
    let forged = increment(
        &channel,
        Some(&sign("another secret of at least 32 bytes!!")),
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&forged), "TOKEN_INVALID");
}
