//! `milepost.toml`: every `serve` setting in one file instead of forty flags.
//!
//! The file's keys are the flags' long names (`max-devices = 50000`; `max_devices`
//! works too). Its values become the flags' *defaults* before the command line is
//! parsed, so clap's own order does the rest: a flag beats its `MILEPOST_*` variable,
//! which beats the file, which beats the built-in default — and every value from the
//! file goes through the same parser as the flag. An unknown key is an error naming
//! the key and the file: a misspelt setting silently ignored is the worst kind of
//! configuration bug.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command};

/// Why a settings file was not used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read the settings file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path} is not valid TOML: {error}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Where and why (line and column included).
        error: Box<toml::de::Error>,
    },
    /// A key that is no setting of the command.
    #[error(
        "unknown setting `{key}` in {path} (the keys are the long flags of `milepost {command} --help` without the dashes, e.g. `max-devices`)"
    )]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key as written.
        key: String,
        /// The subcommand whose settings the file holds.
        command: String,
    },
    /// A value that is not a string, number, boolean or list of them.
    #[error("`{key}` in {path} must be a string, number, boolean or a list of them")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
}

/// Flags that are about the file itself, not settings it may hold.
const NOT_SETTINGS: &[&str] = &["config", "print_config", "help", "version"];

/// The arguments of `sub` (with the global ones of `cmd`) that a file may set.
fn settings_of<'a>(cmd: &'a Command, sub: &'a Command) -> impl Iterator<Item = &'a Arg> {
    sub.get_arguments()
        .chain(cmd.get_arguments().filter(|a| a.is_global_set()))
        .filter(|a| a.get_long().is_some() && !NOT_SETTINGS.contains(&a.get_id().as_str()))
}

/// The settings `apply_file` took from a file: the file and the argument ids.
#[derive(Debug, Clone, Default)]
pub struct FromFile {
    /// The file, if one was read.
    pub path: Option<PathBuf>,
    /// Ids of the arguments it set.
    pub ids: BTreeSet<String>,
}

/// Reads `path` and makes its values the defaults of `sub`'s flags in `cmd` (global
/// flags of `cmd` included). Returns the changed command and what the file set.
pub fn apply_file(
    mut cmd: Command,
    sub: &str,
    path: &Path,
) -> Result<(Command, FromFile), ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    let table: toml::Table = text.parse().map_err(|error| ConfigFileError::Syntax {
        path: path.to_owned(),
        error: Box::new(error),
    })?;
    let subcommand = cmd
        .find_subcommand(sub)
        .unwrap_or_else(|| panic!("no subcommand {sub}"))
        .clone();
    let mut from = FromFile {
        path: Some(path.to_owned()),
        ids: BTreeSet::new(),
    };
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = settings_of(&cmd, &subcommand).find(|a| a.get_long() == Some(&long)) else {
            return Err(ConfigFileError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
                command: sub.to_owned(),
            });
        };
        let id = arg.get_id().to_string();
        let global = arg.is_global_set();
        let values = scalars(value).ok_or_else(|| ConfigFileError::BadValue {
            path: path.to_owned(),
            key: key.clone(),
        })?;
        let set = move |a: Arg| a.default_values(values);
        cmd = if global {
            cmd.mut_arg(&id, set)
        } else {
            cmd.mut_subcommand(sub, |s| s.mut_arg(&id, set))
        };
        from.ids.insert(id);
    }
    Ok((cmd, from))
}

/// A TOML value as the strings clap parses (a list for a repeatable flag).
fn scalars(v: &toml::Value) -> Option<Vec<String>> {
    fn one(v: &toml::Value) -> Option<String> {
        match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            toml::Value::Datetime(d) => Some(d.to_string()),
            toml::Value::Array(_) | toml::Value::Table(_) => None,
        }
    }
    match v {
        toml::Value::Array(items) => items.iter().map(one).collect(),
        v => one(v).map(|s| vec![s]),
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The command line.
    Flag,
    /// This environment variable.
    Env(String),
    /// The settings file.
    File(PathBuf),
    /// The built-in default.
    Default,
    /// Not set anywhere (an optional setting).
    Unset,
}

/// One effective setting, as `--print-config` shows it.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The flag's long name (the file's key).
    pub key: String,
    /// Its value(s), secrets masked.
    pub values: Vec<String>,
    /// Whether the flag takes a list.
    pub list: bool,
    /// Where the value came from.
    pub origin: Origin,
}

/// The effective settings of subcommand `sub` parsed into `matches` (the root's
/// matches), in the order of `--help`.
pub fn effective(cmd: &Command, sub: &str, matches: &ArgMatches, from: &FromFile) -> Vec<Setting> {
    let (Some(subcommand), Some(m)) = (cmd.find_subcommand(sub), matches.subcommand_matches(sub))
    else {
        return Vec::new();
    };
    // `apply_file` re-adds the args it changes at the end; show them as `--help` does.
    // After `build`, the global flags are the subcommand's too: each once.
    let mut args: Vec<&Arg> = Vec::new();
    for a in settings_of(cmd, subcommand) {
        if !args.iter().any(|b| b.get_id() == a.get_id()) {
            args.push(a);
        }
    }
    args.sort_by_key(|a| (a.is_global_set(), a.get_display_order()));
    let mut out = Vec::new();
    for arg in args {
        let id = arg.get_id().as_str();
        let key = arg.get_long().unwrap_or(id).to_owned();
        // Global flags are parsed on the root (before the subcommand) or the
        // subcommand (after it); the root's matches hold them either way.
        let m = if arg.is_global_set() { matches } else { m };
        let values: Vec<String> = m
            .get_raw(id)
            .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let origin = match m.value_source(id) {
            _ if values.is_empty() => Origin::Unset,
            Some(ValueSource::CommandLine) => Origin::Flag,
            Some(ValueSource::EnvVariable) => Origin::Env(
                arg.get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            Some(ValueSource::DefaultValue) => match &from.path {
                Some(p) if from.ids.contains(id) => Origin::File(p.clone()),
                _ => Origin::Default,
            },
            _ => Origin::Default,
        };
        let list = arg.get_num_args().is_some_and(|n| n.max_values() > 1)
            || arg.get_value_delimiter().is_some();
        out.push(Setting {
            values: values.iter().map(|v| mask(&key, v)).collect(),
            key,
            list,
            origin,
        });
    }
    out
}

/// Hides what a printed setting must not show: API keys (the device binding of
/// `KEY@DEVICE` stays visible), and the password and query string of URLs
/// (credentials and SAS tokens live there).
fn mask(key: &str, value: &str) -> String {
    const HIDDEN: &str = "********";
    if key == "api-key" {
        return match value.split_once('@') {
            Some((_, device)) => format!("{HIDDEN}@{device}"),
            None => HIDDEN.to_owned(),
        };
    }
    let Some((scheme, rest)) = value.split_once("://") else {
        return value.to_owned();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, _)) => (r, format!("?{HIDDEN}")),
        None => (rest, String::new()),
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..host_end].rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            format!("{user}:{HIDDEN}@{host}{}", &rest[host_end..])
        }
        None => rest.to_owned(),
    };
    format!("{scheme}://{rest}{query}")
}

/// The settings as a TOML file that reproduces them, each line saying where its
/// value came from.
pub struct Rendered<'a>(pub &'a [Setting]);

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# Effective settings of `milepost serve`; after each, where it came from."
        )?;
        for s in self.0 {
            let origin = match &s.origin {
                Origin::Flag => "flag".to_owned(),
                Origin::Env(var) => format!("env {var}"),
                Origin::File(p) => format!("file {}", p.display()),
                Origin::Default => "default".to_owned(),
                Origin::Unset => {
                    writeln!(f, "# {} = (not set)", s.key)?;
                    continue;
                }
            };
            let quoted: Vec<String> = s.values.iter().map(|v| toml_value(v)).collect();
            let value = if s.list {
                format!("[{}]", quoted.join(", "))
            } else {
                quoted.join(", ")
            };
            writeln!(f, "{} = {value}  # {origin}", s.key)?;
        }
        Ok(())
    }
}

/// A value as TOML: numbers and booleans bare, anything else a quoted string.
fn toml_value(v: &str) -> String {
    if v == "true" || v == "false" || v.parse::<i64>().is_ok() {
        v.to_owned()
    } else {
        toml::Value::String(v.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_but_not_what_helps_to_read_them() {
        assert_eq!(mask("api-key", "s3cret"), "********");
        assert_eq!(mask("api-key", "s3cret@truck-1"), "********@truck-1");
        assert_eq!(
            mask("blob-store-url", "s3://bucket/trip"),
            "s3://bucket/trip"
        );
        assert_eq!(
            mask("blob-store-url", "https://me:pw@host:9000/x?sig=abc"),
            "https://me:********@host:9000/x?********"
        );
        assert_eq!(mask("listen", "0.0.0.0:8080"), "0.0.0.0:8080");
    }

    #[test]
    fn toml_values_become_flag_strings() {
        let t: toml::Table = "a = 1\nb = [\"x\", 2]\nc = true\nd = { e = 1 }"
            .parse()
            .unwrap();
        assert_eq!(scalars(&t["a"]), Some(vec!["1".to_owned()]));
        assert_eq!(scalars(&t["b"]), Some(vec!["x".to_owned(), "2".to_owned()]));
        assert_eq!(scalars(&t["c"]), Some(vec!["true".to_owned()]));
        assert_eq!(scalars(&t["d"]), None);
    }
}
