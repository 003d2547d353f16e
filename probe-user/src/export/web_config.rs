//! `--web-config-file`: TLS and basic authentication for the metrics endpoint, in the web
//! configuration format of the Prometheus exporters (exporter-toolkit's `web-config.yml`), so a
//! file written for node_exporter works here:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt          # paths are relative to this file's directory
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert
//!   client_ca_file: clients-ca.crt
//!   min_version: TLS12             # TLS12 or TLS13
//! http_server_config:
//!   headers:
//!     Strict-Transport-Security: max-age=31536000
//! basic_auth_users:
//!   prometheus: $2y$10$...         # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! TLS is rustls (TLS 1.2 and 1.3, its default cipher suites and key exchange groups); what
//! rustls does not do is refused with a sentence that says so (`cipher_suites`,
//! `curve_preferences`, `client_allowed_sans`, `RequireAnyClientCert`, TLS 1.0 and 1.1), as
//! exporter-toolkit refuses unknown keys. Passwords are checked with bcrypt off the runtime's
//! workers, one at a time, and a password that checked out is remembered (as a SHA-256 digest,
//! like exporter-toolkit's cache) so a scraper pays bcrypt's cost once, not per scrape.
use std::{
    collections::{BTreeMap, HashSet},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use hyper::header::{HeaderName, HeaderValue};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::{Deserialize, de::IgnoredAny};

/// What the file asks for, as exporter-toolkit spells it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    #[serde(default)]
    tls_server_config: Option<TlsServerConfig>,
    #[serde(default)]
    http_server_config: Option<HttpServerConfig>,
    #[serde(default)]
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerConfig {
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    /// The certificate inline (PEM), instead of `cert_file`.
    #[serde(default)]
    cert: Option<String>,
    /// The key inline (PEM), instead of `key_file`.
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    client_auth_type: Option<ClientAuthType>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    min_version: Option<TlsVersion>,
    #[serde(default)]
    max_version: Option<TlsVersion>,
    /// Go's crypto/tls ignores it since Go 1.18; so does connprobe.
    #[serde(default, rename = "prefer_server_cipher_suites")]
    _prefer_server_cipher_suites: Option<IgnoredAny>,
    #[serde(default)]
    cipher_suites: Option<Vec<String>>,
    #[serde(default)]
    curve_preferences: Option<Vec<String>>,
    #[serde(default)]
    client_allowed_sans: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpServerConfig {
    /// connprobe serves HTTP/1.1 only; `http2` (true by default in exporter-toolkit) is
    /// accepted and has no effect.
    #[serde(default, rename = "http2")]
    _http2: Option<IgnoredAny>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Go's `tls.ClientAuthType` names, as exporter-toolkit takes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
enum ClientAuthType {
    #[default]
    NoClientCert,
    RequestClientCert,
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
enum TlsVersion {
    #[serde(rename = "TLS10")]
    Tls10,
    #[serde(rename = "TLS11")]
    Tls11,
    #[serde(rename = "TLS12")]
    Tls12,
    #[serde(rename = "TLS13")]
    Tls13,
}

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("cannot read the web config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the web config {path} is not valid: {source}")]
    Yaml {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("the web config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What the metrics endpoint enforces: TLS, basic auth, extra response headers. The default
/// is none of them (plain HTTP, as without `--web-config-file`).
#[derive(Default)]
pub struct WebSecurity {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub auth: Option<BasicAuth>,
    /// `http_server_config.headers`, added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl std::fmt::Debug for WebSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSecurity")
            .field("tls", &self.tls.is_some())
            .field(
                "basic_auth_users",
                &self.auth.as_ref().map(|a| a.users.len()),
            )
            .field("headers", &self.headers)
            .finish()
    }
}

impl WebSecurity {
    /// Reads and checks the file: certificates and keys are loaded, every hash is parsed, so a
    /// mistake stops the start (or a reload) with a sentence naming it.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: WebConfigFile = match text.trim() {
            // An empty file is an empty config, as in exporter-toolkit.
            "" => WebConfigFile::default(),
            _ => serde_yaml_ng::from_str(&text).map_err(|source| WebConfigError::Yaml {
                path: path.to_owned(),
                source,
            })?,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let invalid = |message: String| WebConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let tls = file
            .tls_server_config
            .map(|tls| tls_acceptor(&tls, base))
            .transpose()
            .map_err(invalid)?;
        let auth = file
            .basic_auth_users
            .filter(|users| !users.is_empty())
            .map(BasicAuth::new)
            .transpose()
            .map_err(invalid)?;
        let headers = file
            .http_server_config
            .map(|http| response_headers(&http.headers))
            .transpose()
            .map_err(invalid)?
            .unwrap_or_default();
        Ok(WebSecurity { tls, auth, headers })
    }

    /// `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        match self.tls {
            Some(_) => "https",
            None => "http",
        }
    }
}

/// The TLS acceptor the section describes.
fn tls_acceptor(tls: &TlsServerConfig, base: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    for (set, key, why) in [
        (
            tls.cipher_suites.is_some(),
            "cipher_suites",
            "connprobe uses rustls's cipher suites (AEAD only, forward secret)",
        ),
        (
            tls.curve_preferences.is_some(),
            "curve_preferences",
            "connprobe uses rustls's key exchange groups (X25519, P-256, P-384)",
        ),
        (
            tls.client_allowed_sans.is_some(),
            "client_allowed_sans",
            "connprobe trusts every client certificate that client_ca_file signed",
        ),
    ] {
        if set {
            return Err(format!(
                "tls_server_config.{key} is not supported: {why}; remove it"
            ));
        }
    }
    let resolve = |p: &Path| base.join(p);
    let certs: Vec<CertificateDer<'static>> = match (&tls.cert_file, &tls.cert) {
        (Some(_), Some(_)) => return Err("give cert_file or cert, not both".into()),
        (Some(file), None) => {
            let file = resolve(file);
            CertificateDer::pem_file_iter(&file)
                .and_then(|certs| certs.collect())
                .map_err(|e| format!("cannot read cert_file {}: {e}", file.display()))?
        }
        (None, Some(pem)) => CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot read cert: {e}"))?,
        (None, None) => return Err("tls_server_config needs cert_file (or cert)".into()),
    };
    if certs.is_empty() {
        return Err("the server certificate holds no PEM certificate".into());
    }
    let key: PrivateKeyDer<'static> = match (&tls.key_file, &tls.key) {
        (Some(_), Some(_)) => return Err("give key_file or key, not both".into()),
        (Some(file), None) => {
            let file = resolve(file);
            PrivateKeyDer::from_pem_file(&file)
                .map_err(|e| format!("cannot read key_file {}: {e}", file.display()))?
        }
        (None, Some(pem)) => PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("cannot read key: {e}"))?,
        (None, None) => return Err("tls_server_config needs key_file (or key)".into()),
    };

    let min = tls.min_version.unwrap_or(TlsVersion::Tls12);
    let max = tls.max_version.unwrap_or(TlsVersion::Tls13);
    if min < TlsVersion::Tls12 || max < TlsVersion::Tls12 {
        return Err(
            "TLS 1.0 and 1.1 are not supported (min_version and max_version may be \
                    TLS12 or TLS13)"
                .into(),
        );
    }
    if min > max {
        return Err("min_version is above max_version".into());
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
        (TlsVersion::Tls12, &rustls::version::TLS12),
        (TlsVersion::Tls13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (min..=max).contains(v))
    .map(|(_, p)| p)
    .collect();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let auth = tls.client_auth_type.unwrap_or_default();
    let builder = match auth {
        ClientAuthType::NoClientCert | ClientAuthType::RequestClientCert => {
            if tls.client_ca_file.is_some() && auth == ClientAuthType::NoClientCert {
                return Err(
                    "client_ca_file is set but client_auth_type is NoClientCert: set \
                            client_auth_type to RequireAndVerifyClientCert (or \
                            VerifyClientCertIfGiven)"
                        .into(),
                );
            }
            // A certificate that is requested but neither required nor verified proves
            // nothing: RequestClientCert serves like NoClientCert.
            builder.with_no_client_auth()
        }
        ClientAuthType::RequireAnyClientCert => {
            return Err(
                "client_auth_type RequireAnyClientCert (any certificate, unverified) is \
                        not supported: use RequireAndVerifyClientCert with client_ca_file"
                    .into(),
            );
        }
        ClientAuthType::VerifyClientCertIfGiven | ClientAuthType::RequireAndVerifyClientCert => {
            let Some(file) = &tls.client_ca_file else {
                return Err(format!("client_auth_type {auth:?} needs client_ca_file"));
            };
            let file = resolve(file);
            let mut roots = RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(&file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read client_ca_file {}: {e}", file.display()))?;
            let (added, _) = roots.add_parsable_certificates(cas);
            if added == 0 {
                return Err(format!(
                    "client_ca_file {} holds no usable CA certificate",
                    file.display()
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match auth {
                ClientAuthType::VerifyClientCertIfGiven => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("cannot use client_ca_file {}: {e}", file.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn response_headers(
    headers: &BTreeMap<String, String>,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    headers
        .iter()
        .map(|(name, value)| {
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                format!("http_server_config.headers: {name:?} is not a header name")
            })?;
            if matches!(
                header.as_str(),
                "content-type"
                    | "content-length"
                    | "www-authenticate"
                    | "allow"
                    | "connection"
                    | "transfer-encoding"
                    | "date"
            ) {
                return Err(format!(
                    "http_server_config.headers: {name} is set by connprobe itself"
                ));
            }
            let value = HeaderValue::from_str(value).map_err(|_| {
                format!("http_server_config.headers: the value of {name} is not a header value")
            })?;
            Ok((header, value))
        })
        .collect()
}

/// The most passwords remembered as checked; past it, the memory starts over.
const REMEMBERED: usize = 1024;

/// `basic_auth_users`: user -> bcrypt hash.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    /// Checked for unknown users, so that they take as long as known ones.
    decoy: String,
    /// SHA-256 digests of (user, password, hash) that checked out.
    remembered: Mutex<HashSet<[u8; 32]>>,
    /// bcrypt runs one check at a time: a flood of bad passwords takes one core at most.
    one_at_a_time: tokio::sync::Semaphore,
}

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Result<Self, String> {
        let mut cost = None;
        for (user, hash) in &users {
            if user.contains(':') {
                return Err(format!(
                    "basic_auth_users: the user name {user:?} has a colon"
                ));
            }
            let parts: bcrypt::HashParts = hash.parse().map_err(|_| {
                format!("basic_auth_users: the password of {user:?} is not a bcrypt hash")
            })?;
            cost = cost.max(Some(parts.get_cost()));
        }
        let cost = cost.unwrap_or(bcrypt::DEFAULT_COST);
        let decoy = bcrypt::hash_with_salt("connprobe decoy", cost, [0x5a; 16])
            .map_err(|e| format!("basic_auth_users: {e}"))?
            .format_for_version(bcrypt::Version::TwoB);
        Ok(BasicAuth {
            users,
            decoy,
            remembered: Mutex::new(HashSet::new()),
            one_at_a_time: tokio::sync::Semaphore::new(1),
        })
    }

    /// Whether an `Authorization` header names a user and their password.
    pub async fn allows(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = authorization.and_then(credentials) else {
            return false;
        };
        let known = self.users.get(&user);
        let hash = known.unwrap_or(&self.decoy).clone();
        let digest = remembered_digest(&user, &password, &hash);
        if known.is_some() && self.lock_remembered().contains(&digest) {
            return true;
        }
        let Ok(_permit) = self.one_at_a_time.acquire().await else {
            return false;
        };
        let checked = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        let allowed = checked && known.is_some();
        if allowed {
            let mut remembered = self.lock_remembered();
            if remembered.len() >= REMEMBERED {
                remembered.clear();
            }
            remembered.insert(digest);
        }
        allowed
    }

    fn lock_remembered(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.remembered.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// User and password of `Basic base64(user:password)`.
fn credentials(header: &HeaderValue) -> Option<(String, String)> {
    let text = header.to_str().ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn remembered_digest(user: &str, password: &str, hash: &str) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user, password, hash] {
        context.update(&(part.len() as u64).to_le_bytes());
        context.update(part.as_bytes());
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(context.finish().as_ref());
    digest
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// bcrypt (cost 4, to keep tests fast) of `secret`, as `htpasswd -nbBC 4 prometheus secret`
    /// would write it.
    pub(crate) const SECRET_HASH: &str =
        "$2y$04$W07sZl/wZ0HjJVPja1OfGOuxAk8FpsdCIVZLMjaayb/OdZfiogrsC";

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("connprobe-web-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn error(dir: &Path, yaml: &str) -> String {
        let path = write(dir, "web.yml", yaml);
        WebSecurity::load(&path).unwrap_err().to_string()
    }

    #[test]
    fn the_test_hash_is_bcrypt_of_secret() {
        assert!(bcrypt::verify("secret", SECRET_HASH).unwrap());
        assert!(!bcrypt::verify("Secret", SECRET_HASH).unwrap());
    }

    #[test]
    fn empty_and_auth_only_configs_load() {
        let dir = temp("plain");
        let empty = WebSecurity::load(&write(&dir, "empty.yml", "")).unwrap();
        assert!(empty.tls.is_none() && empty.auth.is_none());
        assert_eq!(empty.scheme(), "http");
        let yaml = format!("basic_auth_users:\n  prometheus: {SECRET_HASH}\n");
        let auth = WebSecurity::load(&write(&dir, "auth.yml", &yaml)).unwrap();
        assert!(auth.tls.is_none());
        assert_eq!(auth.auth.unwrap().users.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_without_effect_here_are_accepted() {
        let dir = temp("accepted");
        let yaml =
            format!("http_server_config:\n  http2: true\nbasic_auth_users:\n  p: {SECRET_HASH}\n");
        assert!(WebSecurity::load(&write(&dir, "web.yml", &yaml)).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mistakes_are_named() {
        let dir = temp("bad");
        let cases = [
            ("tls_server_config:\n  key_file: k.pem\n", "needs cert_file"),
            (
                "tls_server_config:\n  cert_file: nope.pem\n  key_file: k.pem\n",
                "cannot read cert_file",
            ),
            (
                "tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
                "cipher_suites is not supported",
            ),
            (
                "tls_srever_config: {}\n",
                "unknown field `tls_srever_config`",
            ),
            (
                "basic_auth_users:\n  prometheus: plain-text\n",
                "not a bcrypt hash",
            ),
            ("basic_auth_users: [a, b]\n", "is not valid"),
            (
                "http_server_config:\n  headers:\n    Content-Type: x\n",
                "set by connprobe itself",
            ),
            (
                "tls_server_config:\n  client_auth_type: Sometimes\n",
                "unknown variant",
            ),
            (":\n  - ][\n", "is not valid"),
        ];
        for (yaml, expected) in cases {
            let text = error(&dir, yaml);
            assert!(text.contains(expected), "{yaml:?}: {text}");
            assert!(text.starts_with("the web config "), "{text}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn header(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).unwrap()
    }

    fn basic(user: &str, password: &str) -> HeaderValue {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        header(&format!("Basic {encoded}"))
    }

    #[tokio::test]
    async fn basic_auth_checks_user_and_password() {
        let mut users = BTreeMap::new();
        users.insert("prometheus".to_string(), SECRET_HASH.to_string());
        let auth = BasicAuth::new(users).unwrap();
        assert!(auth.allows(Some(&basic("prometheus", "secret"))).await);
        // Remembered: the second time needs no bcrypt.
        assert_eq!(auth.lock_remembered().len(), 1);
        assert!(auth.allows(Some(&basic("prometheus", "secret"))).await);
        assert!(
            auth.allows(Some(&header("basic cHJvbWV0aGV1czpzZWNyZXQ=")))
                .await
        );
        for denied in [
            basic("prometheus", "Secret"),
            basic("prometheus", ""),
            basic("nobody", "secret"),
            basic("", ""),
            header("Bearer cHJvbWV0aGV1czpzZWNyZXQ="),
            header("Basic !!!"),
            header("Basic"),
            header("Basic cHJvbWV0aGV1cw=="),
        ] {
            assert!(!auth.allows(Some(&denied)).await, "{denied:?}");
        }
        assert!(!auth.allows(None).await);
        assert_eq!(auth.lock_remembered().len(), 1);
    }
}
