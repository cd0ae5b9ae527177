//! Backend tokens: who may call what.
//!
//! Tokens live in `backend-tokens.json` in the data directory, as SHA-256 hashes
//! only: the token itself is printed once by `milepost token create` and never
//! stored. A file, not a table, so that `milepost token …` works while the server
//! runs (the server holds the database) and the server sees a new or revoked token
//! on the next call: it re-reads the file when its modification time or size
//! changes. Tokens are 256 random bits, so a plain SHA-256 is the right hash
//! (a slow password hash protects guessable secrets, not random ones).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name in the data directory.
pub const TOKENS_FILE: &str = "backend-tokens.json";

/// What a token may do; each role includes the ones below it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read alerts, anomalies, the catalog.
    Viewer,
    /// Also change alerts, triage anomalies, run detection.
    Editor,
    /// Also change the sensor catalog and run jobs.
    Admin,
}

impl Role {
    /// As written in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Editor => "editor",
            Self::Admin => "admin",
        }
    }
}

/// One stored token (its hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEntry {
    /// Short id to name it by (`token revoke`), from the hash.
    pub id: String,
    /// Free text: who or what uses it.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

/// Who is calling: the token's name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Problems with the token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading or writing it failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// It is not valid JSON of the expected shape.
    #[error("{path} is not a valid token file: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No token with that id or name.
    #[error("no token has the id or name '{0}'")]
    Unknown(String),
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn read(path: &Path) -> Result<TokenFile, TokenError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| TokenError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
        Err(e) => Err(TokenError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Writes the file whole, readable by its owner only, replacing it atomically.
fn write(path: &Path, file: &TokenFile) -> Result<(), TokenError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| TokenError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let json = serde_json::to_vec_pretty(file).expect("token file serializes");
    f.write_all(&json).and_then(|_| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Edits of the token file (the `milepost token` commands).
pub struct TokenAdmin {
    path: PathBuf,
}

impl TokenAdmin {
    /// The token file of a data directory.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(TOKENS_FILE),
        }
    }

    /// Makes a token with `role`; returns it (the only time it is seen) and its entry.
    pub fn create(&self, role: Role, name: &str) -> Result<(String, TokenEntry), TokenError> {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        let token = format!(
            "mpt_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        let sha = hash(&token);
        let entry = TokenEntry {
            id: sha[..8].to_owned(),
            name: name.to_owned(),
            role,
            sha256: sha,
            created_at: crate::domain::Timestamp::now().to_string(),
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TokenError::Io {
                path: dir.to_owned(),
                source: e,
            })?;
        }
        let mut file = read(&self.path)?;
        file.tokens.push(entry.clone());
        write(&self.path, &file)?;
        Ok((token, entry))
    }

    /// Every token (hashes only).
    pub fn list(&self) -> Result<Vec<TokenEntry>, TokenError> {
        Ok(read(&self.path)?.tokens)
    }

    /// Removes the tokens whose id or name is `which`; at least one must match.
    pub fn revoke(&self, which: &str) -> Result<Vec<TokenEntry>, TokenError> {
        let mut file = read(&self.path)?;
        let (gone, kept): (Vec<_>, Vec<_>) = file
            .tokens
            .into_iter()
            .partition(|t| t.id == which || t.name == which);
        if gone.is_empty() {
            return Err(TokenError::Unknown(which.to_owned()));
        }
        file.tokens = kept;
        write(&self.path, &file)?;
        Ok(gone)
    }
}

/// The server's view of the token file, re-read when it changes.
pub struct Tokens {
    path: PathBuf,
    cache: Mutex<Cache>,
}

/// The token file as last read, and its modification time and size then.
#[derive(Default)]
struct Cache {
    stamp: Option<(SystemTime, u64)>,
    tokens: Vec<TokenEntry>,
}

impl Tokens {
    /// Tokens of a data directory.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(TOKENS_FILE),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The caller a bearer token belongs to, if any. A token file that has become
    /// unreadable keeps the last good set (and says so in the log).
    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.stamp != stamp {
            match read(&self.path) {
                Ok(f) => {
                    *cache = Cache {
                        stamp,
                        tokens: f.tokens,
                    }
                }
                Err(e) => tracing::warn!(error = %e, "keeping the previous backend tokens"),
            }
        }
        let sha = hash(token);
        cache
            .tokens
            .iter()
            .find(|t| t.sha256 == sha)
            .map(|t| Caller {
                name: if t.name.is_empty() {
                    t.id.clone()
                } else {
                    t.name.clone()
                },
                role: t.role,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_tokens_authenticate_until_revoked_and_only_hashes_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let admin = TokenAdmin::new(dir.path());
        let tokens = Tokens::new(dir.path());
        assert_eq!(tokens.authenticate("mpt_nothing"), None);
        let (token, entry) = admin.create(Role::Editor, "ci").unwrap();
        let caller = tokens.authenticate(&token).unwrap();
        assert_eq!(caller.role, Role::Editor);
        assert_eq!(caller.name, "ci");
        let text = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(
            !text.contains(&token),
            "the token itself must not be stored"
        );
        assert!(text.contains(&entry.sha256));
        // Another token, then revoke the first by id.
        let (other, _) = admin.create(Role::Viewer, "").unwrap();
        admin.revoke(&entry.id).unwrap();
        assert_eq!(tokens.authenticate(&token), None);
        assert_eq!(tokens.authenticate(&other).unwrap().role, Role::Viewer);
        assert!(matches!(admin.revoke("nope"), Err(TokenError::Unknown(_))));
        assert!(Role::Viewer < Role::Editor && Role::Editor < Role::Admin);
    }
}
