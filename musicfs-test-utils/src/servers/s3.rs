//! An S3 store on loopback: SeaweedFS's all-in-one `weed mini` with one
//! bucket and one credential, so every request a test makes is a real
//! SigV4-signed request (anonymous requests are refused).
//!
//! Objects are written through `rclone`'s S3 backend, a real client
//! independent of the code under test, with single-part PUTs (so an
//! object's ETag is the MD5 of its bytes, as for most user uploads).
//!
//! Invariants: `weed mini` runs every SeaweedFS component in one process,
//! each on its own port; all ten ports are picked free and passed
//! explicitly (the other gateways are off), its logs, unix sockets and data
//! stay in the fixture's temporary directory, except the gRPC unix sockets
//! that weed always puts in /tmp (named by port), which drop removes, and telemetry is off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::error::{IoContext, Result};
use crate::servers::process::{self, reserve_ports, start_with_retries, Slot, Spawned};
use crate::servers::tools::{rclone_binary, weed_binary};
use crate::servers::{check_key, fresh_secret, RemoteServer};

/// The rclone remote name the fixture configures through environment
/// variables (`RCLONE_CONFIG_MUSICFS_S3_*`).
pub const RCLONE_REMOTE: &str = "musicfs_s3";

/// The region the fixture's clients sign for.
pub const REGION: &str = "us-east-1";

/// The bucket [`S3Server::start`] creates.
pub const DEFAULT_BUCKET: &str = "music";

/// The bucket of the readiness probe object.
const PROBE_BUCKET: &str = "musicfs-fixture-probe";

/// The readiness probe object's content.
const PROBE_DATA: &[u8] = b"musicfs fixture probe";

/// Whether a launch is the server's first (no probe object yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launch {
    First,
    Again,
}

/// Names of the `weed mini` port flags; the S3 port is first.
const PORT_FLAGS: [&str; 10] = [
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
];

/// A SeaweedFS S3 server on 127.0.0.1, stopped and deleted on drop.
#[derive(Debug)]
pub struct S3Server {
    bucket: String,
    access_key: String,
    secret_key: String,
    /// Ports for [`PORT_FLAGS`], fixed after the first start.
    ports: Vec<u16>,
    weed: PathBuf,
    rclone: PathBuf,
    process: Slot,
    /// Data, config, logs; dropped after `process` (field order), so the
    /// server is dead before its files go.
    dir: TempDir,
}

impl S3Server {
    /// Starts a server with the bucket [`DEFAULT_BUCKET`].
    pub fn start() -> Result<S3Server> {
        Self::start_with_bucket(DEFAULT_BUCKET)
    }

    /// Starts a server with one (empty) bucket called `bucket`.
    pub fn start_with_bucket(bucket: &str) -> Result<S3Server> {
        let weed = weed_binary()?;
        let rclone = rclone_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("musicfs-s3-")
            .tempdir()
            .ctx(|| "creating the S3 server's temporary directory".to_string())?;
        for sub in ["data", "logs"] {
            std::fs::create_dir(dir.path().join(sub))
                .ctx(|| format!("creating {}/{sub}", dir.path().display()))?;
        }
        std::fs::write(dir.path().join("rclone.conf"), b"")
            .ctx(|| "writing an empty rclone.conf".to_string())?;
        let mut server = S3Server {
            bucket: bucket.to_string(),
            access_key: fresh_secret("AK"),
            secret_key: fresh_secret("SK"),
            ports: Vec::new(),
            weed,
            rclone,
            process: Slot::default(),
            dir,
        };
        server.write_identity()?;
        let p = start_with_retries(|| {
            server.ports = reserve_ports(PORT_FLAGS.len())?;
            server.launch(Launch::First)
        })?;
        server.process.set(p);
        Ok(server)
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The S3 endpoint's socket address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[0]))
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The region clients sign for.
    pub fn region(&self) -> &str {
        REGION
    }

    /// The access key id of the one identity the server accepts.
    pub fn access_key_id(&self) -> &str {
        &self.access_key
    }

    /// Its secret access key.
    pub fn secret_access_key(&self) -> &str {
        &self.secret_key
    }

    /// The AWS environment a client needs: `AWS_ENDPOINT_URL`,
    /// `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ENDPOINT_URL_S3", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", REGION.to_string()),
        ]
    }

    /// The environment that defines the rclone remote [`RCLONE_REMOTE`] for
    /// this server (for `rclone mount` in benchmarks and scripts).
    pub fn rclone_env(&self) -> Vec<(String, String)> {
        let p = format!("RCLONE_CONFIG_{}_", RCLONE_REMOTE.to_ascii_uppercase());
        let mut env: Vec<(String, String)> = [
            ("TYPE", "s3".to_string()),
            ("PROVIDER", "SeaweedFS".to_string()),
            ("ENV_AUTH", "false".to_string()),
            ("ENDPOINT", self.endpoint()),
            ("REGION", REGION.to_string()),
            ("ACCESS_KEY_ID", self.access_key.clone()),
            ("SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("FORCE_PATH_STYLE", "true".to_string()),
            ("NO_CHECK_BUCKET", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{p}{k}"), v))
        .collect();
        env.push((
            "RCLONE_CONFIG".to_string(),
            self.dir.path().join("rclone.conf").display().to_string(),
        ));
        env
    }

    /// `remote:bucket`, the rclone path of the bucket.
    pub fn rclone_bucket(&self) -> String {
        format!("{RCLONE_REMOTE}:{}", self.bucket)
    }

    /// An rclone command set up for this server (one attempt per
    /// operation: a fixture call fails at once rather than retrying).
    pub fn rclone(&self) -> Command {
        let mut c = Command::new(&self.rclone);
        c.envs(self.rclone_env())
            .args(["--retries", "1", "--low-level-retries", "1"]);
        c
    }

    /// The object's rclone path, `remote:bucket/key`.
    fn object(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(format!("{}/{key}", self.rclone_bucket()))
    }

    /// Uploads the local file `local` as `key` (single-part up to 5 GiB).
    pub fn put_file(&self, key: &str, local: &Path) -> Result<()> {
        let object = self.object(key)?;
        process::run(
            self.rclone()
                .args(["copyto", "--ignore-times", "--s3-upload-cutoff", "5G"])
                .arg(local)
                .arg(object),
        )
        .map(drop)
    }

    /// Every key under `prefix` ("" for all), sorted, through signed
    /// ListObjects calls.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = prefix.trim_end_matches('/');
        let remote = if prefix.is_empty() {
            self.rclone_bucket()
        } else {
            self.object(prefix)?
        };
        let out = process::run(
            self.rclone()
                .args(["lsf", "-R", "--files-only"])
                .arg(remote),
        )?;
        let mut keys: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .map(|l| super::join_key(prefix, l))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// The identities file: one identity that may do everything.
    fn write_identity(&self) -> Result<()> {
        let json = format!(
            r#"{{"identities":[{{"name":"musicfs-test","credentials":[{{"accessKey":"{}","secretKey":"{}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#,
            self.access_key, self.secret_key
        );
        let path = self.dir.path().join("s3.json");
        std::fs::write(&path, json).ctx(|| format!("writing {}", path.display()))
    }

    /// Starts `weed mini` on `self.ports` and waits until it serves
    /// objects: the S3 gateway answering is not enough, since reads fail
    /// with 500 until the volume server has registered its volumes with
    /// the master. So readiness is a signed GET of a probe object (in its
    /// own bucket, out of the tests' listings), written at the first start.
    fn launch(&self, launch: Launch) -> Result<Spawned> {
        let d = self.dir.path();
        let mut cmd = Command::new(&self.weed);
        cmd.arg(format!("-logdir={}", d.join("logs").display()))
            .arg("mini")
            .arg(format!("-dir={}", d.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]);
        for (flag, port) in PORT_FLAGS.iter().zip(&self.ports) {
            cmd.arg(format!("-{flag}={port}"));
        }
        cmd.args([
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
        ])
        .arg(format!("-bucket={},{PROBE_BUCKET}", self.bucket))
        .arg(format!("-s3.config={}", d.join("s3.json").display()))
        .arg(format!("-s3.localSocket={}", d.join("s3.sock").display()))
        .arg(format!(
            "-filer.localSocket={}",
            d.join("filer.sock").display()
        ));
        let mut p = Spawned::spawn("weed mini (S3)", cmd, &d.join("server.log"))?;
        let addr = self.addr();
        let bucket = self.rclone_bucket();
        let probe = format!("{RCLONE_REMOTE}:{PROBE_BUCKET}/probe");
        let mut written = launch == Launch::Again;
        p.wait_ready(|| {
            process::connect(addr)?;
            let step = |cmd: &mut Command, input: Option<&[u8]>| {
                process::run_with_input(cmd, input).map_err(|e| e.to_string())
            };
            if !written {
                step(self.rclone().arg("lsf").arg(&bucket), None)?;
                step(self.rclone().arg("rcat").arg(&probe), Some(PROBE_DATA))?;
                written = true;
            }
            let got = step(self.rclone().arg("cat").arg(&probe), None)?;
            if got == PROBE_DATA {
                Ok(())
            } else {
                Err(format!("the probe object reads as {got:?}"))
            }
        })?;
        Ok(p)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.process.stop();
        // weed names these by our gRPC ports, which it was the only one to
        // hold, so they are ours to remove.
        for (flag, port) in PORT_FLAGS.iter().zip(&self.ports) {
            if let Some(component) = flag.strip_suffix(".port.grpc") {
                let _ =
                    std::fs::remove_file(format!("/tmp/seaweedfs-{component}-grpc-{port}.sock"));
            }
        }
    }
}

impl RemoteServer for S3Server {
    fn protocol(&self) -> &'static str {
        "s3"
    }

    fn port(&self) -> u16 {
        self.ports[0]
    }

    /// One signed PutObject of the whole `data`.
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let object = self.object(key)?;
        process::run_with_input(
            self.rclone()
                // The whole input is buffered and sent as one PutObject.
                .args(["rcat", "--streaming-upload-cutoff", "5G"])
                .args(["--s3-upload-cutoff", "5G"])
                .arg(object),
            Some(data),
        )
        .map(drop)
    }

    /// A signed GetObject.
    fn fetch(&self, key: &str) -> Result<Vec<u8>> {
        let object = self.object(key)?;
        process::run(self.rclone().arg("cat").arg(object))
    }

    fn delete(&self, key: &str) -> Result<()> {
        let object = self.object(key)?;
        process::run(self.rclone().arg("deletefile").arg(object)).map(drop)
    }

    fn put_tree(&self, prefix: &str, local: &Path) -> Result<()> {
        let prefix = prefix.trim_end_matches('/');
        let remote = if prefix.is_empty() {
            self.rclone_bucket()
        } else {
            self.object(prefix)?
        };
        process::run(
            self.rclone()
                .args(["copy", "--ignore-times", "--transfers", "16"])
                .args(["--checkers", "8", "--s3-upload-cutoff", "5G"])
                // Every file is uploaded anyway (--ignore-times), so neither
                // a listing of the destination nor a HEAD after each upload
                // is needed: 10,000 small objects go up in a fraction of the
                // time.
                .args(["--no-check-dest", "--s3-no-head"])
                .arg(local)
                .arg(remote),
        )
        .map(drop)
    }

    fn stop(&self) -> Result<()> {
        self.process.stop();
        Ok(())
    }

    fn start_again(&self) -> Result<()> {
        self.process.start_again(|| self.launch(Launch::Again))
    }

    fn is_running(&self) -> bool {
        self.process.is_running()
    }

    fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
}
