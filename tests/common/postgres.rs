//! PostgreSQL for the tests: a temporary database on the tests' server (`scripts/postgres`
//! starts it; `scripts/setup` and `scripts/test` call it), or a private cluster (initdb +
//! pg_ctl) that a test can stop and start. Both are dropped afterwards. Nothing here skips:
//! without PostgreSQL the tests fail, saying what is missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the tests' server is, for creating temporary databases (trust auth as `postgres`):
/// `TEST_POSTGRES_ADMIN_URL`, else what `scripts/postgres` wrote when it started the server.
pub fn admin_url() -> String {
    if let Ok(url) = std::env::var("TEST_POSTGRES_ADMIN_URL") {
        return url;
    }
    let file = super::broker::cache_dir().join("postgres.url");
    match std::fs::read_to_string(&file) {
        Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
        _ => panic!(
            "the tests' PostgreSQL server is not running ({} is missing): scripts/postgres starts it \
             (scripts/setup and scripts/test do)",
            file.display()
        ),
    }
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qtAc", sql])
        .output()
        .expect("psql is needed by the PostgreSQL tests (Debian: postgresql-client)");
    assert!(
        out.status.success(),
        "psql {sql:?} failed (is PostgreSQL running at {url}?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Rows in `table`, 0 when it does not exist (yet: the sink migrates when it starts).
fn count(sql: impl Fn(&str) -> String, table: &str) -> usize {
    if sql(&format!("SELECT to_regclass('public.{table}') IS NOT NULL")) != "t" {
        return 0;
    }
    sql(&format!("SELECT count(*) FROM {table}")).parse().expect("a count")
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// A database created for one test on the machine's server, dropped at the end.
pub struct TempDb {
    name: String,
    admin: String,
}

impl TempDb {
    /// Creates it.
    pub fn create() -> Self {
        let admin = admin_url();
        let name = unique("metronome_test");
        psql(&admin, &format!("CREATE DATABASE {name}"));
        Self { name, admin }
    }

    /// Its URL with `query` (e.g. `sslmode=disable`) appended.
    pub fn url(&self, query: &str) -> String {
        let base = self.admin.rsplit_once('/').map_or(self.admin.as_str(), |(b, _)| b);
        let base = base.split('?').next().unwrap_or(base);
        if query.is_empty() {
            format!("{base}/{}", self.name)
        } else {
            format!("{base}/{}?{query}", self.name)
        }
    }

    /// Runs `sql`, returning psql's unaligned output.
    pub fn sql(&self, sql: &str) -> String {
        psql(&self.url(""), sql)
    }

    /// Rows in `table`; 0 while the sink has not created it yet.
    pub fn count(&self, table: &str) -> usize {
        count(|q| self.sql(q), table)
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([&self.admin, "-qtAc", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .output();
    }
}

/// The newest server installed from Debian's packages, or `TEST_POSTGRES_BIN`.
fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TEST_POSTGRES_BIN") {
        return dir.into();
    }
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, d)| d).unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into())
}

fn pg_bin(name: &str) -> PathBuf {
    let dir = pg_bin_dir();
    let path = dir.join(name);
    assert!(path.exists(), "{} is needed for the stop-and-restart test (Debian: postgresql)", path.display());
    path
}

/// Runs a PostgreSQL tool as the `postgres` user when this process is root (initdb refuses root).
fn as_postgres(tool: &Path, args: &[&str]) -> Command {
    let mut cmd;
    if is_root() {
        cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(tool);
    } else {
        cmd = Command::new(tool);
    }
    cmd.args(args);
    cmd
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// A private cluster in a temporary directory on a free port: stopped and started at will,
/// removed at the end.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    port: u16,
    running: bool,
    tls: bool,
}

impl PrivateCluster {
    /// initdb and start, TLS off.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// initdb and start with TLS on: a certificate for `localhost` signed by a test CA, whose
    /// certificate is at [`PrivateCluster::certificate`].
    pub fn start_with_tls() -> Self {
        Self::start_with(true)
    }

    /// The certificate of the CA that signed the server's (PEM), when started with TLS.
    pub fn certificate(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn start_with(tls: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("metronome-pg").tempdir().unwrap();
        if tls {
            // A CA, and a server certificate for localhost it signed: what sslrootcert trusts.
            let d = dir.path();
            std::fs::write(d.join("server.ext"), "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
            let steps: [&[&str]; 3] = [
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=metronome-test-ca",
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                ],
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=localhost",
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                ],
                &[
                    "x509",
                    "-req",
                    "-in",
                    "server.csr",
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    "server.ext",
                    "-out",
                    "server.crt",
                ],
            ];
            for args in steps {
                let out = Command::new("openssl")
                    .args(args)
                    .current_dir(d)
                    .output()
                    .expect("openssl is needed to make the test server's certificate");
                assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(ok.success());
        }
        let data = dir.path().join("data");
        let out = as_postgres(&pg_bin("initdb"), &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = super::broker::free_port();
        let mut cluster = Self { dir, port, running: false, tls };
        cluster.resume();
        psql(&cluster.admin_url(), "CREATE DATABASE metronome");
        cluster
    }

    fn admin_url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The `metronome` database's URL.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/metronome?sslmode=disable", self.port)
    }

    /// Runs `sql` in the `metronome` database.
    pub fn sql(&self, sql: &str) -> String {
        psql(&format!("postgresql://postgres@127.0.0.1:{}/metronome", self.port), sql)
    }

    /// Rows in `table`; 0 while the sink has not created it yet.
    pub fn count(&self, table: &str) -> usize {
        count(|q| self.sql(q), table)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_str().unwrap().to_owned()
    }

    /// Stops the server (fast: open transactions roll back, clients are cut off).
    pub fn stop(&mut self) {
        let out = as_postgres(&pg_bin("pg_ctl"), &["-D", &self.data(), "-m", "fast", "-w", "stop"]).output().unwrap();
        assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
        self.running = false;
    }

    /// Starts it again on the same port.
    pub fn resume(&mut self) {
        let mut options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        if self.tls {
            let d = self.dir.path().display();
            options.push_str(&format!(" -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"));
        }
        let log = self.dir.path().join("server.log");
        let out = as_postgres(
            &pg_bin("pg_ctl"),
            &["-D", &self.data(), "-o", &options, "-l", log.to_str().unwrap(), "-w", "start"],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.running = true;
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_postgres(&pg_bin("pg_ctl"), &["-D", &self.data(), "-m", "immediate", "-w", "stop"]).output();
        }
    }
}
