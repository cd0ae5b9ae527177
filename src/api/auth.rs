//! API keys for `POST /ingest`.
//!
//! Keys come from `--api-key` (repeatable, `KEY` or `KEY@DEVICE`), from a key file
//! (one per line, same syntax, `#` comments), or — when neither is configured — from
//! `<data-dir>/api-key`, generated with mode 0600 on first start. Only SHA-256 digests
//! are kept in memory and looked up by digest, so the time a check takes does not
//! depend on how much of a guessed key is right (no byte-wise comparison of keys).
//! Keys are never logged: errors show at most their first four characters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::domain::Device;

/// A key that authenticated, and the device it is bound to, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Readings sent with this key belong to this device.
    pub device: Option<Device>,
    /// Which key it was (the first bytes of its digest): per-key limits count by it.
    pub key: KeyId,
}

/// Names a configured key without holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub u64);

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable `Authorization` header.
    #[error("no credentials provided")]
    Missing,
    /// A key that is not configured.
    #[error("invalid api key")]
    Invalid,
}

/// Why a configured key was refused at start-up.
#[derive(Debug, thiserror::Error)]
pub enum KeyConfigError {
    /// Malformed key or device.
    #[error("invalid API key entry '{entry}': {reason}")]
    Entry {
        /// The entry, with the key masked.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// Key file unreadable or unwritable.
    #[error("cannot use API key file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The set of valid keys.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    by_digest: HashMap<[u8; 32], Option<Device>>,
}

/// Name of the generated key file inside the data directory.
pub const GENERATED_KEY_FILE: &str = "api-key";

impl ApiKeys {
    /// Builds the key set from configuration, generating a key in `data_dir` when
    /// nothing is configured.
    pub fn load(
        keys: &[String],
        key_file: Option<&Path>,
        data_dir: &Path,
    ) -> Result<Self, KeyConfigError> {
        let mut set = Self::default();
        for k in keys {
            set.add_entry(k)?;
        }
        if let Some(path) = key_file {
            set.add_file(path)?;
        }
        if set.by_digest.is_empty() {
            let path = data_dir.join(GENERATED_KEY_FILE);
            if !path.exists() {
                generate_key_file(&path)?;
                tracing::warn!(
                    path = %path.display(),
                    "no API key configured: generated one; devices authenticate with it as the Basic-auth username"
                );
            } else {
                tracing::info!(path = %path.display(), "using the API key generated on first start");
            }
            set.add_file(&path)?;
        }
        Ok(set)
    }

    /// Parses one `KEY` or `KEY@DEVICE` entry and adds it.
    pub fn add_entry(&mut self, entry: &str) -> Result<(), KeyConfigError> {
        let entry = entry.trim();
        let (key, device) = match entry.rsplit_once('@') {
            Some((k, d)) => (k, Some(d)),
            None => (entry, None),
        };
        let bad = |reason: &str| KeyConfigError::Entry {
            entry: mask(entry),
            reason: reason.to_owned(),
        };
        if key.is_empty() {
            return Err(bad("the key is empty"));
        }
        if key
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(bad("keys cannot contain ':', spaces or control characters"));
        }
        let device = device
            .map(|d| Device::parse(d).map_err(|e| bad(&e.to_string())))
            .transpose()?;
        self.by_digest.insert(digest(key), device);
        Ok(())
    }

    fn add_file(&mut self, path: &Path) -> Result<(), KeyConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyConfigError::File {
            path: path.to_owned(),
            source: e,
        })?;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                self.add_entry(line)?;
            }
        }
        Ok(())
    }

    /// Number of valid keys.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// True when no key is valid.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Checks the `Authorization` header value of a request.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Grant, AuthError> {
        let key = extract_key(authorization.ok_or(AuthError::Missing)?)?;
        let digest = digest(&key);
        self.by_digest
            .get(&digest)
            .map(|device| Grant {
                device: device.clone(),
                key: KeyId(u64::from_le_bytes(
                    digest[..8].try_into().expect("8 of 32 bytes"),
                )),
            })
            .ok_or(AuthError::Invalid)
    }
}

/// The valid keys, swappable at run time: [`KeyRing::reload`] (on SIGHUP) reads the
/// configured sources again, so keys rotate without a restart. A failed reload keeps
/// the keys in use.
#[derive(Debug)]
pub struct KeyRing {
    current: std::sync::RwLock<std::sync::Arc<ApiKeys>>,
    keys: Vec<String>,
    key_file: Option<PathBuf>,
    data_dir: PathBuf,
}

impl KeyRing {
    /// Loads the keys as [`ApiKeys::load`] does and remembers where they came from.
    pub fn load(
        keys: &[String],
        key_file: Option<&Path>,
        data_dir: &Path,
    ) -> Result<Self, KeyConfigError> {
        let ring = Self {
            current: std::sync::RwLock::default(),
            keys: keys.to_vec(),
            key_file: key_file.map(Path::to_owned),
            data_dir: data_dir.to_owned(),
        };
        ring.reload()?;
        Ok(ring)
    }

    /// Reads the key sources again; returns how many keys are now valid.
    pub fn reload(&self) -> Result<usize, KeyConfigError> {
        let fresh = ApiKeys::load(&self.keys, self.key_file.as_deref(), &self.data_dir)?;
        let n = fresh.len();
        *self.current.write().expect("key lock") = std::sync::Arc::new(fresh);
        Ok(n)
    }

    /// The key file generated on first start, when no key is configured (the keys
    /// then come from it).
    pub fn generated_file(&self) -> Option<PathBuf> {
        let path = self.data_dir.join(GENERATED_KEY_FILE);
        (self.keys.is_empty() && self.key_file.is_none() && path.exists()).then_some(path)
    }

    /// [`ApiKeys::authenticate`] against the keys in use now.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Grant, AuthError> {
        self.current
            .read()
            .expect("key lock")
            .authenticate(authorization)
    }
}

/// The key in `Basic` (the username, as seed devices send it; the password when the
/// username is empty) or `Bearer` credentials.
fn extract_key(header: &str) -> Result<String, AuthError> {
    let (scheme, rest) = header.trim().split_once(' ').ok_or(AuthError::Missing)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return if rest.is_empty() {
            Err(AuthError::Missing)
        } else {
            Ok(rest.to_owned())
        };
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::Missing);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .map_err(|_| AuthError::Invalid)?;
    let decoded = String::from_utf8(decoded).map_err(|_| AuthError::Invalid)?;
    let (user, pass) = decoded.split_once(':').unwrap_or((&decoded, ""));
    match (user.is_empty(), pass.is_empty()) {
        (false, _) => Ok(user.to_owned()),
        (true, false) => Ok(pass.to_owned()),
        (true, true) => Err(AuthError::Missing),
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Shows at most the first four characters of a key.
pub fn mask(entry: &str) -> String {
    let prefix: String = entry.chars().take(4).collect();
    format!("{prefix}…")
}

fn generate_key_file(path: &Path) -> Result<(), KeyConfigError> {
    use std::io::Write as _;
    let mut bytes = [0u8; 24];
    rand::fill(&mut bytes);
    let key = format!(
        "mp_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let io = |source| KeyConfigError::File {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(io)?;
    writeln!(
        f,
        "# Milepost API key, generated on first start. Devices send it as the HTTP Basic\n\
         # username (curl -u \"$KEY:\") or as `Authorization: Bearer $KEY`.\n{key}"
    )
    .map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, pass: &str) -> String {
        let raw = format!("{user}:{pass}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    #[test]
    fn basic_username_and_bearer_are_accepted() {
        let mut keys = ApiKeys::default();
        keys.add_entry("secret").unwrap();
        keys.add_entry("truckkey@truck-1").unwrap();
        assert_eq!(
            keys.authenticate(Some(&basic("secret", "")))
                .unwrap()
                .device,
            None
        );
        assert_eq!(
            keys.authenticate(Some(&basic("", "secret")))
                .unwrap()
                .device,
            None
        );
        assert_eq!(
            keys.authenticate(Some("Bearer secret")).unwrap().device,
            None
        );
        let g = keys.authenticate(Some("bearer truckkey")).unwrap();
        assert_eq!(g.device.unwrap().as_str(), "truck-1");
        assert_eq!(keys.authenticate(None), Err(AuthError::Missing));
        assert_eq!(keys.authenticate(Some("Digest x")), Err(AuthError::Missing));
        assert_eq!(
            keys.authenticate(Some(&basic("nope", ""))),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            keys.authenticate(Some("Basic !!!")),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn bad_entries_are_refused_without_echoing_the_key() {
        let mut keys = ApiKeys::default();
        let e = keys
            .add_entry("abcdefgh@bad device")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("abcdefgh"), "{e}");
        assert!(keys.add_entry("a:b").is_err());
        assert!(keys.add_entry("@dev").is_err());
    }

    #[test]
    fn generates_a_private_key_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = ApiKeys::load(&[], None, dir.path()).unwrap();
        assert_eq!(a.len(), 1);
        let path = dir.path().join(GENERATED_KEY_FILE);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let key = text.lines().last().unwrap();
        let b = ApiKeys::load(&[], None, dir.path()).unwrap();
        assert!(b.authenticate(Some(&format!("Bearer {key}"))).is_ok());
        // A configured key replaces the generated one.
        let c = ApiKeys::load(&["other".into()], None, dir.path()).unwrap();
        assert!(c.authenticate(Some(&format!("Bearer {key}"))).is_err());
    }
}
