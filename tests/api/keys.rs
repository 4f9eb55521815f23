//! Public signing keys: EdDSA access tokens from `AI_MESSAGE_SIGNING_KEY_FILE`,
//! the key set (GetJwks, `/.well-known/jwks.json`), rotation through
//! `AI_MESSAGE_VERIFY_KEY_FILES`, and the tokens a verifier must refuse.

use std::path::PathBuf;

use ai_message::{proto, startup::Application};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::{
    EncodePrivateKey as _, EncodePublicKey as _, spki::der::pem::LineEnding,
};
use tonic::Code;

use crate::{
    errors::assert_reason,
    helpers::{Backend, TEST_SECRET, TestApp, sign, spawn_app, spawn_app_with},
};

backend_tests!(
    an_eddsa_token_verifies_with_the_published_key_alone,
    after_rotation_tokens_of_both_keys_verify_and_the_set_lists_both,
    unknown_kids_hs256_and_unsigned_tokens_are_refused_while_keys_are_in_use,
    without_a_key_file_tokens_stay_hs256_and_the_set_is_empty,
);

/// A fresh Ed25519 key written as PKCS#8 PEM (as `openssl genpkey` does).
pub fn key_file(
    dir: &tempfile::TempDir,
    name: &str,
    seed: u8,
) -> (PathBuf, ed25519_dalek::SigningKey) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let path = dir.path().join(name);
    std::fs::write(&path, key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
    (path, key)
}

pub async fn jwks(app: &TestApp) -> Vec<proto::Jwk> {
    app.auth
        .clone()
        .get_jwks(proto::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
}

/// Checks the token's Ed25519 signature with the JWK's `x` directly, not
/// through any code of the server's.
fn verifies_with(token: &str, jwk: &proto::Jwk) -> bool {
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let x: [u8; 32] = URL_SAFE_NO_PAD.decode(&jwk.x).unwrap().try_into().unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&x).unwrap();
    let signature =
        ed25519_dalek::Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap()).unwrap();
    key.verify_strict(signed.as_bytes(), &signature).is_ok()
}

fn header(token: &str) -> serde_json::Value {
    let first = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(first).unwrap()).unwrap()
}

async fn an_eddsa_token_verifies_with_the_published_key_alone(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = key_file(&dir, "signing.pem", 7);
    let app = spawn_app_with(backend, |c| c.signing_key_file = Some(path)).await;
    let ivy = app.register_and_login("ivy").await;
    let header = header(&ivy.access_token);
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    let keys = jwks(&app).await;
    assert_eq!(keys.len(), 1);
    let jwk = &keys[0];
    assert_eq!(
        (
            jwk.kty.as_str(),
            jwk.crv.as_str(),
            jwk.alg.as_str(),
            jwk.r#use.as_str()
        ),
        ("OKP", "Ed25519", "EdDSA", "sig")
    );
    assert_eq!(
        jwk.x,
        URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes())
    );
    assert_eq!(header["kid"], jwk.kid.as_str());
    // RFC 7638: SHA-256 of the required members in order, computed here.
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, jwk.x);
    use sha2::Digest as _;
    assert_eq!(
        jwk.kid,
        URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical))
    );
    assert!(verifies_with(&ivy.access_token, jwk));
    assert!(app.get_me(&ivy.access_token).await.is_ok());

    // Through REST: an RFC 7517 key set, cacheable for 5 minutes.
    let answer = crate::rest::Rest::new(&app)
        .call("GET", "/.well-known/jwks.json", None, None)
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("cache-control"), Some("max-age=300"));
    assert_eq!(answer.body["keys"][0]["kid"], jwk.kid.as_str());
    assert_eq!(answer.body["keys"][0]["x"], jwk.x.as_str());
    assert_eq!(answer.body["keys"][0]["use"], "sig");
    app.stop().await;
}

async fn after_rotation_tokens_of_both_keys_verify_and_the_set_lists_both(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (old_path, old_key) = key_file(&dir, "old.pem", 1);
    let (new_path, new_key) = key_file(&dir, "new.pem", 2);
    // The old key may also be given as its public key only.
    let old_public = dir.path().join("old.pub.pem");
    std::fs::write(
        &old_public,
        old_key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    let app = spawn_app_with(backend, |c| c.signing_key_file = Some(old_path)).await;
    let before = app.register_and_login("ivy").await;
    let rotated = app
        .spawn_sibling_with(|c| {
            c.signing_key_file = Some(new_path);
            c.verify_key_files = vec![old_public];
        })
        .await;
    let after = rotated
        .login("ivy", crate::helpers::PASSWORD)
        .await
        .unwrap();
    assert!(
        rotated.get_me(&before.access_token).await.is_ok(),
        "old key's token"
    );
    assert!(
        rotated.get_me(&after.access_token).await.is_ok(),
        "new key's token"
    );
    let keys = jwks(&rotated).await;
    let xs: Vec<String> = keys.iter().map(|k| k.x.clone()).collect();
    assert_eq!(
        xs,
        [
            URL_SAFE_NO_PAD.encode(new_key.verifying_key().to_bytes()),
            URL_SAFE_NO_PAD.encode(old_key.verifying_key().to_bytes()),
        ],
        "the signing key first"
    );
    assert!(verifies_with(&before.access_token, &keys[1]));
    assert!(verifies_with(&after.access_token, &keys[0]));
    // The instance still on the old key alone does not take the new tokens.
    assert_reason(
        app.get_me(&after.access_token).await,
        Code::Unauthenticated,
        "TOKEN_INVALID",
    );
    rotated.stop().await;
    app.stop().await;
}

async fn unknown_kids_hs256_and_unsigned_tokens_are_refused_while_keys_are_in_use(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = key_file(&dir, "signing.pem", 9);
    let app = spawn_app_with(backend, |c| c.signing_key_file = Some(path)).await;
    let ivy = app.register_and_login("ivy").await;
    let claims = URL_SAFE_NO_PAD
        .decode(ivy.access_token.split('.').nth(1).unwrap())
        .unwrap();
    let claims = String::from_utf8(claims).unwrap();
    let kid = header(&ivy.access_token)["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    // HS256 with the very secret the server would use without a key file.
    let hs256 = sign(r#"{"alg":"HS256","typ":"at+jwt"}"#, &claims, TEST_SECRET);
    // alg none, naming the real key.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"at+jwt","kid":"{kid}"}}"#)),
        URL_SAFE_NO_PAD.encode(&claims)
    );
    // Signed by an attacker's Ed25519 key under a kid of its own, or the real one.
    let forger = ed25519_dalek::SigningKey::from_bytes(&[66; 32]);
    let forged = |kid: &str| {
        use ed25519_dalek::Signer as _;
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}"}}"#)),
            URL_SAFE_NO_PAD.encode(&claims)
        );
        let signature = forger.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    };
    for (what, token) in [
        ("HS256", hs256),
        ("alg none", none),
        ("unknown kid", forged("attacker")),
        ("real kid, wrong key", forged(&kid)),
    ] {
        let status = assert_reason(
            app.get_me(&token).await,
            Code::Unauthenticated,
            "TOKEN_INVALID",
        );
        eprintln!("{what}: {}", status.message());
        assert!(!app.validate(&token, &[]).await.active, "{what} validates");
    }
    app.stop().await;
}

async fn without_a_key_file_tokens_stay_hs256_and_the_set_is_empty(backend: Backend) {
    let app = spawn_app(backend).await;
    let ivy = app.register_and_login("ivy").await;
    assert_eq!(header(&ivy.access_token)["alg"], "HS256");
    assert!(
        jwks(&app).await.is_empty(),
        "a symmetric key is never published"
    );
    let answer = crate::rest::Rest::new(&app)
        .call("GET", "/.well-known/jwks.json", None, None)
        .await;
    assert_eq!(answer.body, serde_json::json!({"keys": []}));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_key_files_stop_start_up_naming_their_variable() {
    let dir = tempfile::tempdir().unwrap();
    let (good, key) = key_file(&dir, "good.pem", 5);
    let public = dir.path().join("public.pem");
    std::fs::write(
        &public,
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.pem");
    let cases: [(&str, Option<PathBuf>, Vec<PathBuf>); 4] = [
        ("AI_MESSAGE_SIGNING_KEY_FILE", Some(missing.clone()), vec![]),
        ("AI_MESSAGE_SIGNING_KEY_FILE", Some(garbage.clone()), vec![]),
        ("AI_MESSAGE_SIGNING_KEY_FILE", Some(public), vec![]),
        ("AI_MESSAGE_VERIFY_KEY_FILES", Some(good), vec![garbage]),
    ];
    for (variable, signing, verify) in cases {
        let mut config = ai_message::config::Config::for_tests(
            ai_message::config::DatabaseTarget::Sqlite(Some(dir.path().join("db.sqlite"))),
        );
        config.signing_key_file = signing.clone();
        config.verify_key_files = verify;
        let error = match Application::build(config).await {
            Ok(_) => panic!("{signing:?} started"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains(variable), "{variable} not named: {error}");
    }
}
