//! The command line with `serve --config FILE`: the file's settings become the flags'
//! defaults (see `config::file`), then the command line is parsed once more.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, FromArgMatches};

use super::{Cli, Command};
use crate::config::{ConfigFileError, FromFile, Rendered, apply_file, effective};

/// A parsed command line.
pub struct Parsed {
    /// What to run.
    pub cli: Cli,
    /// `serve --print-config`: the effective settings, to print instead of running.
    pub print_config: Option<String>,
}

/// Why the command line was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// A flag or an environment variable (or `--help` / `--version`).
    #[error(transparent)]
    Args(#[from] clap::Error),
    /// The settings file.
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// A value in the settings file that its flag's parser refused.
    #[error("`{key}` in {path}: {message}")]
    FileValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What the flag's parser said.
        message: String,
    },
}

impl ArgsError {
    /// Prints the error (or the help it carries) and ends the process as clap does.
    pub fn exit(self) -> ! {
        match self {
            Self::Args(e) => e.exit(),
            e => {
                eprintln!("error: {e}");
                std::process::exit(2)
            }
        }
    }
}

/// Parses `args` (program name first), reading `serve`'s settings file when
/// `--config` or `MILEPOST_CONFIG` names one.
pub fn parse_args<I, T>(args: I) -> Result<Parsed, ArgsError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = Cli::command();
    let first = cmd.clone().try_get_matches_from(&args)?;
    let mut from = FromFile::default();
    let config = first
        .subcommand_matches("serve")
        .and_then(|m| m.get_one::<PathBuf>("config"))
        .cloned();
    let matches = match config {
        Some(path) => {
            let (with_file, f) = apply_file(cmd, "serve", &path)?;
            cmd = with_file;
            from = f;
            cmd.clone()
                .try_get_matches_from(&args)
                .map_err(|e| blame_file(e, &cmd, &args, &from))?
        }
        None => first,
    };
    let cli = Cli::from_arg_matches(&matches)?;
    let print_config = matches!(&cli.command, Command::Serve(s) if s.print_config).then(|| {
        cmd.build();
        Rendered(&effective(&cmd, "serve", &matches, &from)).to_string()
    });
    Ok(Parsed { cli, print_config })
}

/// A value refused by its flag's parser names the file and key when it came from
/// the file (not given as a flag or in the environment).
fn blame_file(
    e: clap::Error,
    cmd: &clap::Command,
    args: &[OsString],
    from: &FromFile,
) -> ArgsError {
    let (Some(path), ErrorKind::InvalidValue | ErrorKind::ValueValidation) = (&from.path, e.kind())
    else {
        return e.into();
    };
    let Some(ContextValue::String(shown)) = e.get(ContextKind::InvalidArg) else {
        return e.into();
    };
    // "--max-devices <MAX_DEVICES>" → "max-devices"
    let long = shown
        .trim_start_matches('-')
        .split([' ', '='])
        .next()
        .unwrap_or_default();
    let Some(arg) = cmd
        .get_arguments()
        .chain(
            cmd.find_subcommand("serve")
                .into_iter()
                .flat_map(|s| s.get_arguments()),
        )
        .find(|a| a.get_long() == Some(long))
    else {
        return e.into();
    };
    let on_command_line = args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{long}") || a.starts_with(&format!("--{long}="))
    });
    let in_env = arg.get_env().is_some_and(|v| std::env::var_os(v).is_some());
    if on_command_line || in_env || !from.ids.contains(arg.get_id().as_str()) {
        return e.into();
    }
    let message = e.render().to_string();
    let message = message
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned();
    ArgsError::FileValue {
        path: path.clone(),
        key: long.to_owned(),
        message,
    }
}
