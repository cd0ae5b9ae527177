//! `milepost serve --config FILE`: precedence, refusals, `--print-config`, and the
//! example files in `dist/`, with the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use milepost::bench::process::ServerProcess;

use crate::helpers::*;

fn milepost() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_milepost"));
    // The machine's own settings must not leak into what is checked.
    for (k, _) in std::env::vars() {
        if k.starts_with("MILEPOST_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// `serve --print-config` with these extra arguments and environment: (key → (value
/// as printed, origin as printed)).
fn print_config(args: &[&str], env: &[(&str, &str)]) -> Vec<(String, String, String)> {
    let out = milepost()
        .args(["serve", "--print-config"])
        .args(args)
        .envs(env.iter().copied())
        .output_within_limit();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (kv, origin) = l.rsplit_once("  # ").expect("origin after the value");
            let (k, v) = kv.split_once(" = ").expect("key = value");
            (k.to_owned(), v.to_owned(), origin.to_owned())
        })
        .collect()
}

fn setting<'a>(all: &'a [(String, String, String)], key: &str) -> (&'a str, &'a str) {
    let (_, v, o) = all
        .iter()
        .find(|(k, _, _)| k == key)
        .unwrap_or_else(|| panic!("{key} not printed"));
    (v, o)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "milepost.toml",
        "threads = 3\nmemory-limit = \"96MB\"\nmax_devices = 5000\nlog-format = \"json\"\n\
         api-key = [\"sekrit\", \"truck-key@truck-1\"]\n",
    );
    let file = file.to_str().unwrap();
    let all = print_config(
        &["--config", file, "--memory-limit", "64MB"],
        &[("MILEPOST_THREADS", "4"), ("MILEPOST_MEMORY_LIMIT", "80MB")],
    );
    assert_eq!(setting(&all, "memory-limit"), ("\"64MB\"", "flag"));
    assert_eq!(setting(&all, "threads"), ("4", "env MILEPOST_THREADS"));
    let from_file = format!("file {file}");
    assert_eq!(setting(&all, "max-devices"), ("5000", from_file.as_str()));
    assert_eq!(
        setting(&all, "log-format"),
        ("\"json\"", from_file.as_str())
    );
    assert_eq!(setting(&all, "queue-capacity"), ("64", "default"));
    // Keys are masked, the device a key is bound to is not.
    let (keys, _) = setting(&all, "api-key");
    assert_eq!(keys, "[\"********\", \"********@truck-1\"]");

    // MILEPOST_CONFIG names the file as well as --config does.
    let all = print_config(&[], &[("MILEPOST_CONFIG", file)]);
    assert_eq!(setting(&all, "threads"), ("3", from_file.as_str()));
}

#[test]
fn a_bad_file_stops_the_server_naming_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |text: &str| {
        let file = write(dir.path(), "bad.toml", text);
        let out = milepost()
            .args(["serve", "--config"])
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output_within_limit();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            !dir.path().join("data").exists(),
            "nothing started before the refusal"
        );
        String::from_utf8(out.stderr).unwrap()
    };
    let err = refused("max-devicez = 10\n");
    assert!(
        err.contains("unknown setting `max-devicez`") && err.contains("bad.toml"),
        "{err}"
    );
    let err = refused("max-devices = \"lots\"\n");
    assert!(
        err.contains("`max-devices` in") && err.contains("bad.toml") && err.contains("lots"),
        "{err}"
    );
    let err = refused("threads = \n");
    assert!(
        err.contains("not valid TOML") && err.contains("line 1"),
        "{err}"
    );
    let err = refused("[serve]\nthreads = 2\n");
    assert!(err.contains("`serve`"), "{err}");
    let err = refused("print-config = true\n");
    assert!(err.contains("unknown setting `print-config`"), "{err}");
}

#[tokio::test]
async fn the_server_runs_with_the_files_settings() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "milepost.toml",
        "api-key = [\"from-the-file\"]\ndefault-device = \"truck-1\"\n",
    );
    let exe = Path::new(env!("CARGO_BIN_EXE_milepost"));
    let server = ServerProcess::start(
        exe,
        &dir.path().join("data"),
        &["--config", file.to_str().unwrap()],
        false,
    )
    .expect("starts");
    let client = reqwest::Client::new();
    let body = format!(
        "{}\n",
        dline("truck-1", "speed", 42.0, "2026-01-05T10:00:00Z")
    );
    let status = |key: &'static str| {
        let (client, url, body) = (
            client.clone(),
            format!("{}/ingest", server.base),
            body.clone(),
        );
        async move {
            client
                .post(url)
                .basic_auth(key, None::<&str>)
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status("from-the-file").await, 200);
    assert_eq!(status(KEY).await, 401);
    // Reads without `?device=` are about the file's default device.
    let v = get_json(&client, &format!("{}/api/v1/sensors", server.base)).await;
    assert_eq!(sensor_entry(&v, "speed")["readings"], 1, "{v}");
}

/// Every key of `milepost serve` appears in each example file, and every line of
/// theirs, commented out or not, is a setting the server takes.
#[test]
fn the_example_files_name_every_setting_and_each_example_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let keys: Vec<String> = print_config(&[], &[])
        .into_iter()
        .map(|(k, _, _)| k)
        .chain(unset_keys())
        .collect();
    assert!(keys.len() > 40, "{keys:?}");
    for example in ["dist/milepost.toml", "dist/kustomize/milepost.toml"] {
        let text = std::fs::read_to_string(root.join(example)).unwrap();
        for k in &keys {
            assert!(
                text.lines()
                    .any(|l| l.trim_start_matches("# ").starts_with(&format!("{k} = "))),
                "{example} does not mention `{k}`"
            );
        }
        // Uncommented, each example line must load (the last of a key wins).
        let dir = tempfile::tempdir().unwrap();
        let mut all = std::collections::BTreeMap::new();
        for l in text.lines() {
            let l = l.trim_start_matches("# ");
            if let Some((k, _)) = l.split_once(" = ")
                && keys.iter().any(|key| key == k)
            {
                all.insert(k.to_owned(), l.to_owned());
            }
        }
        let file = write(
            dir.path(),
            "all.toml",
            &all.into_values().collect::<Vec<_>>().join("\n"),
        );
        let printed = print_config(&["--config", file.to_str().unwrap()], &[]);
        assert!(printed.len() >= keys.len(), "{example}: {printed:?}");
        // The file as written loads too.
        print_config(&["--config", root.join(example).to_str().unwrap()], &[]);
    }
}

/// Keys `--print-config` shows as not set (`# key = (not set)`).
fn unset_keys() -> Vec<String> {
    let out = milepost()
        .args(["serve", "--print-config"])
        .output_within_limit();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# ")?.strip_suffix(" = (not set)"))
        .map(str::to_owned)
        .collect()
}

/// What the server and the CLI print to a file or a pipe is text, not terminal
/// escape codes (systemd, `docker logs` and log shippers store them as they are).
#[test]
fn logs_and_errors_written_to_a_pipe_have_no_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    // Starts, logs at info, then fails on the blob store URL and logs the error.
    let out = milepost()
        .args(["serve", "--listen", "127.0.0.1:0", "--backend-addr", "off"])
        .args(["--blob-store-url", "bogus://nowhere", "--data-dir"])
        .arg(dir.path())
        .output_within_limit();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ERROR") && stderr.contains("bogus"),
        "{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "escape codes in {stderr:?}");
    // A command-line error.
    let out = milepost()
        .args(["serve", "--threads", "many"])
        .output_within_limit();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("many") && !stderr.contains('\x1b'),
        "{stderr:?}"
    );
}
