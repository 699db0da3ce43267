//! A private PostgreSQL server for tests: its own data directory, on a
//! free loopback port, run as the `postgres` user (it refuses root),
//! removed on drop. Needs Debian's postgresql package and root.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::wait_until;

pub struct Postgres {
    dir: PathBuf,
    child: Child,
    port: u16,
    bin: PathBuf,
    uid: u32,
    gid: u32,
}

/// The newest installed server's bin directory (`/usr/lib/postgresql/N/bin`).
pub fn find_postgres() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn postgres_user() -> Result<(u32, u32)> {
    let name = c"postgres";
    // SAFETY: getpwnam with a valid C string; the result is read at once,
    // before any other call that could overwrite its static buffer.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("no postgres user (apt install postgresql)");
    }
    // SAFETY: pw is non-null and points to a passwd record.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

impl Postgres {
    pub fn start() -> Result<Postgres> {
        let bin = find_postgres().context("no PostgreSQL server (apt install postgresql)")?;
        let (uid, gid) = postgres_user()?;
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("bgp4mesh-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        let data = dir.join("data");
        let out = Command::new(bin.join("initdb"))
            .args([
                "-D",
                &data.to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ])
            .uid(uid)
            .gid(gid)
            .current_dir(&dir)
            .output()
            .context("running initdb")?;
        ensure!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(dir.join("postgres.log"))?;
        std::os::unix::fs::chown(dir.join("postgres.log"), Some(uid), Some(gid))?;
        let mut command = Command::new(bin.join("postgres"));
        command
            .args(["-D", &data.to_string_lossy(), "-k", &dir.to_string_lossy()])
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-F"])
            .uid(uid)
            .gid(gid)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on the child; no
        // allocation between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().context("starting postgres")?;
        let pg = Postgres {
            dir,
            child,
            port,
            bin,
            uid,
            gid,
        };
        wait_until(
            Duration::from_secs(20),
            "PostgreSQL to accept connections",
            // Its port opens before it takes sessions ("the database
            // system is starting up"): pg_isready tells them apart.
            || {
                let ready = Command::new(pg.bin.join("pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                    .status()?
                    .success();
                ensure!(ready, "not accepting sessions yet");
                Ok(())
            },
        )?;
        Ok(pg)
    }

    /// A new, empty database, and its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        let out = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                name,
            ])
            .uid(self.uid)
            .gid(self.gid)
            .current_dir(&self.dir)
            .output()
            .context("running createdb")?;
        ensure!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(self.url(name))
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The URL through the server's Unix socket, which reaches it from
    /// inside any network namespace (its TCP port is the host's loopback).
    pub fn socket_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@localhost/{database}?host={}&port={}",
            self.dir.display(),
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, fine for a throwaway cluster.
        // SAFETY: kill with the pid of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
