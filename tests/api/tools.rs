//! The external programs the black-box tests drive, installed by the tests
//! themselves on first use, so that `cargo test --release --locked` passes on a
//! machine where nobody ran `.ci/run`:
//!
//! - Python tools in pinned virtualenvs under `CARGO_TARGET_TMPDIR`
//!   (`target/tmp/milepost-tools/…`), made once and reused by later runs: a real S3
//!   server (moto), schemathesis and openapi-python-client, and the lake's readers
//!   (pyspark, polars, pyarrow). They need `python3` with its `venv` module.
//! - PostgreSQL's Python drivers (psycopg 3, asyncpg) in a virtualenv of their own.
//! - A Java runtime for Spark, Debian's headless Chromium for the console's
//!   browser tests, and psql (`postgresql-client`) and pgJDBC
//!   (`libpostgresql-jdbc-java`) for the PostgreSQL listener's,
//!   with `apt-get` when the tests run as root; otherwise the test fails naming the
//!   one command to run.
//!
//! A tool that cannot be had fails its test with the reason; no test passes without
//! the tool it names.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A virtualenv with pinned packages.
pub struct Venv {
    name: &'static str,
    packages: &'static [&'static str],
}

/// moto's S3 server; a virtualenv of its own (its dependencies and the others'
/// disagree).
pub const MOTO: Venv = Venv {
    name: "moto",
    packages: &["moto[server]==5.2.5"],
};

/// schemathesis, openapi-python-client and the lake's readers.
pub const PYTHON_TOOLS: Venv = Venv {
    name: "python-tools",
    packages: &[
        "schemathesis==4.32.5",
        "openapi-python-client==0.29.1",
        "pyspark==4.3.0",
        "polars==2.1.0",
        "pyarrow==26.0.1",
    ],
};

/// PostgreSQL's Python drivers, for the PostgreSQL listener's tests.
pub const PG_DRIVERS: Venv = Venv {
    name: "pg-drivers",
    packages: &["psycopg[binary]==3.3.9", "asyncpg==0.32.0"],
};

impl Venv {
    /// Its `bin/` directory, the virtualenv made and filled first if it is not yet.
    /// Tests in parallel (and test processes) wait on a file lock for the one that
    /// installs.
    pub fn bin(&self) -> PathBuf {
        let digest = hex::encode(&Sha256::digest(self.packages.join("\n").as_bytes())[..6]);
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("milepost-tools");
        let root = base.join(format!("{}-{digest}", self.name));
        let done = root.join(".installed");
        if done.exists() {
            return root.join("bin");
        }
        std::fs::create_dir_all(&base).unwrap();
        let lock = std::fs::File::create(base.join(format!("{}.lock", self.name))).unwrap();
        lock.lock().unwrap();
        if !done.exists() {
            self.install(&root);
            std::fs::File::create(&done)
                .and_then(|mut f| f.write_all(b"ok\n"))
                .unwrap();
        }
        root.join("bin")
    }

    fn install(&self, root: &Path) {
        eprintln!(
            "installing {} into {} (once; later runs reuse it)",
            self.packages.join(" "),
            root.display()
        );
        let venv = || {
            Command::new("python3")
                .args(["-m", "venv", "--clear"])
                .arg(root)
                .output()
        };
        let made = match venv() {
            Ok(o) if o.status.success() => true,
            // Debian's python3 without its venv module.
            Ok(_) if apt_install("python3-venv") => venv().is_ok_and(|o| o.status.success()),
            _ => false,
        };
        assert!(
            made,
            "cannot make a Python virtualenv at {}: install python3 with its venv module \
             (Debian: apt-get install python3-venv)",
            root.display()
        );
        let out = Command::new(root.join("bin/python3"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(self.packages)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pip install {} failed:\n{}",
            self.packages.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// pgJDBC (Debian's `libpostgresql-jdbc-java`), the PostgreSQL driver of the JVM's
/// BI tools, with a Java runtime to run it: the jar's path.
pub fn ensure_pgjdbc() -> PathBuf {
    ensure_java();
    let jar = PathBuf::from("/usr/share/java/postgresql.jar");
    if !jar.exists() {
        assert!(
            apt_install("libpostgresql-jdbc-java") && jar.exists(),
            "the PostgreSQL listener's JDBC test needs pgJDBC: apt-get install libpostgresql-jdbc-java"
        );
    }
    jar
}

/// A Java runtime (Spark, pgJDBC): on `PATH`, or installed with apt-get as root.
pub fn ensure_java() {
    let found = || {
        Command::new("java")
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found() {
        return;
    }
    assert!(
        apt_install("openjdk-17-jre-headless") && found(),
        "Spark and pgJDBC need a Java 17 runtime: apt-get install openjdk-17-jre-headless"
    );
}

/// psql (Debian's `postgresql-client`): on `PATH`, or installed with apt-get as
/// root.
pub fn ensure_psql() -> PathBuf {
    let found = || {
        Command::new("psql")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !found() {
        assert!(
            apt_install("postgresql-client") && found(),
            "the PostgreSQL listener's tests need psql: apt-get install postgresql-client"
        );
    }
    PathBuf::from("psql")
}

/// Debian's Chromium (the console's browser tests): on `PATH`, or installed with
/// apt-get as root.
pub fn ensure_chromium() -> PathBuf {
    let found = || {
        ["chromium", "chromium-browser"]
            .into_iter()
            .find_map(|name| {
                Command::new(name)
                    .arg("--version")
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|_| PathBuf::from(name))
            })
    };
    if let Some(p) = found() {
        return p;
    }
    assert!(
        apt_install("chromium"),
        "the console tests need a headless browser: apt-get install chromium"
    );
    found().expect("chromium installed but does not run")
}

/// `apt-get install -y PACKAGE` (after `apt-get update` if the first try fails),
/// when running as root; `false` when not root or it failed.
fn apt_install(package: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        return false;
    }
    // Tests run in parallel, and dpkg allows one install at a time: on a bare
    // machine the console tests' Chromium and Spark's Java were installed at once
    // and one apt-get failed on the lock. One at a time here, and apt waits for a
    // lock another process holds.
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = APT.lock().unwrap_or_else(|e| e.into_inner());
    let install = || {
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600", "install", "-y"])
            .args(["--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    install()
        || (Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600", "update"])
            .output()
            .is_ok_and(|o| o.status.success())
            && install())
}
