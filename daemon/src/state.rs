//! Durable state under `--state-dir`: the private key, the node settings and
//! the peers.
//!
//! Every write goes to a fresh temp file that is fsynced, renamed over the
//! old file, and followed by an fsync of the directory, so a crash or power
//! cut leaves either the old file or the new one, never a torn one. A file
//! that exists but does not parse is an error that names the file: the
//! private key is never regenerated behind the user's back.
//!
//! Every file says which format it is in (see [`FORMAT`]). Files of every
//! older format load; the daemon rewrites them in the current one only once
//! it has started. A file of a newer format is refused before anything else
//! in it is read, so an older vpcgated never half-reads or overwrites it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use vpcgate_plane::key::Key;
pub use vpcgate_plane::settings::Settings;
pub use vpcgate_plane::stored::StoredPeer;

pub const KEY_FILE: &str = "private.key";
pub const SETTINGS_FILE: &str = "settings.json";
pub const PEERS_FILE: &str = "peers.json";

/// The state format this vpcgated writes; it reads this one and every one
/// before it.
///
/// 1. vpcgate 0.1.0. Nothing in a file names its format: `private.key` is
///    one base64 line, `settings.json` the settings object, `peers.json`
///    an array of peers.
/// 2. vpcgate 0.2.0. `private.key` opens with the comment line
///    `# vpcgate private key (state format 2)`; `settings.json` is
///    `{"format": 2, "settings": {...}}` and `peers.json`
///    `{"format": 2, "peers": [...]}`, the inner values as in format 1,
///    and the settings may hold `dns` (the forwarder's settings; absent
///    means on, with the host's resolvers), `priority` (absent: 100),
///    `checks` (absent: none) and `draining` (absent: false). Format 2 is
///    not released yet, so those optional fields joined it without a new
///    number.
pub const FORMAT: u32 = 2;

/// What a state file held, and the format it was in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub format: u32,
}

impl<T> Versioned<T> {
    fn current(value: T) -> Self {
        Versioned {
            value,
            format: FORMAT,
        }
    }

    /// Whether the daemon should rewrite the file in the current format.
    pub fn outdated(&self) -> bool {
        self.format < FORMAT
    }
}

/// Why the contents of one state file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileError {
    /// The reason the file is corrupt.
    Corrupt(String),
    /// The file is in this format, newer than [`FORMAT`].
    TooNew(u64),
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileError::Corrupt(reason) => f.write_str(reason),
            FileError::TooNew(found) => write!(f, "state format {found}, newer than {FORMAT}"),
        }
    }
}

impl From<String> for FileError {
    fn from(reason: String) -> Self {
        FileError::Corrupt(reason)
    }
}

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
    #[error(
        "{path} is in state format {found}, written by a newer vpcgate; this vpcgated {} reads \
         formats 1 to {FORMAT}. Nothing was read or changed: install the newer vpcgate again, \
         or restore a backup of the state directory made with this version",
        env!("CARGO_PKG_VERSION")
    )]
    TooNew { path: PathBuf, found: u64 },
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
    pub fn load_or_create_key(&self) -> Result<(Versioned<Key>, bool), StateError> {
        match self.load_key()? {
            Some(key) => Ok((key, false)),
            None => {
                let key = generate_key();
                self.save_key(&key)?;
                Ok((Versioned::current(key), true))
            }
        }
    }

    /// Loads the private key if one was saved; a plain interface starts
    /// without one, as wireguard-go does, until `wg` sets it.
    pub fn load_key(&self) -> Result<Option<Versioned<Key>>, StateError> {
        self.load(KEY_FILE, parse_key_file)
    }

    pub fn save_key(&self, key: &Key) -> Result<(), StateError> {
        write_atomic(&self.path(KEY_FILE), encode_key_file(key).as_bytes())
    }

    pub fn load_settings(&self) -> Result<Option<Versioned<Settings>>, StateError> {
        self.load(SETTINGS_FILE, parse_settings)
    }

    /// The saved peers; none (in the current format) if there is no file.
    pub fn load_peers(&self) -> Result<Versioned<Vec<StoredPeer>>, StateError> {
        Ok(self
            .load(PEERS_FILE, parse_peers)?
            .unwrap_or_else(|| Versioned::current(Vec::new())))
    }

    fn load<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Result<Versioned<T>, FileError>,
    ) -> Result<Option<Versioned<T>>, StateError> {
        let path = self.path(name);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        parse(&text).map(Some).map_err(|e| match e {
            FileError::Corrupt(reason) => corrupt(path, reason),
            FileError::TooNew(found) => StateError::TooNew { path, found },
        })
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

/// The comment line that opens `private.key` from format 2 on.
fn key_file_header() -> String {
    format!("# vpcgate private key (state format {FORMAT})")
}

/// Parses the contents of `private.key`: one base64 key, surrounding
/// whitespace allowed, and from format 2 on a comment line naming the
/// format. Other `#` lines are comments. The error is the reason the file is
/// corrupt.
pub fn parse_key_file(text: &str) -> Result<Versioned<Key>, FileError> {
    let mut format = 1;
    let mut body = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix('#') {
            if let Some((_, rest)) = comment.split_once("state format ") {
                let digits = rest.split(|c: char| !c.is_ascii_digit()).next();
                format = match digits.map(str::parse::<u64>) {
                    Some(Ok(n)) if n > u64::from(FORMAT) => return Err(FileError::TooNew(n)),
                    Some(Ok(n)) if n >= 2 => n as u32,
                    _ => return Err(format!("the comment {line:?} names no known format").into()),
                };
            }
            continue;
        }
        if body.replace(line).is_some() {
            return Err("more than one key".to_string().into());
        }
    }
    let Some(body) = body else {
        return Err("the file is empty".to_string().into());
    };
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| "not base64".to_string())?,
    );
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| "not a 32-byte key".to_string())?;
    let key = Key(key);
    if key.is_zero() {
        return Err("the key is all zeros".to_string().into());
    }
    Ok(Versioned { value: key, format })
}

/// What `save_key` writes. Room for the key is made up front: growing the
/// string would free a copy of it.
pub fn encode_key_file(key: &Key) -> Zeroizing<String> {
    let header = key_file_header();
    let mut text = Zeroizing::new(String::with_capacity(header.len() + 46));
    text.push_str(&header);
    text.push('\n');
    base64::engine::general_purpose::STANDARD.encode_string(key.0, &mut text);
    text.push('\n');
    text
}

/// The part of a JSON state file that says which format it is in. Every
/// other field is skipped unread (serde's `IgnoredAny` copies no string), so
/// a file of a newer format is refused before anything in it is parsed.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    format: Option<u64>,
}

/// The format of a JSON state file whose format 1 had no `format` field.
fn json_format(text: &str) -> Result<u32, FileError> {
    if !text.trim_start().starts_with('{') {
        return Err("not a JSON object".to_string().into());
    }
    let head: Head = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match head.format {
        None => Ok(1),
        Some(n) if n > u64::from(FORMAT) => Err(FileError::TooNew(n)),
        // Format 1 files carry no field, so 1 (or 0) here is not a format.
        Some(n) if n >= 2 => Ok(n as u32),
        Some(n) => Err(format!("there is no state format {n}").into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    #[allow(dead_code)]
    format: u32,
    settings: Settings,
}

#[derive(Serialize)]
struct SettingsFileRef<'a> {
    format: u32,
    settings: &'a Settings,
}

/// Parses the contents of `settings.json`.
pub fn parse_settings(text: &str) -> Result<Versioned<Settings>, FileError> {
    let format = json_format(text)?;
    let value = match format {
        1 => serde_json::from_str(text),
        _ => serde_json::from_str::<SettingsFile>(text).map(|f| f.settings),
    }
    .map_err(|e| e.to_string())?;
    Ok(Versioned { value, format })
}

/// What `save_settings` writes.
pub fn encode_settings(settings: &Settings) -> io::Result<Vec<u8>> {
    let file = SettingsFileRef {
        format: FORMAT,
        settings,
    };
    let mut json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
    json.push(b'\n');
    Ok(json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersFile {
    #[allow(dead_code)]
    format: u32,
    peers: Vec<StoredPeer>,
}

#[derive(Serialize)]
struct PeersFileRef<'a> {
    format: u32,
    peers: &'a [StoredPeer],
}

/// Parses the contents of `peers.json`. Format 1 is a bare array.
pub fn parse_peers(text: &str) -> Result<Versioned<Vec<StoredPeer>>, FileError> {
    if text.trim_start().starts_with('[') {
        let value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        return Ok(Versioned { value, format: 1 });
    }
    let format = json_format(text)?;
    let file: PeersFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(Versioned {
        value: file.peers,
        format,
    })
}

/// What `save_peers` writes. It holds generated clients' private keys and
/// preshared keys, so it is serialised into a buffer of its final size (a
/// growing one would free copies), zeroized when dropped.
pub fn encode_peers(peers: &[StoredPeer]) -> io::Result<Zeroizing<Vec<u8>>> {
    let file = PeersFileRef {
        format: FORMAT,
        peers,
    };
    let mut size = ByteCount(0);
    serde_json::to_writer_pretty(&mut size, &file).map_err(io::Error::other)?;
    let mut json = Zeroizing::new(Vec::with_capacity(size.0 + 1));
    serde_json::to_writer_pretty(&mut *json, &file).map_err(io::Error::other)?;
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
        assert!(first.value == second.value);
        assert_eq!((first.format, second.format), (FORMAT, FORMAT));
        let meta = fs::metadata(dir.join(KEY_FILE)).expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&dir).expect("stat").mode() & 0o777, 0o700);
        let text = fs::read_to_string(dir.join(KEY_FILE)).expect("read");
        let (header, key) = text.split_once('\n').expect("two lines");
        assert_eq!(header, "# vpcgate private key (state format 2)");
        assert!(key.len() == 45 && key.ends_with("=\n"), "{text:?}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn empty_or_garbage_key_is_refused_not_replaced() {
        let dir = tempdir("corrupt");
        let state = StateDir::open(&dir).expect("open");
        let key = "q1wOeyK4LhkDkVq5R8Ve8HbMGP4aXrmIP3Qg1G4gqH8=";
        for bad in [
            "",
            "\n",
            "not-base64!!",
            "AAAA",
            "# vpcgate private key (state format 2)\n",
            &format!("{key}\n{key}\n"),
            &format!("# vpcgate private key (state format 1)\n{key}\n"),
            &format!("# vpcgate private key (state format two)\n{key}\n"),
        ] {
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
        assert_eq!(
            state.load_settings().expect("load"),
            Some(Versioned::current(settings))
        );
        for bad in [
            "{\"addresses\":",
            "[]",
            "{\"format\": \"2\", \"settings\": {}}",
            "{\"format\": 1, \"addresses\": [], \"listen_port\": 1}",
            "{\"format\": 2, \"addresses\": [], \"listen_port\": 1}",
        ] {
            fs::write(dir.join(SETTINGS_FILE), bad).expect("write");
            let msg = state.load_settings().expect_err(bad).to_string();
            assert!(
                msg.contains("settings.json") && msg.contains("corrupt"),
                "{msg}"
            );
        }
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
        assert!(state.load_peers().expect("none yet").value.is_empty());
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
        assert!(
            text.starts_with("{\n  \"format\": 2,\n  \"peers\": [\n") && text.ends_with("]\n}\n"),
            "{text}"
        );
        let back = state.load_peers().expect("load");
        assert_eq!(back.format, FORMAT);
        let back = back.value;
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

    /// Each past release's state directories, as that release wrote them
    /// (`tests/tools/make-state-fixtures.sh`), with the format they are in.
    const RELEASES: &[(&str, u32)] = &[("0.1.0", 1)];

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/state")
    }

    fn copy_dir(from: &Path, to: &Path) {
        let _ = fs::remove_dir_all(to);
        fs::create_dir_all(to).expect("mkdir");
        for entry in fs::read_dir(from).expect("list fixtures") {
            let entry = entry.expect("entry");
            fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }

    fn file_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .expect("list")
            .map(|e| {
                let e = e.expect("entry");
                let name = e.file_name().to_string_lossy().into_owned();
                (name, fs::read(e.path()).expect("read"))
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn fixtures_cover_every_release() {
        let mut found: Vec<String> = fs::read_dir(fixtures())
            .expect("daemon/fixtures/state")
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        found.sort();
        let listed: Vec<&str> = RELEASES.iter().map(|(v, _)| *v).collect();
        assert_eq!(
            found, listed,
            "a fixture directory is not in RELEASES, or the reverse"
        );
    }

    /// Every state file of every past release loads, as the format that
    /// release wrote; loading changes no file; and what loaded, saved in the
    /// current format, loads again as the same.
    #[test]
    fn state_of_every_past_release_loads_and_migrates() {
        for (release, format) in RELEASES {
            for node in ["gateway", "client"] {
                let fixture = fixtures().join(release).join(node);
                let dir = tempdir(&format!("fixture-{release}-{node}"));
                copy_dir(&fixture, &dir);
                let state = StateDir::open(&dir).expect("open");
                let what = format!("{release} {node}");

                let key = state.load_key().expect(&what).expect("a key");
                let settings = state.load_settings().expect(&what).expect("settings");
                let peers = state.load_peers().expect(&what);
                assert_eq!(
                    (key.format, settings.format, peers.format),
                    (*format, *format, *format),
                    "{what}"
                );
                let public = fs::read_to_string(dir.join("public.key")).expect("public.key");
                let derived = base64::engine::general_purpose::STANDARD
                    .encode(vpcgate_plane::key::public_key_of(&key.value));
                assert_eq!(
                    derived,
                    public.trim(),
                    "{what}: the key is not the one saved"
                );
                assert_eq!(
                    file_bytes(&dir),
                    file_bytes(&fixture),
                    "{what}: loading wrote"
                );

                state.save_key(&key.value).expect("save key");
                state.save_settings(&settings.value).expect("save settings");
                state.save_peers(&peers.value).expect("save peers");
                let key2 = state.load_key().expect("reload").expect("key");
                assert!(key2.value == key.value && key2.format == FORMAT, "{what}");
                assert_eq!(
                    state.load_settings().expect("reload"),
                    Some(Versioned::current(settings.value.clone()))
                );
                let peers2 = state.load_peers().expect("reload");
                assert_eq!(peers2.format, FORMAT);
                assert_eq!(
                    *encode_peers(&peers2.value).expect("encode"),
                    *encode_peers(&peers.value).expect("encode"),
                    "{what}: the peers changed in the rewrite"
                );
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }

    /// What the 0.1.0 fixtures hold, read through the loader: the script
    /// gave them every kind of state that release saves.
    #[test]
    fn state_of_0_1_0_holds_what_it_was_given() {
        let load = |node: &str| {
            // A copy: opening a state directory makes it 0700.
            let dir = tempdir(&format!("holds-{node}"));
            copy_dir(&fixtures().join("0.1.0").join(node), &dir);
            let state = StateDir::open(&dir).expect("open");
            let settings = state
                .load_settings()
                .expect("settings")
                .expect("some")
                .value;
            let peers = state.load_peers().expect("peers").value;
            let _ = fs::remove_dir_all(&dir);
            (settings, peers)
        };
        let (gw, gw_peers) = load("gateway");
        assert_eq!(gw.listen_port, 51901);
        assert_eq!(gw.mtu, 1380);
        assert!(!gw.mss_clamp && gw.snat);
        assert_eq!(gw.public_endpoint.as_deref(), Some("198.18.7.1:51901"));
        assert_eq!(gw.addresses.len(), 2);
        assert_eq!(gw.advertised_routes.len(), 2);
        let by_name = |peers: &[StoredPeer], name: &str| {
            peers
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .cloned()
                .unwrap_or_else(|| panic!("no peer {name}"))
        };
        assert!(by_name(&gw_peers, "laptop").private_key.is_some());
        assert_eq!(by_name(&gw_peers, "phone").persistent_keepalive, 25);
        assert!(by_name(&gw_peers, "client").preshared_key.is_some());
        let (client, client_peers) = load("client");
        assert!(!client.snat);
        let gateway = by_name(&client_peers, "gateway");
        assert!(gateway.accept_routes);
        assert_eq!(gateway.learned_routes, gw.advertised_routes);
        assert!(gateway.endpoint.is_some() && gateway.preshared_key.is_some());
    }

    /// A file of a newer format than this build knows is refused before
    /// anything else in it is read, with its path, its format and this
    /// build's version, and it is left exactly as it was.
    #[test]
    fn newer_format_is_refused_by_name_and_left_alone() {
        let dir = tempdir("newer");
        let state = StateDir::open(&dir).expect("open");
        let cases = [
            (
                KEY_FILE,
                "# vpcgate private key (state format 3)\nanything at all\n",
                3,
            ),
            (
                SETTINGS_FILE,
                "{\"format\": 3, \"settings\": {\"new\": true}}",
                3,
            ),
            (
                PEERS_FILE,
                "{\"peers\": {\"by_name\": {}}, \"format\": 17}",
                17,
            ),
        ];
        for (file, text, found) in cases {
            let _ = fs::remove_file(dir.join(KEY_FILE));
            let _ = fs::remove_file(dir.join(SETTINGS_FILE));
            let _ = fs::remove_file(dir.join(PEERS_FILE));
            fs::write(dir.join(file), text).expect("write");
            let err = match file {
                KEY_FILE => state.load_key().map(|_| ()),
                SETTINGS_FILE => state.load_settings().map(|_| ()),
                _ => state.load_peers().map(|_| ()),
            }
            .expect_err(file);
            assert!(
                matches!(&err, StateError::TooNew { path, found: f } if path == &dir.join(file) && *f == found),
                "{err:?}"
            );
            let msg = err.to_string();
            for part in [
                dir.join(file).display().to_string(),
                format!("state format {found}"),
                format!("vpcgated {}", env!("CARGO_PKG_VERSION")),
            ] {
                assert!(msg.contains(&part), "{msg:?} lacks {part:?}");
            }
            assert_eq!(fs::read_to_string(dir.join(file)).expect("read"), text);
            // load_or_create_key must not replace a key it cannot read.
            if file == KEY_FILE {
                assert!(state.load_or_create_key().is_err());
                assert_eq!(fs::read_to_string(dir.join(file)).expect("read"), text);
            }
        }
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
