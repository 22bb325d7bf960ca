//! Who a connection is and what it may do.
//!
//! Session tokens: `<session id>.<256-bit secret>`, stored only as a SHA-256
//! hash of the secret, compared in constant time. In `auth.mode = "jwt"` a
//! `hello` also carries a connection JWT (verified by `jsonwebtoken`): its
//! `sub` owns the session, its optional `channels` claim bounds what the
//! holder reads and publishes, its `roles` meet the config's publish rules.
//! Browser origins are checked before the WebSocket upgrade.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A new secret: 32 random bytes from the OS-seeded thread RNG, as hex.
pub(crate) fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the store keeps: SHA-256 of the secret.
pub(crate) fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// The token a client presents: `<session id>.<secret>`.
pub(crate) fn token(session_id: &str, secret: &str) -> String {
    format!("{session_id}.{secret}")
}

/// Splits a token into session id and secret.
pub(crate) fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.rsplit_once('.')?;
    (!id.is_empty() && secret.len() == 64).then_some((id, secret))
}

/// Whether `secret` hashes to `stored`, in time independent of where they differ.
pub(crate) fn verify(secret: &str, stored: &[u8]) -> bool {
    let hash = hash_secret(secret);
    hash.len() == stored.len() && bool::from(hash.ct_eq(stored))
}

/// Every reason `keel_auth_refused_total` names, registered at zero.
pub(crate) const REFUSALS: [&str; 4] = ["jwt", "origin", "owner", "publish"];

/// Counts a refusal: `keel_auth_refused_total{why}`.
pub(crate) fn refused(why: &'static str) {
    metrics::counter!("keel_auth_refused_total", "why" => why).increment(1);
}

/// Longest connection JWT accepted.
pub(crate) const MAX_JWT_BYTES: usize = 8 * 1024;

/// Who holds a connection, once its `hello` is accepted.
#[derive(Debug, Clone, Default)]
pub(crate) struct Principal {
    /// The JWT's `sub`; `None` in `open` mode.
    pub(crate) sub: Option<String>,
    /// The JWT's `roles`.
    pub(crate) roles: Vec<String>,
    /// Channel patterns the holder may read; `None`: any public channel.
    pub(crate) read: Option<Vec<String>>,
    /// Channel patterns the holder may publish to; `None`: any the
    /// publish rules allow.
    pub(crate) publish: Option<Vec<String>>,
    /// How long the JWT stays valid from now (its `exp`): the connection
    /// is closed then (4003).
    pub(crate) valid_for: Option<std::time::Duration>,
}

impl Principal {
    /// The scope of this holder's publish ids on a channel: its user in
    /// `jwt` mode (all its sessions), else its session.
    pub(crate) fn id_scope(&self, session: &str) -> String {
        match &self.sub {
            Some(sub) => format!("user:{sub}"),
            None => format!("session:{session}"),
        }
    }

    /// What the session row remembers of its owner.
    pub(crate) fn owner_meta(&self) -> String {
        match &self.sub {
            Some(sub) => serde_json::json!({ "sub": sub }).to_string(),
            None => String::new(),
        }
    }

    /// Whether a session whose row says `meta` belongs to this holder.
    pub(crate) fn owns(&self, meta: &str) -> bool {
        let owner = serde_json::from_str::<serde_json::Value>(meta)
            .ok()
            .and_then(|v| v.get("sub").and_then(|s| s.as_str()).map(str::to_owned));
        owner == self.sub
    }

    /// Whether the `channels.read` claim lets the holder read `channel`.
    pub(crate) fn may_read(&self, channel: &str) -> bool {
        self.read.as_ref().is_none_or(|p| matches_any(p, channel))
    }
}

/// `pattern` is a channel name, or a prefix followed by `*`.
fn matches_any(patterns: &[String], channel: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => p == channel,
    })
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    channels: Option<ChannelClaims>,
}

#[derive(Deserialize)]
struct ChannelClaims {
    #[serde(default)]
    read: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
}

enum Mode {
    Open,
    Jwt {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
        leeway: u64,
    },
}

/// The relay's authentication and authorisation settings, ready to use.
pub(crate) struct Authority {
    mode: Mode,
    origins: Vec<String>,
    client_publish: bool,
    rules: Vec<crate::config::PublishRule>,
}

/// Why a `hello`'s JWT was refused.
#[derive(Debug)]
pub(crate) struct Refusal(pub(crate) String);

impl Authority {
    /// Reads the key files the configuration names.
    pub(crate) fn new(config: &crate::config::Auth) -> Result<Authority, String> {
        let mode = match config.mode.as_str() {
            "jwt" => {
                let read = |path: &Path| {
                    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
                };
                let (alg, key) = match (
                    config.jwt_algorithm.as_str(),
                    &config.jwt_secret_file,
                    &config.jwt_public_key_file,
                ) {
                    ("HS256", Some(path), _) => {
                        let mut secret = read(path)?;
                        while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                            secret.pop();
                        }
                        if secret.len() < 32 {
                            return Err(format!(
                                "{}: an HS256 secret must be at least 32 bytes",
                                path.display()
                            ));
                        }
                        (Algorithm::HS256, DecodingKey::from_secret(&secret))
                    }
                    ("RS256", _, Some(path)) => (
                        Algorithm::RS256,
                        DecodingKey::from_rsa_pem(&read(path)?).map_err(|e| {
                            format!("{}: not an RSA public key: {e}", path.display())
                        })?,
                    ),
                    ("EdDSA", _, Some(path)) => (
                        Algorithm::EdDSA,
                        DecodingKey::from_ed_pem(&read(path)?).map_err(|e| {
                            format!("{}: not an Ed25519 public key: {e}", path.display())
                        })?,
                    ),
                    _ => return Err("auth.jwt_algorithm and its key file do not match".to_owned()),
                };
                let mut validation = Validation::new(alg);
                validation.leeway = config.jwt_leeway_s;
                validation.validate_nbf = true;
                // jsonwebtoken checks `iss` and `aud` only when a token
                // carries them: configured, they must also be required.
                let mut required = vec!["exp", "sub"];
                match &config.jwt_audience {
                    Some(aud) => {
                        validation.set_audience(&[aud]);
                        required.push("aud");
                    }
                    None => validation.validate_aud = false,
                }
                if let Some(iss) = &config.jwt_issuer {
                    validation.set_issuer(&[iss]);
                    required.push("iss");
                }
                validation.set_required_spec_claims(&required);
                Mode::Jwt {
                    key: Box::new(key),
                    validation: Box::new(validation),
                    leeway: config.jwt_leeway_s,
                }
            }
            _ => Mode::Open,
        };
        Ok(Authority {
            mode,
            origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            client_publish: config.client_publish,
            rules: config.publish_rule.clone(),
        })
    }

    /// Who presents `jwt` (the `auth` field of `hello`).
    pub(crate) fn authenticate(&self, jwt: Option<&str>) -> Result<Principal, Refusal> {
        let Mode::Jwt {
            key,
            validation,
            leeway,
        } = &self.mode
        else {
            return Ok(Principal::default());
        };
        let Some(jwt) = jwt else {
            return Err(Refusal(
                "this relay requires a JWT in hello's \"auth\"".to_owned(),
            ));
        };
        if jwt.len() > MAX_JWT_BYTES {
            return Err(Refusal(format!("JWT over {MAX_JWT_BYTES} bytes")));
        }
        let claims = jsonwebtoken::decode::<Claims>(jwt, key, validation)
            .map_err(|e| Refusal(format!("JWT refused: {e}")))?
            .claims;
        if claims.sub.is_empty() {
            return Err(Refusal("JWT refused: empty sub".to_owned()));
        }
        let (read, publish) = match claims.channels {
            Some(c) => (c.read, c.publish),
            None => (None, None),
        };
        let now = jsonwebtoken::get_current_timestamp();
        Ok(Principal {
            sub: Some(claims.sub),
            roles: claims.roles,
            read,
            publish,
            // Accepted within the leeway, closed at its end: never a
            // welcome followed at once by 4003.
            valid_for: Some(std::time::Duration::from_secs(
                claims.exp.saturating_add(*leeway).saturating_sub(now),
            )),
        })
    }

    /// Whether a request with this `Origin` header may open a WebSocket
    /// (`None`: a header that is not visible ASCII, allowed only by `*`).
    pub(crate) fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return self.origins.iter().any(|o| o == "*");
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        self.origins.iter().any(|o| o == "*" || *o == origin)
    }

    /// Why `who` may not publish to the public channel `channel`, if it may not.
    pub(crate) fn publish_refusal(&self, who: &Principal, channel: &str) -> Option<String> {
        if let Some(patterns) = &who.publish
            && !matches_any(patterns, channel)
        {
            return Some("the JWT's channels.publish does not list this channel".to_owned());
        }
        let rule = self
            .rules
            .iter()
            .filter(|r| channel.starts_with(&r.prefix))
            .max_by_key(|r| r.prefix.len());
        match rule {
            Some(rule) if !rule.roles.iter().any(|r| who.roles.contains(r)) => Some(format!(
                "publishing to {:?}* needs one of the roles {:?}",
                rule.prefix, rule.roles
            )),
            Some(_) => None,
            None if !self.client_publish => {
                Some("clients may not publish to this channel".to_owned())
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_verify() {
        let secret = new_secret();
        assert_eq!(secret.len(), 64);
        assert_ne!(secret, new_secret());
        let t = token("abc", &secret);
        let (id, s) = split_token(&t).unwrap();
        assert_eq!((id, s), ("abc", secret.as_str()));
        let stored = hash_secret(&secret);
        assert!(verify(s, &stored));
        assert!(!verify(&new_secret(), &stored));
        assert!(!verify(s, &stored[..31]));
        assert!(split_token("nodot").is_none());
        assert!(split_token("id.short").is_none());
    }
}

#[cfg(test)]
mod authority_tests {
    use super::*;
    use crate::config::{Auth, PublishRule};
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn hs256(dir: &Path) -> Authority {
        let path = dir.join("secret");
        std::fs::write(&path, [SECRET, b"\n"].concat()).unwrap();
        Authority::new(&Auth {
            mode: "jwt".into(),
            jwt_secret_file: Some(path),
            publish_rule: vec![PublishRule {
                prefix: "news:".into(),
                roles: vec!["editor".into()],
            }],
            ..Auth::default()
        })
        .unwrap()
    }

    fn sign(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn exp(from_now: i64) -> i64 {
        jsonwebtoken::get_current_timestamp() as i64 + from_now
    }

    #[test]
    fn jwt_checks_signature_expiry_and_claims() {
        let dir = tempfile::tempdir().unwrap();
        let a = hs256(dir.path());
        let who = a
            .authenticate(Some(&sign(serde_json::json!({
                "sub": "alice", "exp": exp(60), "roles": ["editor"],
                "channels": {"read": ["room:*", "lobby"]}
            }))))
            .unwrap();
        assert_eq!(who.sub.as_deref(), Some("alice"));
        assert!(who.may_read("room:1") && who.may_read("lobby") && !who.may_read("lobbyx"));
        assert_eq!(who.id_scope("s1"), "user:alice");
        assert!(who.owns(&who.owner_meta()) && !who.owns("") && !who.owns(r#"{"sub":"bob"}"#));
        assert!(a.publish_refusal(&who, "news:1").is_none());

        let reader = a
            .authenticate(Some(&sign(
                serde_json::json!({"sub": "bob", "exp": exp(60)}),
            )))
            .unwrap();
        assert!(reader.may_read("anything"));
        assert!(
            a.publish_refusal(&reader, "news:1").is_some(),
            "rule needs editor"
        );
        assert!(a.publish_refusal(&reader, "room:1").is_none());

        for bad in [
            None,
            Some(sign(serde_json::json!({"sub": "bob", "exp": exp(-120)}))),
            Some(sign(serde_json::json!({"sub": "bob"}))),
            Some(sign(serde_json::json!({"exp": exp(60)}))),
            Some(sign(serde_json::json!({"sub": "", "exp": exp(60)}))),
            Some("not.a.jwt".to_owned()),
            Some("x".repeat(MAX_JWT_BYTES + 1)),
        ] {
            assert!(a.authenticate(bad.as_deref()).is_err(), "{bad:?}");
        }
        // Signed with another secret.
        let forged = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "alice", "exp": exp(60)}),
            &EncodingKey::from_secret(b"another secret another secret ..."),
        )
        .unwrap();
        assert!(a.authenticate(Some(&forged)).is_err());
    }

    /// Configured `iss` and `aud` are required, not only checked when
    /// present; an `exp` within the leeway is accepted and closes at the
    /// leeway's end; an `exp` far in the future does not overflow.
    #[test]
    fn issuer_audience_required_and_leeway() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, SECRET).unwrap();
        let a = Authority::new(&Auth {
            mode: "jwt".into(),
            jwt_secret_file: Some(path),
            jwt_issuer: Some("https://auth.example".into()),
            jwt_audience: Some("keel".into()),
            ..Auth::default()
        })
        .unwrap();
        let ok = serde_json::json!({"sub": "a", "exp": exp(60), "iss": "https://auth.example", "aud": "keel"});
        assert!(a.authenticate(Some(&sign(ok.clone()))).is_ok());
        for missing in ["iss", "aud"] {
            let mut claims = ok.clone();
            claims.as_object_mut().unwrap().remove(missing);
            assert!(
                a.authenticate(Some(&sign(claims))).is_err(),
                "{missing} missing"
            );
        }
        let mut wrong = ok.clone();
        wrong["aud"] = "other".into();
        assert!(a.authenticate(Some(&sign(wrong))).is_err());
        let mut late = ok.clone();
        late["exp"] = exp(-2).into();
        let who = a.authenticate(Some(&sign(late))).unwrap();
        let left = who.valid_for.unwrap().as_secs();
        assert!(
            (2..=3).contains(&left),
            "{left} s: the leeway (5 s) minus 2 s"
        );
        let mut forever = ok.clone();
        forever["exp"] = u64::MAX.into();
        let who = a.authenticate(Some(&sign(forever))).unwrap();
        assert!(
            tokio::time::Instant::now()
                .checked_add(who.valid_for.unwrap())
                .is_none()
        );
    }

    #[test]
    fn short_secrets_and_open_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short");
        std::fs::write(&path, b"short\n").unwrap();
        let short = Auth {
            mode: "jwt".into(),
            jwt_secret_file: Some(path),
            ..Auth::default()
        };
        assert!(Authority::new(&short).is_err());
        let open = Authority::new(&Auth {
            allowed_origins: vec!["https://App.example/".into()],
            client_publish: false,
            ..Auth::default()
        })
        .unwrap();
        let anyone = open.authenticate(None).unwrap();
        assert_eq!(anyone.id_scope("s1"), "session:s1");
        assert!(
            !open.origin_allowed(None),
            "an unreadable Origin is not listed"
        );
        assert!(open.origin_allowed(Some("https://app.example")));
        assert!(!open.origin_allowed(Some("https://evil.example")));
        assert!(open.publish_refusal(&anyone, "room:1").is_some());
    }
}

#[cfg(test)]
mod eddsa_tests {
    use super::*;
    use crate::config::Auth;
    use jsonwebtoken::{EncodingKey, Header};

    /// EdDSA: verified against the configured public key, refused when
    /// signed by another key or with another algorithm than configured.
    #[test]
    fn eddsa_public_key_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let public = dir.path().join("jwt.pub.pem");
        std::fs::write(&public, key.public_key_pem()).unwrap();
        let a = Authority::new(&Auth {
            mode: "jwt".into(),
            jwt_algorithm: "EdDSA".into(),
            jwt_public_key_file: Some(public),
            ..Auth::default()
        })
        .unwrap();
        let claims = serde_json::json!({
            "sub": "dave",
            "exp": jsonwebtoken::get_current_timestamp() + 60
        });
        let sign = |k: &rcgen::KeyPair| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::EdDSA),
                &claims,
                &EncodingKey::from_ed_pem(k.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap()
        };
        let who = a.authenticate(Some(&sign(&key))).unwrap();
        assert_eq!(who.sub.as_deref(), Some("dave"));
        assert!(a.authenticate(Some(&sign(&other))).is_err());
        // An HS256 token made with the public key as its secret (the
        // classic algorithm confusion) is refused.
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key.public_key_pem().as_bytes()),
        )
        .unwrap();
        assert!(a.authenticate(Some(&confused)).is_err());
    }
}
