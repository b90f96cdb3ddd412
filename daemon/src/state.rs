//! Durable state under `--state-dir`: the private key and the node settings.
//!
//! Every write goes to a fresh temp file that is fsynced, renamed over the
//! old file, and followed by an fsync of the directory, so a crash or power
//! cut leaves either the old file or the new one, never a torn one. A file
//! that exists but does not parse is an error that names the file: the
//! private key is never regenerated behind the user's back.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::uapi::proto::Key;

const KEY_FILE: &str = "private.key";
const SETTINGS_FILE: &str = "settings.json";
const PEERS_FILE: &str = "peers.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use state directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "{path} is corrupt ({reason}). Restore it from a backup; or, to start over with a new \
         identity that every peer must then be given, move it aside and restart"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// Settings that survive restarts. Flags given on the command line override
/// them and are then saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This node's tunnel addresses: at most one IPv4 and one IPv6.
    pub addresses: Vec<IpNet>,
    pub listen_port: u16,
    #[serde(default)]
    pub advertised_routes: Vec<IpNet>,
    /// Whether a default route may be advertised.
    #[serde(default)]
    pub exit_node: bool,
    #[serde(default = "enabled")]
    pub snat: bool,
    #[serde(default = "enabled")]
    pub mss_clamp: bool,
    /// HOST:PORT that client configs point at.
    #[serde(default)]
    pub public_endpoint: Option<String>,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
}

fn enabled() -> bool {
    true
}

fn default_mtu() -> u32 {
    crate::daemon::DEFAULT_MTU
}

impl Settings {
    pub fn new(addresses: Vec<IpNet>, listen_port: u16) -> Settings {
        Settings {
            addresses,
            listen_port,
            advertised_routes: Vec::new(),
            exit_node: false,
            snat: true,
            mss_clamp: true,
            public_endpoint: None,
            mtu: default_mtu(),
        }
    }
}

/// A peer as saved on disk. Keys are base64, as `wg` prints them.
#[derive(Clone, Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
pub struct StoredPeer {
    #[serde(default)]
    pub name: Option<String>,
    pub public_key: String,
    /// The client's private key, when `vpcgate peer add` generated it, so
    /// that `vpcgate peer config` can print the config again.
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub preshared_key: Option<String>,
    #[serde(default)]
    #[zeroize(skip)]
    pub endpoint: Option<std::net::SocketAddr>,
    #[serde(default)]
    pub persistent_keepalive: u16,
    #[serde(default)]
    #[zeroize(skip)]
    pub allowed_ips: Vec<IpNet>,
    #[serde(default)]
    pub accept_routes: bool,
    #[serde(default)]
    pub accept_default_route: bool,
    /// Routes learned from this peer (accept-routes), so they are back at
    /// once after a restart, before the peer answers again.
    #[serde(default)]
    #[zeroize(skip)]
    pub learned_routes: Vec<IpNet>,
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating if needed) the directory and makes it 0700.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let err = |source| StateError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
        remove_stale_temp_files(dir);
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Loads the private key, generating and saving one only if the file does
    /// not exist at all. Returns whether it was generated.
    pub fn load_or_create_key(&self) -> Result<(Key, bool), StateError> {
        let path = self.path(KEY_FILE);
        match read_optional(&path)? {
            Some(text) => Ok((parse_key_file(&text).map_err(|e| corrupt(path, e))?, false)),
            None => {
                let key = generate_key();
                self.save_key(&key)?;
                Ok((key, true))
            }
        }
    }

    /// Loads the private key if one was saved; a plain interface starts
    /// without one, as wireguard-go does, until `wg` sets it.
    pub fn load_key(&self) -> Result<Option<Key>, StateError> {
        let path = self.path(KEY_FILE);
        match read_optional(&path)? {
            Some(text) => Ok(Some(parse_key_file(&text).map_err(|e| corrupt(path, e))?)),
            None => Ok(None),
        }
    }

    pub fn save_key(&self, key: &Key) -> Result<(), StateError> {
        write_atomic(&self.path(KEY_FILE), encode_key_file(key).as_bytes())
    }

    pub fn load_settings(&self) -> Result<Option<Settings>, StateError> {
        let path = self.path(SETTINGS_FILE);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        parse_settings(&text)
            .map(Some)
            .map_err(|e| corrupt(path, e))
    }

    pub fn load_peers(&self) -> Result<Vec<StoredPeer>, StateError> {
        let path = self.path(PEERS_FILE);
        let Some(text) = read_optional(&path)? else {
            return Ok(Vec::new());
        };
        parse_peers(&text).map_err(|e| corrupt(path, e))
    }

    /// See [`encode_peers`] for how the keys in it are kept from leaking.
    pub fn save_peers(&self, peers: &[StoredPeer]) -> Result<(), StateError> {
        let path = self.path(PEERS_FILE);
        let json = encode_peers(peers).map_err(|source| StateError::Write {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &json)
    }

    pub fn save_settings(&self, settings: &Settings) -> Result<(), StateError> {
        let path = self.path(SETTINGS_FILE);
        let json = encode_settings(settings).map_err(|source| StateError::Write {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &json)
    }
}

// The parsers and encoders below are the loader's and the saver's only
// steps between bytes and values. They are pure, so the fuzz targets and
// their corpus replay exercise exactly what a start-up or a reload runs.

/// Parses the contents of `private.key`: one base64 key, surrounding
/// whitespace allowed. The error is the reason the file is corrupt.
pub fn parse_key_file(text: &str) -> Result<Key, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("the file is empty".into());
    }
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(trimmed)
            .map_err(|_| "not base64".to_string())?,
    );
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| "not a 32-byte key".to_string())?;
    let key = Key(key);
    if key.is_zero() {
        return Err("the key is all zeros".into());
    }
    Ok(key)
}

/// What `save_key` writes. Room for the newline is made up front: growing
/// the string would free a copy of the key.
pub fn encode_key_file(key: &Key) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::with_capacity(45));
    base64::engine::general_purpose::STANDARD.encode_string(key.0, &mut text);
    text.push('\n');
    text
}

/// Parses the contents of `settings.json`.
pub fn parse_settings(text: &str) -> Result<Settings, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// What `save_settings` writes.
pub fn encode_settings(settings: &Settings) -> io::Result<Vec<u8>> {
    let mut json = serde_json::to_vec_pretty(settings).map_err(io::Error::other)?;
    json.push(b'\n');
    Ok(json)
}

/// Parses the contents of `peers.json`.
pub fn parse_peers(text: &str) -> Result<Vec<StoredPeer>, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// What `save_peers` writes. It holds generated clients' private keys and
/// preshared keys, so it is serialised into a buffer of its final size (a
/// growing one would free copies), zeroized when dropped.
pub fn encode_peers(peers: &[StoredPeer]) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut size = ByteCount(0);
    serde_json::to_writer_pretty(&mut size, peers).map_err(io::Error::other)?;
    let mut json = Zeroizing::new(Vec::with_capacity(size.0 + 1));
    serde_json::to_writer_pretty(&mut *json, peers).map_err(io::Error::other)?;
    json.push(b'\n');
    Ok(json)
}

fn corrupt(path: PathBuf, reason: String) -> StateError {
    StateError::Corrupt { path, reason }
}

/// Counts the bytes written to it.
struct ByteCount(usize);

impl Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read_optional(path: &Path) -> Result<Option<Zeroizing<String>>, StateError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(Zeroizing::new(text))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(StateError::Corrupt {
            path: path.to_path_buf(),
            reason: "not UTF-8 text".into(),
        }),
        Err(source) => Err(StateError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A new Curve25519 private key, clamped as `wg genkey` does.
pub fn generate_key() -> Key {
    use rand_core::RngCore;
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 248;
    bytes[31] = (bytes[31] & 127) | 64;
    let key = Key(bytes);
    zeroize::Zeroize::zeroize(&mut bytes);
    key
}

/// The name of the temp file [`write_atomic`] writes `name` through.
fn temp_name(name: &str, pid: u32) -> String {
    format!(".{name}.tmp.{pid}")
}

/// Removes the temp files of writers that were killed mid-write. Each is
/// named after its writer's pid, so a crash loop would otherwise leave one
/// more behind every time (a copy of the key, or of the peers with their
/// keys, among them). A file whose writer is still running is left alone.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(temp_file_pid) else {
            continue;
        };
        let alive = pid != std::process::id()
            && i32::try_from(pid).is_ok_and(|pid| {
                // ESRCH means no such process; EPERM means one we may not signal.
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    != Err(nix::errno::Errno::ESRCH)
            });
        if alive {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => tracing::info!(
                path = %entry.path().display(),
                "removed a temp file left by an interrupted write"
            ),
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), "cannot remove a stale temp file: {e}")
            }
        }
    }
}

/// The writer's pid, if `name` is one of our temp files.
fn temp_file_pid(name: &str) -> Option<u32> {
    let pid: u32 = name.rsplit_once(".tmp.")?.1.parse().ok()?;
    [KEY_FILE, SETTINGS_FILE, PEERS_FILE]
        .iter()
        .any(|file| name == temp_name(file, pid))
        .then_some(pid)
}

/// Replaces `path` with `contents` durably: temp file (O_EXCL, 0600), fsync,
/// rename, fsync of the directory.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(temp_name(&name, std::process::id()));
    // A temp file left by a crash of this same pid is ours to replace.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vpcgate-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn key_is_generated_once_and_reused_with_0600() {
        let dir = tempdir("key");
        let state = StateDir::open(&dir).expect("open");
        let (first, generated) = state.load_or_create_key().expect("create");
        assert!(generated);
        let (second, generated) = state.load_or_create_key().expect("load");
        assert!(!generated);
        assert!(first == second);
        let meta = fs::metadata(dir.join(KEY_FILE)).expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&dir).expect("stat").mode() & 0o777, 0o700);
        let text = fs::read_to_string(dir.join(KEY_FILE)).expect("read");
        assert!(text.len() == 45 && text.ends_with("=\n"), "{text:?}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn empty_or_garbage_key_is_refused_not_replaced() {
        let dir = tempdir("corrupt");
        let state = StateDir::open(&dir).expect("open");
        for bad in ["", "\n", "not-base64!!", "AAAA"] {
            fs::write(dir.join(KEY_FILE), bad).expect("write");
            let err = state.load_or_create_key().expect_err("must refuse");
            let msg = err.to_string();
            assert!(msg.contains("private.key"), "{msg}");
            assert!(msg.contains("corrupt"), "{msg}");
            assert_eq!(fs::read_to_string(dir.join(KEY_FILE)).expect("read"), bad);
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn settings_round_trip_and_corruption_is_named() {
        let dir = tempdir("settings");
        let state = StateDir::open(&dir).expect("open");
        assert_eq!(state.load_settings().expect("load"), None);
        let mut settings = Settings::new(vec!["100.64.0.1/24".parse().expect("cidr")], 51820);
        settings.advertised_routes = vec!["198.18.64.0/20".parse().expect("cidr")];
        settings.public_endpoint = Some("198.18.2.10:51820".into());
        state.save_settings(&settings).expect("save");
        assert_eq!(state.load_settings().expect("load"), Some(settings));
        fs::write(dir.join(SETTINGS_FILE), "{\"addresses\":").expect("write");
        let msg = state.load_settings().expect_err("corrupt").to_string();
        assert!(msg.contains("settings.json"), "{msg}");
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn peers_round_trip_empty_file_is_corrupt() {
        let dir = tempdir("peers");
        let state = StateDir::open(&dir).expect("open");
        assert!(state.load_peers().expect("none yet").is_empty());
        let peer = StoredPeer {
            name: Some("laptop".into()),
            public_key: "x".repeat(44),
            private_key: Some("y".repeat(44)),
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 25,
            allowed_ips: vec!["100.64.0.2/32".parse().expect("cidr")],
            accept_routes: false,
            accept_default_route: false,
            learned_routes: vec!["198.18.64.0/20".parse().expect("cidr")],
        };
        state.save_peers(&[peer]).expect("save");
        let text = fs::read_to_string(dir.join(PEERS_FILE)).expect("read");
        assert!(text.starts_with("[\n") && text.ends_with("]\n"), "{text}");
        let back = state.load_peers().expect("load");
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].name.as_deref(), Some("laptop"));
        assert_eq!(back[0].persistent_keepalive, 25);
        assert_eq!(back[0].learned_routes.len(), 1);
        let meta = fs::metadata(dir.join(PEERS_FILE)).expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o600);
        fs::write(dir.join(PEERS_FILE), "").expect("truncate");
        let msg = state
            .load_peers()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("peers.json") && msg.contains("corrupt"),
            "{msg}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn temp_files_of_dead_writers_are_removed_at_open() {
        let dir = tempdir("stale");
        fs::create_dir_all(&dir).expect("mkdir");
        // pid_max is at most 2^22, so this writer cannot be running.
        let dead = temp_name(PEERS_FILE, 4_194_305);
        let ours = temp_name(KEY_FILE, std::process::id());
        let live = temp_name(SETTINGS_FILE, 1);
        for name in [
            &dead,
            &ours,
            &live,
            &".other.tmp.5".to_string(),
            &"notes".to_string(),
        ] {
            fs::write(dir.join(name), "x").expect("write");
        }
        StateDir::open(&dir).expect("open");
        let mut left: Vec<String> = fs::read_dir(&dir)
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".other.tmp.5", live.as_str(), "notes"]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = generate_key();
        let b = generate_key();
        assert!(a != b);
        assert_eq!(a.0[0] & 7, 0);
        assert_eq!(a.0[31] & 0xc0, 0x40);
    }
}
