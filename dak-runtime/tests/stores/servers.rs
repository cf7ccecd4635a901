//! redis-servers of a test's own: plain, with TLS, or three forming a Cluster.
//! They fail the test when they cannot start: nothing here skips.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A redis-server, killed when dropped, with its directory.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `redis-server` on 127.0.0.1 with `args`, its files in `dir`.
pub fn start(dir: &Path, args: &[&str]) -> Server {
    Server(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--dir", dir.to_str().unwrap()])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs it)"),
    )
}

/// Runs a command that must succeed, e.g. `openssl`.
pub fn run(program: &str, args: &[&str], dir: &Path) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connects to `target` once the server answers, failing after 20 s.
pub async fn connect(target: &dak_runtime::redis::Target) -> dak_runtime::redis::Connection {
    let mut last = None;
    for _ in 0..100 {
        match dak_runtime::redis::connect_to(target).await {
            Ok(conn) => return conn,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("redis at {target:?} did not answer: {last:?}");
}

/// A test certificate authority, and certificates it signed, made with the
/// `openssl` command in `dir`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        let dir = dir.to_owned();
        run(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=dak test CA",
            ],
            &dir,
        );
        Self { dir }
    }

    /// Signs a certificate for `name` (valid for 127.0.0.1 and localhost);
    /// returns the paths of the certificate and its key.
    pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key, csr, ext) = (
            format!("{name}.pem"),
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.ext"),
        );
        std::fs::write(
            self.dir.join(&ext),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        run(
            "openssl",
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
            &self.dir,
        );
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
            &self.dir,
        );
        (self.dir.join(cert), self.dir.join(key))
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

/// A Redis Cluster of three primaries (`scripts/engines/redis-cluster`),
/// stopped when dropped.
pub struct Cluster {
    script: Child,
    /// The nodes' `redis://` (or `rediss://`) URLs.
    pub urls: Vec<String>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// `tls`: the nodes serve TLS only, with a certificate [`Cluster::ca`]
    /// signed.
    pub fn start(tls: bool) -> Self {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let mut script = Command::new(repo_path("scripts/engines/redis-cluster"))
            .arg(dir.path())
            .args(tls.then_some("tls"))
            // A group of its own, which Drop stops with the nodes in it.
            .process_group(0)
            .stdout(Stdio::piped())
            .spawn()
            .expect("scripts/engines/redis-cluster");
        let mut line = String::new();
        std::io::BufReader::new(script.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let cluster = Self {
            script,
            urls: line.trim().split(',').map(str::to_owned).collect(),
            dir,
        };
        assert!(
            cluster.urls.len() == 3,
            "the Redis Cluster did not start: {line:?}"
        );
        cluster
    }

    /// The CA of the nodes' certificates, with TLS.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("tls/ca.pem")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let group = format!("-{}", self.script.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.script.wait();
    }
}

/// A file of the repository. The package's directory comes from the variable
/// cargo sets when it runs the test, not from `env!`: a test binary that cargo
/// reuses from a build in another checkout (the same `CARGO_TARGET_DIR`,
/// unchanged sources) would otherwise look for the file in that checkout.
pub fn repo_path(relative: &str) -> std::path::PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    package.join("..").join(relative)
}
