//! Writing PKI files safely: a reader (the gateway's hot reload, buildctl) sees either the old
//! file or the new one, never half of one, and a private key is never readable by anyone else,
//! not even for the instant between create and chmod.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::PkiError;

/// Mode of private key files.
pub const KEY_MODE: u32 = 0o600;
/// Mode of certificate files (public).
pub const CERT_MODE: u32 = 0o644;
/// Mode of directories the PKI creates.
pub const DIR_MODE: u32 = 0o700;

/// Writes `ca.pem`, `cert.pem` and `key.pem` (0600) into `out`, the layout
/// `buildctl --tlsdir` reads. Creates `out` (0700) if missing; refuses a non-directory.
pub fn write_tls_dir(
    out: &Path,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), PkiError> {
    ensure_dir(out)?;
    write_atomic(&out.join("ca.pem"), ca_pem.as_bytes(), CERT_MODE)?;
    write_atomic(&out.join("cert.pem"), cert_pem.as_bytes(), CERT_MODE)?;
    write_atomic(&out.join("key.pem"), key_pem.as_bytes(), KEY_MODE)
}

/// Creates `dir` and its missing parents with mode 0700; refuses a path that exists and is
/// not a directory.
pub fn ensure_dir(dir: &Path) -> Result<(), PkiError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => return Err(PkiError::NotADirectory { path: dir.into() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PkiError::Read {
                path: dir.into(),
                source,
            });
        }
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| PkiError::Write {
            path: dir.into(),
            source,
        })
}

/// Replaces `path` with `bytes`: written to a temporary file created with `mode`, synced,
/// renamed over `path`, and the directory synced so the rename survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.into(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let written = write_new(&tmp, bytes, mode).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// Reads a whole PEM file as text.
pub fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.into(),
        source,
    })
}

/// Warns when a private key file is readable or writable by anyone but its owner. Only
/// warns: the operator may have reasons, and refusing to start would not make it private.
pub fn warn_if_loose(key_path: &Path) {
    let Ok(meta) = fs::metadata(key_path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        let path = key_path.display();
        tracing::warn!(%path, mode = format_args!("{mode:o}"), "private key is accessible to other users");
    }
}

fn write_new(tmp: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    // A stale temporary from a crashed run may carry other permissions: start afresh.
    let _ = fs::remove_file(tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_tls_dir_has_the_buildctl_layout_and_a_private_key() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("certs/alice");
        write_tls_dir(&out, "CA\n", "CERT\n", "KEY\n").unwrap();
        let read = |f: &str| fs::read_to_string(out.join(f)).unwrap();
        assert_eq!(
            (read("ca.pem"), read("cert.pem"), read("key.pem")),
            ("CA\n".into(), "CERT\n".into(), "KEY\n".into())
        );
        assert_eq!(mode(&out.join("key.pem")), 0o600);
        assert_eq!(mode(&out), 0o700);
        assert_eq!(
            fs::read_dir(&out).unwrap().count(),
            3,
            "no temporary files left behind"
        );
    }

    #[test]
    fn rewriting_a_tls_dir_replaces_files_and_tightens_a_loose_key() {
        let tmp = tempfile::tempdir().unwrap();
        write_tls_dir(tmp.path(), "CA1", "CERT1", "KEY1").unwrap();
        fs::set_permissions(
            tmp.path().join("key.pem"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        write_tls_dir(tmp.path(), "CA2", "CERT2", "KEY2").unwrap();
        assert_eq!(
            fs::read_to_string(tmp.path().join("key.pem")).unwrap(),
            "KEY2"
        );
        assert_eq!(mode(&tmp.path().join("key.pem")), 0o600);
    }

    #[test]
    fn a_file_in_place_of_the_tls_dir_is_refused_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("tls");
        fs::write(&out, "mine").unwrap();
        let err = write_tls_dir(&out, "CA", "CERT", "KEY").unwrap_err();
        assert!(
            matches!(&err, PkiError::NotADirectory { path } if *path == out),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&out).unwrap(), "mine");
    }
}
